"""``memkit bench context``: reading speed, decode latency and peak memory against context length.

Each set-up reads the same real text (Shakespeare's longest plays, concatenated) from token 0 up to the
longest length asked, in its own worker process (so peak RSS belongs to that set-up alone):

* ``memkit``  - the model wrapped with the memkit config (MemLong-style retrieval of ``top_k`` chunks);
* ``longmem`` - the same config with ``style="longmem"`` (with ``--styles memlong,longmem``);
* ``window``  - the memlong wrap with ``top_k=0`` (attention sinks + local window, no retrieval);
* ``full``    - chunked prefill: the plain model reading block by block into a growing K/V cache
  (``DynamicCache``), only up to the model's trained positions (8k for SmolLM2);
* ``oneshot`` - one-shot full attention: the plain model called once on the first L tokens
  (``model(ids, logits_to_keep=1)``, what a user who fits the input in the window does), within its positions.

The wrapped set-ups read by ``--paths``: ``ingest`` (set-ups ``memkit``, ``window``, ``longmem``) or ``forward``
(``memkit_forward``, ...: one ``model(ids, logits_to_keep=1)`` call on the first L tokens, memory reset before it,
the way a user calls the wrapped model).

Ingest set-ups read the text with ``model.memory.ingest`` in segments that end at each reported length
L, so at every L the memory holds the chunks of all L tokens (the way a user reads a document, then asks).
The full set-up reads it block by block into its cache. Forward and oneshot set-ups call the model once per
length, from scratch. Every reading call is timed by the wall clock (its 1-minute load average is kept beside
it), and a forward hook on the decoder times every block and samples RSS, so one run gives for every L:

* ``tok/s`` - L / wall-clock seconds to read the first L tokens, and ``tok/s @L`` (ingest and full: median of
  the last four blocks);
* ``decode ms/token`` - after L tokens were read, ``generate`` gets the next ``sinks + window + chunk``
  tokens of the text as its prompt (enough to fill the local context, so each decode step attends what
  it would deep inside a long call: sinks, the retrieved memory and a full window) and produces
  ``--decode-tokens`` tokens greedily; a logits processor stamps every step, and the figure is the
  median time between consecutive steps (each step = one decoder forward of one token + ``generate``'s
  own per-token work). ``first ms`` is the prompt's prefill + retrieval + the first token. The decode
  ratio divides ms/token at L by ms/token at 1k (or the shortest length). The full set-up decodes the
  same prompt from its cache of L tokens (``generate`` with the cache), then drops it again;
* a byte breakdown: model weights, local K/V (sinks + window + block, all layers, in the model's dtype),
  the retrieved K/V a block attends, the memory's K/V pages (from the K/V store's stats, every tier) and
  the bank's vectors (chunks x dim x 4 bytes) at L, next to the peak RSS up to L. ``RSS - memory`` is
  peak RSS minus pages and vectors: flat in L when memory is the only thing that grows.

The set-ups run ``--repeats`` times, repeat r in one order and repeat r+1 in the reverse order (so each
compared pair alternates which runs first), and each figure is the median over repeats; a ratio a/b (memkit /
window, memkit / full, memkit / oneshot, ...) is the median of the per-repeat ratios, with their range.

    memkit bench context --quick                        # 1k..8k, three set-ups, 3 repeats
    memkit bench context                                # 1k..80k
    memkit bench context --styles memlong,longmem       # LongMem-style memory as a fourth set-up
    memkit bench context --lengths 8k --modes memkit,window,full,oneshot --paths ingest,forward --repeats 3
                                                        # both full-attention baselines, both reading paths

Results: ``benchmarks/results/context.json``, ``context.md`` and ``context_speed.png``,
``context_decode.png``, ``context_memory.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from . import report

__all__ = ["add_arguments", "run", "main", "worker", "summarize_run", "setups_for", "STYLES"]

DEFAULT_LENGTHS = "1k,4k,8k,16k,32k,64k,80k"
QUICK_LENGTHS = "1k,2k,4k,8k"
STYLES = ("memlong", "longmem")
WRAPPED = ("memkit", "longmem", "window")
PLAIN = ("full", "oneshot")  # the plain model: chunked prefill into a DynamicCache, or one call
MODES = ("memkit", "window", "full", "oneshot")
PATHS = ("ingest", "forward")
# (set-up, baseline) pairs whose speed ratio is reported per repeat (median and range), when both ran
PAIRS = (("memkit", "window"), ("memkit", "full"), ("memkit", "oneshot"), ("memkit_forward", "window_forward"),
         ("memkit_forward", "full"), ("memkit_forward", "oneshot"), ("memkit_forward", "memkit"))
LABELS = {"memkit": "memkit `memory.ingest`", "window": "window-only `memory.ingest`",
          "longmem": "LongMem `memory.ingest`", "memkit_forward": "memkit `model(ids)`",
          "window_forward": "window-only `model(ids)`", "longmem_forward": "LongMem `model(ids)`",
          "full": "chunked prefill (plain model, blocks into a DynamicCache)",
          "oneshot": "one-shot full attention (plain model, one call)"}


def split_setup(name: str) -> tuple[str, str]:
    """``memkit_forward`` -> ("memkit", "forward"); ``window`` -> ("window", "ingest"); plain set-ups: ("full", "")."""
    if name in PLAIN:
        return name, ""
    if name.endswith("_forward"):
        return name[: -len("_forward")], "forward"
    return name, "ingest"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="PATH",
                   help="local HF model folder, folder with a .gguf file, or a .gguf file (default: bundled SmolLM2)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="memkit config (YAML/JSON) for the memkit, longmem and window set-ups (default: memkit's "
                        "defaults)")
    p.add_argument("--lengths", default=None, metavar="LIST",
                   help=f"context lengths to report, k = 1024 tokens (default: {DEFAULT_LENGTHS}; "
                        f"--quick: {QUICK_LENGTHS})")
    p.add_argument("--modes", default="memkit,window,full", metavar="LIST",
                   help="set-ups: memkit (memory, one per --styles), window (top_k=0), full (the plain model reading "
                        "block by block into a DynamicCache: chunked prefill), oneshot (the plain model called once on "
                        "the whole input); full and oneshot only within the model's positions (default: "
                        "memkit,window,full)")
    p.add_argument("--paths", default="ingest", metavar="LIST",
                   help="how the wrapped set-ups read: ingest (model.memory.ingest in segments ending at each "
                        "length) and/or forward (one model(ids, logits_to_keep=1) call on the first L tokens, memory "
                        "empty before it; set-ups memkit_forward, window_forward) (default: ingest)")
    p.add_argument("--styles", default="memlong", metavar="LIST",
                   help="memory styles the memkit set-up runs in: memlong (set-up 'memkit') and/or longmem "
                        "(set-up 'longmem', LongMem-style gated memory, untrained) (default: memlong)")
    p.add_argument("--caps", default=None, metavar="LIST",
                   help="longest length per set-up, e.g. window=16k,longmem=16k, to save time on set-ups whose cost "
                        "per token does not depend on length (default: none; full is always capped at the model's "
                        "positions)")
    p.add_argument("--decode-tokens", type=int, default=16, metavar="N",
                   help="tokens generated after each length to time decoding; 0 skips decoding (default: 16)")
    p.add_argument("--repeats", type=int, default=None, metavar="N",
                   help="runs of each set-up; repeat r runs them all in one order, repeat r+1 in the reverse order, "
                        "so every compared pair alternates which goes first; figures are medians, ratios the median "
                        "and range of the per-repeat ratios (default: 1; --quick: 3)")
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
    """Forward hooks on the decoder: per-block seconds and peak RSS (a sampling thread catches in-block peaks).

    ``active`` False (while decoding) leaves steps unrecorded; the RSS sampler keeps running.
    """

    def __init__(self, module: Any, bar: Any = None) -> None:
        import threading

        self.records: list[dict[str, float]] = []
        self.tokens = 0
        self.active = True
        self.bar = bar
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

    def peak(self) -> int:
        """Peak RSS since the last recorded block (or since the clock started)."""
        return max(self._peak, report.rss_bytes())

    def _pre(self, module: Any, args: Any, kwargs: Any) -> None:
        self._t0 = time.perf_counter()

    def _post(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        if not self.active:
            return
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        n = int(ids.shape[-1])
        self.tokens += n
        rss = report.rss_bytes()
        self.records.append({"end": self.tokens, "seconds": time.perf_counter() - self._t0,
                             "rss": max(self._peak, rss)})
        self._peak = rss
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for h in self._handles:
            h.remove()
        if self.bar is not None:
            self.bar.close()


def _decode(model: Any, prompt: Any, n_new: int, pad: int | None, **kwargs: Any) -> dict[str, float]:
    """Greedy ``generate`` of ``n_new`` tokens after ``prompt``; per-step times from a logits processor."""
    import numpy as np
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamps(LogitsProcessor):
        def __init__(self) -> None:
            self.t: list[float] = []

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            self.t.append(time.perf_counter())
            return scores

    stamps = Stamps()
    t0 = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, min_new_tokens=n_new,
                   do_sample=False, logits_processor=LogitsProcessorList([stamps]), pad_token_id=pad, **kwargs)
    steps = np.diff(stamps.t)
    return {"first_token_ms": (stamps.t[0] - t0) * 1e3 if stamps.t else math.nan,
            "decode_ms": float(np.median(steps)) * 1e3 if len(steps) else math.nan, "decode_steps": len(steps)}


def _truncate_cache(cache: Any, n: int) -> None:
    """Drop every cached position from ``n`` on (what a decode added), in place."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            layer.keys = layer.keys[..., :n, :]
            layer.values = layer.values[..., :n, :]


