"""``memkit bench context``: tokens/s and peak memory against context length, memkit vs window vs full.

Each set-up reads the same real text (Shakespeare's longest plays, concatenated) from token 0 to the
longest length asked, block by block, in its own worker process (so peak RSS belongs to that set-up
alone):

* ``memkit`` - the model wrapped with the memkit config (retrieval of ``top_k`` chunks per block);
* ``window`` - the same wrap with ``top_k=0`` (attention sinks + local window, no memory);
* ``full``   - the plain model with full attention and a growing K/V cache (``DynamicCache``), only up
  to the model's trained positions (8k for SmolLM2).

A forward hook on the decoder times every block and samples RSS, so one run gives, for every length
L: the throughput of reading the first L tokens (``tok/s`` = L / time to reach L), the throughput of
the blocks just before L (``tok/s @L``, median of the last four blocks: the steady-state speed at that
context), and the peak RSS up to L. The set-ups run interleaved, ``--repeats`` times in a shuffled
order, and each figure is the median over repeats; ratios (memkit / window, memkit / full) are taken
between set-ups of the same run.

    memkit bench context --quick          # 2k..8k, three set-ups, 3 repeats
    memkit bench context                  # 4k..80k

Results: ``benchmarks/results/context.json``, ``context.md`` and ``context_speed.png`` /
``context_memory.png``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from typing import Any

from memkit.bench import report

__all__ = ["add_arguments", "run", "main", "worker", "summarize_run"]

DEFAULT_LENGTHS = "4k,8k,16k,32k,64k,80k"
QUICK_LENGTHS = "2k,4k,8k"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="PATH",
                   help="local HF model folder, folder with a .gguf file, or a .gguf file (default: bundled SmolLM2)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="memkit config (YAML/JSON) for the memkit and window set-ups (default: memkit's defaults)")
    p.add_argument("--lengths", default=None, metavar="LIST",
                   help=f"context lengths to report, k = 1024 tokens (default: {DEFAULT_LENGTHS}; "
                        f"--quick: {QUICK_LENGTHS})")
    p.add_argument("--modes", default="memkit,window,full", metavar="LIST",
                   help="set-ups: memkit, window (top_k=0), full (plain model, only within its positions) "
                        "(default: memkit,window,full)")
    p.add_argument("--repeats", type=int, default=None, metavar="N",
                   help="runs of each set-up, interleaved; figures are medians (default: 1; --quick: 3)")
    p.add_argument("--quick", action="store_true", help=f"short run: lengths {QUICK_LENGTHS}, 3 repeats")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads per worker")
    p.add_argument("--out-dir", default="benchmarks/results", metavar="DIR",
                   help="where context.json, context.md and the PNG plots go (default: benchmarks/results)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


# ---------------------------------------------------------------------- worker (one set-up, own process)
def _text_ids(tokenizer: Any, n: int) -> list[int]:
    from memkit.corpora import long_text

    ids: list[int] = []
    bos = getattr(tokenizer, "bos_token_id", None)
    if getattr(tokenizer, "add_bos_token", False) and bos is not None:
        ids.append(bos)
    for _name, text in long_text(100_000):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= n:
            break
    if len(ids) < n:
        raise RuntimeError(f"the bundled plays give only {len(ids)} tokens, fewer than {n}")
    return ids[:n]


class _BlockClock:
    """Forward hooks on the decoder: per-block seconds and peak RSS (a sampling thread catches in-block peaks)."""

    def __init__(self, module: Any) -> None:
        import threading

        self.records: list[dict[str, float]] = []
        self.tokens = 0
        self._peak = report.rss_bytes()
        self._stop = threading.Event()
        self._t0 = 0.0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                         module.register_forward_hook(self._post, with_kwargs=True)]

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self._peak = max(self._peak, report.rss_bytes())

    def _pre(self, module: Any, args: Any, kwargs: Any) -> None:
        self._t0 = time.perf_counter()

    def _post(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        self.tokens += int(ids.shape[-1])
        rss = report.rss_bytes()
        self.records.append({"end": self.tokens, "seconds": time.perf_counter() - self._t0,
                             "rss": max(self._peak, rss)})
        self._peak = rss

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for h in self._handles:
            h.remove()


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Read ``spec['tokens']`` tokens in set-up ``spec['mode']``; per-block timings and RSS."""
    import torch

    from memkit.evaluation.common import max_positions, memory_bytes
    from memkit.models import load_model

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.set_grad_enabled(False)
    model, tok = load_model(spec.get("model"))
    n = int(spec["tokens"])
    ids = torch.tensor([_text_ids(tok, n)])
    mode = spec["mode"]
    out: dict[str, Any] = {"mode": mode, "tokens": n, "max_positions": max_positions(model),
                           "threads": torch.get_num_threads()}
    from memkit.config import load_config

    cfg = load_config(spec.get("config") or None, progress=bool(spec.get("progress", True)))
    if mode == "window":
        cfg = cfg.replace(top_k=0)
    block = cfg.block_size
    target = model
    if mode != "full":
        import memkit

        target = memkit.wrap(model, cfg, tokenizer=tok)
        # Warm-up (untimed): loads the retriever and fills lazy state, so block 1 is not an outlier.
        target(ids[:, : min(n, 2 * block)])
        target.memory.reset()
    base_rss = report.rss_bytes()
    clock = _BlockClock(model.base_model)
    t0 = time.perf_counter()
    try:
        if mode == "full":
            from transformers import DynamicCache

            cache = DynamicCache()
            bar = None
            if spec.get("progress", True):
                from tqdm.auto import tqdm

                bar = tqdm(total=n, desc="full attention", unit="tok", leave=False)
            for s in range(0, n, block):
                res = model(input_ids=ids[:, s:s + block], past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = res.past_key_values
                if bar is not None:
                    bar.update(min(block, n - s))
            if bar is not None:
                bar.close()
            out["kv_cache_bytes"] = sum(int(t.numel() * t.element_size()) for layer in cache.layers
                                        for t in (layer.keys, layer.values) if t is not None)
        else:
            target(ids, progress=bool(spec.get("progress", True)))
            out.update(memory_bytes(target))
    finally:
        clock.close()
    out.update(seconds=time.perf_counter() - t0, base_rss=base_rss, blocks=clock.records, block_size=block)
    return out


# ---------------------------------------------------------------------- parent: plan, run, summarise
def summarize_run(run: dict[str, Any], lengths: list[int]) -> dict[int, dict[str, float]]:
    """Per length L: tok/s to reach L, steady tok/s at L (median of the last 4 blocks), peak RSS up to L."""
    blocks = run["blocks"]
    out: dict[int, dict[str, float]] = {}
    for L in lengths:
        upto = [b for b in blocks if b["end"] <= L]
        if not upto or upto[-1]["end"] < L:
            continue
        secs = sum(b["seconds"] for b in upto)
        tail = upto[-4:]
        prev = [upto[i - 1]["end"] if i > 0 else 0 for i in range(len(upto))][-4:]
        rates = [(b["end"] - p) / b["seconds"] for b, p in zip(tail, prev) if b["seconds"] > 0]
        out[L] = {"tps": L / secs, "tps_at": statistics.median(rates), "peak_rss": max(b["rss"] for b in upto),
                  "seconds": secs}
    return out


def _run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "memkit.bench.context", "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"context worker {spec['mode']} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _plots(rows: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    def speed(plt: Any) -> Any:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for m in modes:
            pts = [(r["length"], r.get(f"tps_{m}")) for r in rows if r.get(f"tps_{m}")]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("tokens/s (reading the first L tokens)")
        ax.set_title("Throughput vs context length")
        ax.grid(alpha=0.3)
        ax.legend()
        return fig

    def memory(plt: Any) -> Any:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for m in modes:
            pts = [(r["length"], r[f"rss_{m}"] / 2**20) for r in rows if r.get(f"rss_{m}")]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{m} peak RSS")
        pts = [(r["length"], r["pages_memkit"] / 2**20) for r in rows if r.get("pages_memkit")]
        if pts:
            ax.plot(*zip(*pts), marker="x", linestyle="--", label="memkit K/V pages")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("MiB")
        ax.set_title("Peak memory vs context length")
        ax.grid(alpha=0.3)
        ax.legend()
        return fig

    return {"speed": speed, "memory": memory}


def run(args: argparse.Namespace) -> int:
    from memkit.errors import InvalidInputError
    from memkit.evaluation.common import load_config_arg, parse_modes
    from memkit.evaluation.haystack import parse_lengths

    lengths = sorted(set(parse_lengths(args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS))))
    modes = parse_modes(args.modes)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 1)
    if repeats < 1:
        raise InvalidInputError(f"--repeats must be >= 1, got {repeats}")
    cfg = load_config_arg(args.config)
    from memkit.models import load_model, resolve_model_path

    resolve_model_path(args.model)  # a bad --model fails here, before torch and transformers load

    model, _tok = load_model(args.model)  # fails fast on a bad folder; converts a GGUF once
    from memkit.evaluation.common import max_positions

    npos = max_positions(model)
    del model, _tok
    plan = []
    for m in modes:
        longest = max(lengths) if m != "full" else max([L for L in lengths if not npos or L <= npos], default=0)
        if longest:
            plan.append((m, longest))
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m, _ in plan}
    rng = random.Random(0)
    t_start = time.perf_counter()
    for rep in range(repeats):
        order = list(plan)
        rng.shuffle(order)
        for m, longest in order:
            print(f"[bench context] repeat {rep + 1}/{repeats}: {m} over {longest} tokens", flush=True)
            spec = {"mode": m, "tokens": longest, "model": args.model, "config": cfg.to_dict(),
                    "threads": args.threads, "progress": not args.no_progress}
            res = _run_worker(spec)
            runs[m].append(res)
            print(f"[bench context]   {m}: {longest / res['seconds']:.0f} tok/s, "
                  f"{res['seconds']:.1f}s", flush=True)
    rows = []
    for L in lengths:
        row: dict[str, Any] = {"length": L}
        for m in runs:
            per = [s[L] for s in (summarize_run(r, [L]) for r in runs[m]) if L in s]
            if not per:
                continue
            row[f"tps_{m}"] = statistics.median(p["tps"] for p in per)
            row[f"tps_at_{m}"] = statistics.median(p["tps_at"] for p in per)
            row[f"rss_{m}"] = statistics.median(p["peak_rss"] for p in per)
            if m == "memkit":  # memory grows linearly with what has left the window: pages at L
                last = runs[m][0]
                frac = min(1.0, L / last["tokens"])
                row["pages_memkit"] = last.get("pages_bytes", 0) * frac
                row["vectors_memkit"] = last.get("vectors_bytes", 0) * frac
        if row.get("tps_memkit") and row.get("tps_window"):
            row["memkit_over_window"] = row["tps_memkit"] / row["tps_window"]
            row["memkit_over_window_at"] = row["tps_at_memkit"] / row["tps_at_window"]
        if row.get("tps_memkit") and row.get("tps_full"):
            row["memkit_over_full"] = row["tps_memkit"] / row["tps_full"]
        rows.append(row)
    mib = lambda v: f"{v / 2**20:.0f} MiB"  # noqa: E731
    cols = [report.Column("length", "context")]
    for m in runs:
        cols.append(report.Column(f"tps_{m}", f"{m} tok/s", ".0f"))
    cols += [report.Column("memkit_over_window", "memkit/window", ".2f"),
             report.Column("memkit_over_full", "memkit/full", ".2f")]
    for m in runs:
        cols.append(report.Column(f"rss_{m}", f"{m} peak RSS", mib))
    cols.append(report.Column("pages_memkit", "memkit pages", mib))
    notes = [f"{repeats} repeat(s) per set-up, interleaved in shuffled order; figures are medians over repeats.",
             "tok/s = L / seconds to read the first L tokens (blockwise forward, no loss); memkit/window and "
             "memkit/full are ratios of those.",
             f"full attention runs only up to the model's {npos} positions.",
             f"memkit config: top_k={cfg.top_k}, window={cfg.window}, block={cfg.block_size}, "
             f"chunk={cfg.chunk_size}, backend={cfg.bank.backend}, kv dtype={cfg.kvstore.dtype}.",
             f"total wall time {time.perf_counter() - t_start:.0f}s."]
    raw = {m: [{k: v for k, v in r.items()} for r in rs] for m, rs in runs.items()}
    paths = report.write_results("context", rows, cols, "Throughput and peak memory vs context length",
                                 out_dir=args.out_dir, notes=notes, plots=_plots(rows, list(runs)),
                                 extra={"runs": raw, "config": cfg.to_dict(), "model": args.model or "SmolLM2-135M"})
    print()
    print(report.markdown_table(rows, cols))
    print("\n" + "\n".join(f"- {n}" for n in notes))
    print(f"\nJSON: {paths['json']}\nmarkdown: {paths['md']}\nplots: {paths.get('speed')}, {paths.get('memory')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memkit bench context", description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(report._jsonable(worker(json.loads(args.worker)))), flush=True)
        return 0
    from memkit.errors import MemkitError

    try:
        return run(args)
    except MemkitError as exc:
        print(f"memkit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
