"""Shared helpers for every ``memkit bench`` command: machine header, timers, and result files.

A benchmark produces a list of row dicts and hands them to :func:`write_results`, which writes

* ``<out>/<name>.json`` — machine info, date, command, columns, rows and notes (everything the
  markdown shows, plus raw fields such as timing samples' sizes);
* ``<out>/<name>.md`` — a title, the date and machine, notes, and a markdown table;
* ``<out>/<name>_<plot>.png`` — one file per ``plots`` entry, drawn with matplotlib's Agg
  backend (no display needed).

Timing on a shared, noisy machine: compare contenders with :func:`interleaved` (the calls of each
round run in a shuffled order, so a burst of load hits all of them alike) and quote medians
(:func:`summarize`). Nothing here imports torch, faiss or other heavy libraries: versions are read
from package metadata.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Column",
    "machine_info",
    "machine_line",
    "rss_bytes",
    "percentile",
    "summarize",
    "time_calls",
    "interleaved",
    "ratio_of_medians",
    "paired_ratio",
    "markdown_table",
    "write_results",
    "pyplot",
    "bench_main",
]

from memkit.evaluation.machine import VERSIONED, machine_line, pyplot
from memkit.evaluation.machine import machine_info as _machine_info


# ---------------------------------------------------------------------- machine
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(packages: Sequence[str] = VERSIONED) -> dict[str, Any]:
    """The evaluation machine record (:func:`memkit.evaluation.machine.machine_info`) plus the git commit."""
    return dict(_machine_info(packages), git=_git_commit())


def rss_bytes() -> int:
    """Resident set size of this process now (psutil if installed, else /proc)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil is a dev dependency
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------- timing
def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of ``samples``; nan when empty."""
    return float(np.percentile(np.asarray(samples, float), q)) if len(samples) else math.nan


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """{n, p50, p90, p99, mean, min} of timing samples in seconds."""
    a = np.asarray(samples, float)
    if a.size == 0:
        return {"n": 0, "p50": math.nan, "p90": math.nan, "p99": math.nan, "mean": math.nan, "min": math.nan}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"n": int(a.size), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "mean": float(a.mean()), "min": float(a.min())}


def time_calls(fn: Callable[[int], Any], n: int, *, warmup: int = 3, max_seconds: float = math.inf) -> list[float]:
    """Time ``fn(i)`` for i in 0..n-1 (after ``warmup`` untimed calls); stop early past ``max_seconds``."""
    clock = time.perf_counter
    for i in range(min(warmup, n)):
        fn(i)
    out: list[float] = []
    start = clock()
    for i in range(n):
        t0 = clock()
        fn(i)
        out.append(clock() - t0)
        if clock() - start > max_seconds and len(out) >= 5:
            break
    return out


def interleaved(fns: dict[str, Callable[[int], Any]], rounds: int, *, warmup: int = 3, seed: int = 0,
                max_seconds: float = math.inf) -> dict[str, list[float]]:
    """Per-call times of several contenders, interleaved: each round calls every ``fn(i)`` once, shuffled.

    Use for ratios such as "bank call vs direct library call": both see the same load, caches and
    inputs, and the median of each list is comparable.
    """
    rng = random.Random(seed)
    names = list(fns)
    clock = time.perf_counter
    for i in range(min(warmup, rounds)):
        for name in names:
            fns[name](i)
    out: dict[str, list[float]] = {name: [] for name in names}
    start = clock()
    for i in range(rounds):
        rng.shuffle(names)
        for name in names:
            t0 = clock()
            fns[name](i)
            out[name].append(clock() - t0)
        if clock() - start > max_seconds and i >= 10:
            break
    return out


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of per-round ratios num[i] / den[i] (rounds from :func:`interleaved`: each pair ran back to back)."""
    n = min(len(num), len(den))
    if n == 0:
        return math.nan
    a, b = np.asarray(num[:n], float), np.asarray(den[:n], float)
    ok = b > 0
    return float(np.median(a[ok] / b[ok])) if ok.any() else math.nan