def _kv_geometry(model: Any) -> tuple[int, int, int, int]:
    """(layers, kv heads, head dim, bytes per element) of the model's attention."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0))
    heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0))
    kv = int(getattr(cfg, "num_key_value_heads", 0) or heads)
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0))
    hd = int(getattr(cfg, "head_dim", 0) or hidden // max(heads, 1))
    elem = next(model.parameters()).element_size()
    return layers, kv, hd, elem


def setup_config(cfg: Any, setup: str) -> Any:
    """The memkit config of a wrapped set-up: memkit as given, window with top_k=0, longmem with its style."""
    if setup == "window":
        return cfg.replace(top_k=0, style="memlong")
    if setup == "longmem":
        return cfg.replace(style="longmem")
    return cfg.replace(style="memlong")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Read up to ``max(spec['lengths'])`` tokens in set-up ``spec['mode']``; decode after each length."""
    import torch

    from memkit.evaluation.common import max_positions, memory_bytes
    from memkit.models import load_model

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.set_grad_enabled(False)
    model, tok = load_model(spec.get("model"))
    lengths = sorted(int(x) for x in spec["lengths"])
    n = lengths[-1]
    mode = spec["mode"]
    base_mode, path = split_setup(mode)
    plain = base_mode in PLAIN
    fresh = base_mode == "oneshot" or path == "forward"  # one call from scratch per length, as a user calls it
    n_dec = int(spec.get("decode_tokens", 16))
    progress = bool(spec.get("progress", True))
    from memkit.config import load_config

    cfg = load_config(spec.get("config") or None, progress=False)
    if not plain:
        cfg = setup_config(cfg, base_mode)
    block = cfg.block_size
    prompt_len = cfg.sink_tokens + cfg.window + cfg.chunk_size
    all_ids = torch.tensor([_text_ids(tok, n + prompt_len)])
    ids = all_ids[:, :n]
    pad = getattr(tok, "eos_token_id", None)
    pad = 0 if pad is None else pad
    layers, kvh, hd, elem = _kv_geometry(model)
    per_token = 2 * kvh * hd * elem  # K and V of one token in one layer
    out: dict[str, Any] = {"mode": mode, "tokens": n, "lengths": lengths, "max_positions": max_positions(model),
                           "threads": torch.get_num_threads(), "block_size": block, "prompt_tokens": prompt_len,
                           "decode_tokens": n_dec, "style": None if plain else cfg.style, "fresh": fresh,
                           "path": None if plain else path,
                           "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters())
                           + sum(b.numel() * b.element_size() for b in model.buffers())}
    target = model
    if plain:
        model(input_ids=ids[:, : min(n, block)], logits_to_keep=1)  # warm-up (untimed)
    else:
        import memkit

        target = memkit.wrap(model, cfg, tokenizer=tok)
        # Warm-up (untimed): loads the retriever, fills lazy state and runs generate once.
        if path == "forward":
            target(ids[:, : min(n, block)], logits_to_keep=1)
        else:
            target.memory.ingest(ids[:, : min(n, block)], progress=False)
        if n_dec:
            _decode(target, all_ids[:, :min(64, n)], 2, pad)
        target.memory.reset()
        mem_layers = target.memory.stats().get("memory_layers") or []
        out["local_kv_bytes"] = (cfg.sink_tokens + cfg.window + block) * layers * per_token
        out["retrieved_kv_bytes"] = cfg.top_k * cfg.chunk_size * len(mem_layers) * per_token \
            if cfg.style == "memlong" else None
    base_rss = report.rss_bytes()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"{mode} reading", unit="tok", leave=False)
    clock = _BlockClock(model.base_model, bar)
    clock.active = not fresh  # per-block records only where the blocks of all lengths form one read
    checkpoints: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        cache = None
        if plain:
            from transformers import DynamicCache

            from memkit.integrations.hf_compat import cache_kwarg

            cache = DynamicCache()
        pos = 0
        for L in lengths:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            start = time.perf_counter()
            if base_mode == "full":  # chunked prefill: block by block into one growing cache
                for s in range(pos, L, block):
                    e = min(L, s + block)
                    model(input_ids=ids[:, s:e], use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
            elif base_mode == "oneshot":  # the plain model called once on the first L tokens
                cache = DynamicCache()
                model(input_ids=ids[:, :L], use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
            elif path == "forward":  # the wrapped model called once on the first L tokens, memory empty
                target.memory.reset()
                target(ids[:, :L], logits_to_keep=1)
            else:
                target.memory.ingest(ids[:, pos:L], progress=False)
            read_seconds = time.perf_counter() - start
            if bar is not None and fresh:
                bar.update(L - pos)
            pos = L
            cp: dict[str, Any] = {"length": L, "peak_rss": clock.peak(), "read_seconds": read_seconds,
                                  "load_avg": [load, os.getloadavg()[0] if hasattr(os, "getloadavg") else None]}
            if plain:
                assert cache is not None
                cp["kv_cache_bytes"] = sum(int(t.numel() * t.element_size()) for layer in cache.layers
                                           for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                                           if t is not None)
            else:
                cp.update(memory_bytes(target))
            if n_dec:
                clock.active = False
                try:
                    if plain:
                        cp.update(_decode(model, all_ids[:, :L + prompt_len], n_dec, pad, **{cache_kwarg(model): cache}))
                        _truncate_cache(cache, L)
                    else:
                        cp.update(_decode(target, all_ids[:, L:L + prompt_len], n_dec, pad))
                finally:
                    clock.active = not fresh
            cp["peak_rss"] = max(cp["peak_rss"], clock.peak())  # the decode at L counts towards L's peak
            cp["rss_after"] = report.rss_bytes()
            checkpoints.append(cp)
    finally:
        clock.close()
    out.update(seconds=time.perf_counter() - t0, base_rss=base_rss, blocks=clock.records, checkpoints=checkpoints)
    return out


# ---------------------------------------------------------------------- parent: plan, run, summarise
def summarize_run(run: dict[str, Any], lengths: list[int]) -> dict[int, dict[str, float]]:
    """Per length L: tok/s to reach L, steady tok/s at L (median of the last 4 blocks), peak RSS up to L,
    and what the worker measured at L (decode ms/token, pages, vectors...)."""
    blocks = run["blocks"]
    cps = {int(c["length"]): c for c in run.get("checkpoints", [])}
    out: dict[int, dict[str, float]] = {}
    for L in lengths:
        cp = cps.get(L, {})
        if run.get("fresh"):  # one call on the first L tokens: its wall time
            if not cp.get("read_seconds"):
                continue
            rec: dict[str, Any] = {"tps": L / cp["read_seconds"], "tps_at": None, "peak_rss": cp.get("peak_rss", 0),
                                   "seconds": cp["read_seconds"]}
        else:
            upto = [b for b in blocks if b["end"] <= L]
            if not upto or upto[-1]["end"] < L:
                continue
            secs = sum(b["seconds"] for b in upto)
            wall = [c["read_seconds"] for c in run.get("checkpoints", []) if c["length"] <= L and "read_seconds" in c]
            if wall and len(wall) == len([c for c in run.get("checkpoints", []) if c["length"] <= L]):
                secs = sum(wall)  # wall time of the reading calls (decoder forwards and memkit's own work)
            tail = upto[-4:]
            prev = [upto[i - 1]["end"] if i > 0 else 0 for i in range(len(upto))][-4:]
            rates = [(b["end"] - p) / b["seconds"] for b, p in zip(tail, prev) if b["seconds"] > 0]
            rec = {"tps": L / secs, "tps_at": statistics.median(rates), "peak_rss": max(b["rss"] for b in upto),
                   "seconds": secs}
            rec["peak_rss"] = max(rec["peak_rss"], cp.get("peak_rss", 0))
        for key in ("decode_ms", "first_token_ms", "pages_bytes", "vectors_bytes", "chunks", "kv_cache_bytes"):
            if cp.get(key) is not None:
                rec[key] = cp[key]
        out[L] = rec
    return out


def _run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "memkit.bench.context", "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"context worker {spec['mode']} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else None


def _plots(rows: list[dict[str, Any]], setups: list[str], weights: float | None) -> dict[str, Any]:
    def line(plt: Any, key: str, ylabel: str, title: str, scale: float = 1.0) -> Any:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for m in setups:
            pts = [(r["length"], r[f"{key}_{m}"] / scale) for r in rows if r.get(f"{key}_{m}")]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_xscale("log", base=2)
        ticks = [r["length"] for r in rows]
        ax.set_xticks(ticks, [f"{t // 1024}k" if t % 1024 == 0 else str(t) for t in ticks])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        return fig, ax

    def speed(plt: Any) -> Any:
        fig, ax = line(plt, "tps", "tokens/s (reading the first L tokens)", "Reading throughput vs context length")
        ax.legend()
        return fig

    def decode(plt: Any) -> Any:
        if not any(r.get(f"decode_{m}") for r in rows for m in setups):
            return None
        fig, ax = line(plt, "decode", "ms per generated token (median)", "Decode latency vs context length")
        ax.set_ylim(bottom=0)
        ax.legend()
        return fig

    def memory(plt: Any) -> Any:
        fig, ax = line(plt, "rss", "MiB", "Peak memory vs context length", 2**20)
        for ln in ax.get_lines():
            ln.set_label(f"{ln.get_label()} peak RSS")
        for m in setups:
            pts = [(r["length"], (r[f"pages_{m}"] + (r.get(f"vectors_{m}") or 0)) / 2**20) for r in rows
                   if r.get(f"pages_{m}") is not None]
            if pts and m != "window":
                ax.plot(*zip(*pts), marker="x", linestyle="--", label=f"{m} pages + vectors")
        if weights:
            ax.axhline(weights / 2**20, color="grey", linestyle=":", label="model weights")
        ax.legend(fontsize=8)
        return fig

    return {"speed": speed, "decode": decode, "memory": memory}


def setups_for(modes: list[str], styles: list[str], paths: list[str] | tuple[str, ...] = ("ingest",)) -> list[str]:
    """Set-up names for ``--modes`` x ``--styles`` x ``--paths``: memkit (memlong), longmem, window (each with a
    ``_forward`` twin for the forward path), full, oneshot."""
    out: list[str] = []
    suffixes = [{"ingest": "", "forward": "_forward"}[p] for p in paths]
    for m in modes:
        if m == "memkit":
            out += [{"memlong": "memkit", "longmem": "longmem"}[s] + x for x in suffixes for s in styles]
        elif m == "window":
            out += ["window" + x for x in suffixes]
        else:
            out.append(m)
    return list(dict.fromkeys(out))


def pair_ratios(runs: dict[str, list[dict[str, Any]]], L: int) -> dict[str, dict[str, float]]:
    """Speed ratios tok/s(a) / tok/s(b) at length L per repeat (repeat r of a against repeat r of b): median,
    min, max and count for every pair of :data:`PAIRS` that both ran at L. Above 1 = a reads faster."""
    out: dict[str, dict[str, float]] = {}
    for a, b in PAIRS:
        if a not in runs or b not in runs:
            continue
        ratios = []
        for ra, rb in zip(runs[a], runs[b]):
            sa, sb = summarize_run(ra, [L]).get(L), summarize_run(rb, [L]).get(L)
            if sa and sb:
                ratios.append(sa["tps"] / sb["tps"])
        if ratios:
            out[f"{a}_over_{b}"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                                    "n": len(ratios)}
    return out


def _memory(setup: str) -> bool:
    """A set-up whose memory holds retrieved chunks (memkit, longmem; either path)."""
    return split_setup(setup)[0] in ("memkit", "longmem")


def _spread(v: Any) -> str:
    return f"{v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})" if v["n"] > 1 else f"{v['median']:.2f}"


def parse_styles(text: str) -> list[str]:
    from memkit.evaluation.common import parse_choices

    return parse_choices("--styles", text, STYLES, "style")


def parse_caps(text: str | None) -> dict[str, int]:
    """``window=16k,longmem=16k`` -> {'window': 16384, 'longmem': 16384}."""
    from memkit.errors import InvalidInputError
    from memkit.evaluation.haystack import parse_length

    out: dict[str, int] = {}
    for item in (t.strip() for t in str(text or "").split(",")):
        if not item:
            continue
        name, eq, length = item.partition("=")
        if not eq or name.strip() not in ("memkit", "longmem", "window", "full"):
            raise InvalidInputError(f"--caps {item!r}: write SETUP=LENGTH with SETUP one of memkit, longmem, window, "
                                    "full, e.g. window=16k")
        out[name.strip()] = parse_length(length)
    return out


def _accounting(rows: list[dict[str, Any]], setups: list[str], lengths: list[int]) -> list[dict[str, Any]]:
    """Per wrapped set-up: peak RSS growth from a short length (8k if measured) to the longest, vs memory growth."""
    out = []
    hi = max(lengths)
    lo = 8192 if 8192 in lengths and 8192 < hi else min(lengths)
    by = {r["length"]: r for r in rows}
    for m in setups:
        if m == "full" or lo == hi:
            continue
        a, b = by.get(lo, {}), by.get(hi, {})
        if a.get(f"rss_{m}") is None or b.get(f"rss_{m}") is None or b.get(f"pages_{m}") is None:
            continue
        mem_a = (a.get(f"pages_{m}") or 0) + (a.get(f"vectors_{m}") or 0)
        mem_b = (b.get(f"pages_{m}") or 0) + (b.get(f"vectors_{m}") or 0)
        rss_diff, mem_diff = b[f"rss_{m}"] - a[f"rss_{m}"], mem_b - mem_a
        out.append({"setup": m, "from": lo, "to": hi, "rss_diff": rss_diff, "memory_diff": mem_diff,
                    "excess": rss_diff - mem_diff})
    return out


def run(args: argparse.Namespace) -> int:
    from memkit.errors import InvalidInputError
    from memkit.evaluation.common import load_config_arg, parse_choices
    from memkit.evaluation.haystack import parse_lengths

    lengths = sorted(set(parse_lengths(args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS))))
    setups = setups_for(parse_choices("--modes", args.modes, MODES, "mode"), parse_styles(args.styles),
                        parse_choices("--paths", args.paths, PATHS, "path"))
    caps = parse_caps(args.caps)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 1)
    if repeats < 1:
        raise InvalidInputError(f"--repeats must be >= 1, got {repeats}")
    if args.decode_tokens < 0:
        raise InvalidInputError(f"--decode-tokens must be >= 0, got {args.decode_tokens}")
    if args.threads is not None and args.threads < 1:
        raise InvalidInputError(f"--threads must be >= 1, got {args.threads}")
    cfg = load_config_arg(args.config)
    from memkit.models import load_model, resolve_model_path

    resolve_model_path(args.model)  # a bad --model fails here, before torch and transformers load

    model, _tok = load_model(args.model)  # fails fast on a bad folder; converts a GGUF once
    from memkit.evaluation.common import max_positions

    npos = max_positions(model)
    del model, _tok
    plan = []
    for m in setups:
        todo = [L for L in lengths if (m not in PLAIN or not npos or L <= npos) and L <= caps.get(m, L)]
        if todo:
            plan.append((m, todo))
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m, _ in plan}
    t_start = time.perf_counter()
    machine = report.machine_info()  # at the start: its load average and commit are those of the run, not of its end
    loads: list[float] = []
    for rep in range(repeats):
        order = list(plan) if rep % 2 == 0 else list(reversed(plan))  # ABC, CBA, ABC: pairs alternate
        for m, todo in order:
            print(f"[bench context] repeat {rep + 1}/{repeats}: {m} over {todo[-1]} tokens", flush=True)
            spec = {"mode": m, "lengths": todo, "model": args.model, "config": cfg.to_dict(),
                    "threads": args.threads, "progress": not args.no_progress, "decode_tokens": args.decode_tokens}
            res = _run_worker(spec)
            runs[m].append(res)
            loads += [x for c in res.get("checkpoints", []) for x in (c.get("load_avg") or []) if x is not None]
            last = res["checkpoints"][-1] if res.get("checkpoints") else {}
            dec = f", decode {last['decode_ms']:.1f} ms/token at {todo[-1]}" if last.get("decode_ms") else ""
            print(f"[bench context]   {m}: {todo[-1] / res['seconds']:.0f} tok/s overall, {res['seconds']:.1f}s{dec}",
                  flush=True)
    base_len = 1024 if 1024 in lengths else min(lengths)
    rows = []
    for L in lengths:
        row: dict[str, Any] = {"length": L}
        for m in runs:
            per = [s[L] for s in (summarize_run(r, [L]) for r in runs[m]) if L in s]
            if not per:
                continue
            row[f"tps_{m}"] = statistics.median(p["tps"] for p in per)
            row[f"tps_at_{m}"] = _median([p["tps_at"] for p in per])
            row[f"rss_{m}"] = statistics.median(p["peak_rss"] for p in per)
            row[f"decode_{m}"] = _median([p.get("decode_ms") for p in per])
            row[f"first_{m}"] = _median([p.get("first_token_ms") for p in per])
            if m in PLAIN:
                row[f"kvcache_{m}"] = _median([p.get("kv_cache_bytes") for p in per])
            else:
                row[f"pages_{m}"] = _median([p.get("pages_bytes") for p in per])
                row[f"vectors_{m}"] = _median([p.get("vectors_bytes") for p in per])
                if row[f"pages_{m}"] is not None:
                    row[f"other_{m}"] = row[f"rss_{m}"] - row[f"pages_{m}"] - (row[f"vectors_{m}"] or 0)
        ratios = pair_ratios(runs, L)
        for key, v in ratios.items():
            row[key] = v["median"]
            row[f"{key}_range"] = [v["min"], v["max"]]
            row[f"{key}_text"] = _spread(v)
        if row.get("tps_at_memkit") and row.get("tps_at_window"):
            row["memkit_over_window_at"] = row["tps_at_memkit"] / row["tps_at_window"]
        rows.append(row)
    base = next((r for r in rows if r["length"] == base_len), {})
    for row in rows:
        for m in runs:
            if row.get(f"decode_{m}") and base.get(f"decode_{m}"):
                row[f"decode_ratio_{m}"] = row[f"decode_{m}"] / base[f"decode_{m}"]
    mib = lambda v: f"{v / 2**20:,.0f} MiB"  # noqa: E731
    cols = [report.Column("length", "context", ",")]
    cols += [report.Column(f"tps_{m}", f"{m} tok/s", ".0f") for m in runs]
    present = [f"{a}_over_{b}" for a, b in PAIRS if a in runs and b in runs]
    cols += [report.Column(f"{k}_text", k.replace("_over_", "/")) for k in present]
    if args.decode_tokens:
        cols += [report.Column(f"decode_{m}", f"{m} decode ms/tok", ".1f") for m in runs]
        cols += [report.Column(f"decode_ratio_{m}", f"{m} decode x{base_len // 1024 or base_len}"
                               f"{'k' if base_len >= 1024 else ''}", ".2f") for m in runs if _memory(m)]
    cols += [report.Column(f"rss_{m}", f"{m} peak RSS", mib) for m in runs]
    cols += [report.Column(f"pages_{m}", f"{m} pages", mib) for m in runs if _memory(m)]
    cols += [report.Column(f"vectors_{m}", f"{m} vectors", lambda v: f"{v / 2**10:,.0f} KiB")
             for m in runs if _memory(m)]
    cols += [report.Column(f"other_{m}", f"{m} RSS - memory", mib) for m in runs if _memory(m)]
    first = {m: rs[0] for m, rs in runs.items() if rs}
    acct = _accounting(rows, list(runs), lengths)
    load_text = f"; 1-minute load average {min(loads):.2f}-{max(loads):.2f} while reading" if loads else ""
    notes = [f"{repeats} repeat(s) per set-up, each in its own process; repeat r runs the set-ups in one order and "
             f"repeat r+1 in the reverse order; figures are medians over repeats{load_text}.",
             "set-ups: " + "; ".join(f"{m} = {LABELS.get(m, m)}" for m in runs) + ".",
             "tok/s = L / wall-clock seconds of the reading calls (ingest set-ups and full: segments ending at each L, "
             "one read; forward set-ups and oneshot: one call on the first L tokens, from empty memory / an empty "
             "cache). a/b = tok/s of a over tok/s of b (above 1: a reads faster), the median of the per-repeat "
             "ratios with their range in brackets.",
             f"decode ms/tok: median time per generated token ({args.decode_tokens} greedy tokens) after L tokens were "
             f"read, from a prompt of the next sinks + window + chunk tokens; decode xN = ms/tok at L / ms/tok at "
             f"{base_len}.",
             f"full and oneshot run only up to the model's {npos} positions"
             + "".join(f"; {m} up to {c:,} tokens (--caps)" for m, c in caps.items()) + ".",
             f"memkit config: top_k={cfg.top_k}, window={cfg.window}, block={cfg.block_size}, sinks={cfg.sink_tokens}, "
             f"chunk={cfg.chunk_size}, style={cfg.style} {cfg.style_block().to_dict()}, backend={cfg.bank.backend}, "
             f"kv dtype={cfg.kvstore.dtype}, retriever={cfg.retriever}.",
             "RSS - memory = peak RSS minus the memory's K/V pages and bank vectors at L."]
    for m, r in first.items():
        parts = [f"weights {report_bytes(r.get('weights_bytes'))}"]
        if r.get("local_kv_bytes") is not None:
            parts.append(f"local K/V (sinks + window + block) {report_bytes(r['local_kv_bytes'])}")
        if r.get("retrieved_kv_bytes") is not None:
            parts.append(f"retrieved K/V per block {report_bytes(r['retrieved_kv_bytes'])}")
        notes.append(f"{m} byte breakdown: " + ", ".join(parts) + "; pages and vectors per length in the table.")
    for a in acct:
        notes.append(f"{a['setup']}: peak RSS at {a['to']:,} exceeds the {a['from']:,} figure by "
                     f"{report_bytes(a['rss_diff'])}; its pages + vectors grew by {report_bytes(a['memory_diff'])} "
                     f"(difference {report_bytes(a['excess'])}).")
    notes.append(f"total wall time {time.perf_counter() - t_start:.0f}s.")
    raw = {m: list(rs) for m, rs in runs.items()}
    weights = next((r.get("weights_bytes") for r in first.values()), None)
    paths = report.write_results("context", rows, cols, "Reading speed, decode latency and peak memory vs context length",
                                 machine, out_dir=args.out_dir, notes=notes, plots=_plots(rows, list(runs), weights),
                                 extra={"runs": raw, "config": cfg.to_dict(), "model": args.model or "SmolLM2-135M",
                                        "accounting": acct, "decode_base_length": base_len,
                                        "setups": list(runs), "labels": {m: LABELS.get(m, m) for m in runs},
                                        "repeats": repeats, "load_avg_range": [min(loads), max(loads)] if loads
                                        else None})
    print()
    print(report.markdown_table(rows, cols))
    print("\n" + "\n".join(f"- {n}" for n in notes))
    print(f"\nJSON: {paths['json']}\nmarkdown: {paths['md']}\nplots: "
          + ", ".join(str(paths[k]) for k in ("speed", "decode", "memory") if k in paths))
    return 0


def report_bytes(n: float | None) -> str:
    """Bytes as MiB/GiB text (signed), '—' for None."""
    if n is None:
        return "—"
    a = abs(n)
    return f"{n / 2**30:.2f} GiB" if a >= 2**30 else f"{n / 2**20:.1f} MiB" if a >= 2**20 else f"{n / 2**10:.0f} KiB"


def main(argv: list[str] | None = None) -> int:
    return report.bench_main("memkit bench context", __doc__ or "", add_arguments, run, "--worker", worker, argv)

if __name__ == "__main__":
    sys.exit(main())
