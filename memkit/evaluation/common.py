"""Shared plumbing of ``memkit eval``, ``memkit bench context`` and ``memkit demo``.

Loading a model for a ``--model`` argument, building the three attention set-ups that every
comparison uses, measuring peak memory, and writing results as a JSON file next to a human table:

* ``memkit``  - the model wrapped with the memkit config (``--config`` or the defaults);
* ``window``  - the same wrap with ``top_k=0``: attention sinks + local window, no memory;
* ``full``    - the plain Hugging Face model, full attention over the whole input (only where the
  input fits the model's trained positions, unless asked otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from memkit.errors import ConfigError, InvalidInputError
from memkit.paths import user_path

__all__ = ["MODES", "add_common_arguments", "load_for_args", "make_runner", "parse_choices", "parse_modes", "peak_rss_bytes",
           "current_rss_bytes", "memory_bytes", "write_json", "format_table", "human_bytes", "RssSampler",
           "set_threads", "max_positions", "memory_breakdown"]

MODES = ("memkit", "window", "full")


def add_common_arguments(p: argparse.ArgumentParser, *, modes_default: str = "memkit") -> None:
    """``--model --config --modes --threads --no-progress --out``, shared by the eval commands."""
    p.add_argument("--model", default=None, metavar="PATH",
                   help="local Hugging Face model folder, folder with one .gguf file, or a .gguf file "
                        "(default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="memkit config (YAML or JSON MemoryConfig) for the 'memkit' and 'window' modes "
                        "(default: memkit's defaults)")
    p.add_argument("--modes", default=modes_default, metavar="LIST",
                   help="comma-separated set-ups to run: memkit (memory), window (sinks + local window only, "
                        f"top_k=0), full (plain model, full attention) (default: {modes_default})")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def parse_choices(flag: str, text: str, choices: Sequence[str], noun: str) -> list[str]:
    """A comma-separated option (``--modes memkit,full``) as a list; an empty list or a name outside ``choices``
    raises an InvalidInputError naming the flag and the choices."""
    items = [m.strip() for m in str(text).split(",") if m.strip()]
    bad = [m for m in items if m not in choices]
    if bad or not items:
        raise InvalidInputError(f"{flag} {text!r}: unknown {noun}(s) {bad}; choose from {list(choices)}")
    return items


def parse_modes(text: str) -> list[str]:
    return parse_choices("--modes", text, MODES, "mode")


def set_threads(n: int | None) -> None:
    if n is None:
        return
    if n < 1:
        raise InvalidInputError(f"--threads must be >= 1, got {n}")
    import torch

    torch.set_num_threads(n)


def check_file(path: str | None, what: str) -> Path | None:
    """A path given on the command line that must be an existing file."""
    if path is None:
        return None
    p = user_path(path, what)
    if not p.is_file():
        raise InvalidInputError(f"{what} {str(p)!r} does not exist or is not a file")
    return p


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of a user's file (undecodable bytes replaced); an unreadable or empty file raises an
    InvalidInputError that names it."""
    try:
        body = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise InvalidInputError(f"{what} {str(path)!r} cannot be read ({e.strerror or e}); check its permissions "
                                "or give another file") from e
    if not body.strip():
        raise InvalidInputError(f"{what} {str(path)!r} is empty")
    return body


def load_config_arg(path: str | None, **overrides: Any) -> Any:
    """The MemoryConfig of ``--config`` (validated now, so a bad file fails before the model loads)."""
    from memkit.config import load_config

    if path is not None:
        check_file(path, "config file")
    cfg = load_config(path, **overrides)
    from memkit.bank import available_backends

    names = set(available_backends())
    scheme = cfg.bank.backend.split("://", 1)[0].split(":", 1)[0]
    if cfg.bank.backend not in names and scheme not in names:
        raise ConfigError(f"unknown backend {cfg.bank.backend!r} in the config; available: {sorted(names)}")
    return cfg


def load_for_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer) of ``--model`` in eval mode, with no gradients."""
    import torch

    from memkit.models import load_model

    torch.set_grad_enabled(False)
    return load_model(args.model)


def max_positions(model: Any) -> int:
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0) or 0)


@contextmanager
def make_runner(model: Any, tokenizer: Any, mode: str, config: Any, *, progress: bool = True) -> Iterator[Any]:
    """Yield the model set up for ``mode``; unwrap it again afterwards so the next mode starts clean."""
    if mode == "full":
        yield model
        return
    import memkit

    cfg = config.replace(top_k=0) if mode == "window" else config
    cfg = cfg.replace(progress=progress)
    wrapped = memkit.wrap(model, cfg, tokenizer=tokenizer)
    try:
        yield wrapped
    finally:
        memkit.unwrap(wrapped)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (bytes; ru_maxrss is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        import psutil

        return int(psutil.Process().memory_info().rss)


class RssSampler:
    """Peak RSS during a ``with`` block, sampled every ``interval`` s by a thread (ru_maxrss never resets)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self.start = 0

    def __enter__(self) -> RssSampler:
        import threading

        self.start = self.peak = current_rss_bytes()
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, current_rss_bytes())

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())


def memory_bytes(wrapped: Any) -> dict[str, int]:
    """The memory's own footprint: K/V page bytes held in every tier, and retrieval-vector bytes."""
    mem = getattr(wrapped, "memory", None)
    if mem is None:
        return {"pages_bytes": 0, "vectors_bytes": 0, "chunks": 0}
    st = mem.stats()
    tiers = st.get("kvstore", {}).get("tiers", {})
    pages = sum(int(t.get("resident_bytes", 0)) for t in tiers.values())
    chunks = int(st.get("chunks", 0))
    dim = getattr(mem.manager, "embed_dim", None) or 0
    return {"pages_bytes": pages, "vectors_bytes": chunks * int(dim) * 4, "chunks": chunks,
            "page_bytes": int(st.get("kvstore", {}).get("page_bytes", 0))}


def memory_breakdown(wrapped: Any) -> dict[str, int]:
    """Where a wrapped model's bytes are: weights, K/V pages per tier (disk: the page files), bank vectors."""
    st = wrapped.memory.stats()
    tiers = st.get("kvstore", {}).get("tiers", {})
    dim = getattr(wrapped.memory.manager, "embed_dim", None) or 0
    out = {"weights": sum(int(p.numel() * p.element_size()) for p in wrapped.parameters()),
           "vectors": int(st.get("chunks", 0)) * int(dim) * 4, "chunks": int(st.get("chunks", 0))}
    for name, t in tiers.items():
        out[f"pages_{name}"] = int(t.get("resident_bytes", 0))
    if "disk" in tiers:
        out["disk_files"] = int(tiers["disk"].get("file_bytes", 0))
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_json(data: dict[str, Any], path: str | None) -> str | None:
    """Write ``data`` as JSON to ``path`` ('-' = stdout); returns where it went."""
    data = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **data}
    text = json.dumps(data, indent=2, default=str)
    if path is None:
        return None
    if path == "-":
        print(text)
        return "stdout"
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    tmp.write_text(text + "\n")
    os.replace(tmp, p)
    return str(p)


def machine() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover
        pass
    try:
        with open("/proc/loadavg") as fh:
            info["loadavg"] = fh.read().split()[:3]
    except OSError:  # pragma: no cover
        pass
    return info