def ratio_of_medians(num: Sequence[float], den: Sequence[float]) -> float:
    """median(num) / median(den); nan if either is empty or the denominator is zero."""
    if not len(num) or not len(den):
        return math.nan
    d = float(np.median(den))
    return float(np.median(num)) / d if d > 0 else math.nan


# ---------------------------------------------------------------------- output
@dataclass(frozen=True)
class Column:
    """A table column: row key, header text, and a format spec or callable for the value."""

    key: str
    header: str
    fmt: str | Callable[[Any], str] = ""


def _cell(value: Any, fmt: str | Callable[[Any], str]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if callable(fmt):
        return fmt(value)
    if fmt and isinstance(value, (int, float, np.integer, np.floating)):
        return format(value, fmt)
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column | str]) -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns`` (missing values show as —)."""
    cols = [c if isinstance(c, Column) else Column(c, c) for c in columns]
    lines = ["| " + " | ".join(c.header for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c.key), c.fmt) for c in cols) + " |")
    return "\n".join(lines)


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None  # strict JSON has no NaN/inf
    return x


def write_results(name: str, rows: Sequence[dict[str, Any]], columns: Sequence[Column | str], title: str,
                  machine: dict[str, Any] | None = None, *, out_dir: str | os.PathLike[str] = "benchmarks/results",
                  notes: Sequence[str] = (), plots: dict[str, Callable[[Any], Any]] | None = None,
                  extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and one ``<name>_<key>.png`` per ``plots`` entry.

    ``plots`` maps a short name to a function that receives ``matplotlib.pyplot`` and returns a
    Figure (or None to skip). Returns {"json": path, "md": path, "<plot>": path, ...}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine if machine is not None else machine_info()
    cols = [c if isinstance(c, Column) else Column(c, c) for c in columns]
    paths: dict[str, Path] = {}
    if plots:
        plt = pyplot()
        for key, draw in plots.items():
            fig = draw(plt)
            if fig is None:
                continue
            path = out / f"{name}_{key}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            paths[key] = path
    doc = {
        "name": name,
        "title": title,
        "machine": machine,
        "command": " ".join(["memkit" if Path(sys.argv[0]).name == "__main__.py" else Path(sys.argv[0]).name, *sys.argv[1:]]),
        "columns": [{"key": c.key, "header": c.header} for c in cols],
        "rows": list(rows),
        "notes": list(notes),
        "plots": {k: p.name for k, p in paths.items()},
    }
    doc.update(extra or {})
    jpath = out / f"{name}.json"
    tmp = jpath.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(jsonable(doc), indent=2) + "\n")
    os.replace(tmp, jpath)
    md = [f"# {title}", "", f"*{machine_line(machine)}*", ""]
    md += [markdown_table(rows, cols), ""]
    if notes:
        md += [f"- {n}" for n in notes] + [""]
    md += [f"![{k}]({p.name})" for k, p in paths.items()]
    mpath = out / f"{name}.md"
    mpath.write_text("\n".join(md).rstrip() + "\n")
    paths["json"], paths["md"] = jpath, mpath
    return paths


def bench_main(prog: str, doc: str, add_arguments: Callable[[Any], None], run: Callable[[Any], int],
               worker_flag: str, worker: Callable[[dict[str, Any]], Any], argv: Sequence[str] | None) -> int:
    """``python -m memkit.bench.X``: parse, answer a hidden ``worker_flag`` (one measurement in a subprocess,
    JSON on stdout), or run the benchmark; a MemkitError exits 2 with its message."""
    import argparse
    import json
    import sys

    from memkit.errors import MemkitError

    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    add_arguments(parser)
    parser.add_argument(worker_flag, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    spec = getattr(args, worker_flag.lstrip("-").replace("-", "_"))
    if spec:
        print(json.dumps(jsonable(worker(json.loads(spec)))), flush=True)
        return 0
    try:
        return run(args)
    except MemkitError as exc:
        print(f"memkit: error: {exc}", file=sys.stderr)
        return 2
