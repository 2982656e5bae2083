"""``memkit eval ppl``: perplexity on a token range of long text, with and without memory.

The text is tokenized and the model reads tokens ``[0, end)`` block by block; only tokens
``[start, end)`` are scored, so every scored token has ``start`` tokens or more of context behind it.
Three set-ups read the same tokens (``--modes``):

* ``window`` - memkit with ``top_k=0``: attention sinks + the local window, no memory (the baseline);
* ``memkit`` - the memkit config (``--config``, or the defaults): window + retrieved chunks;
* ``full``   - the plain model with full attention, computed block by block with a K/V cache (exact),
  only when ``end`` fits the model's trained positions.

``gap_closed`` = (ppl_window - ppl_memkit) / (ppl_window - ppl_full): the share of what full attention
gains over the window that memory recovers (MemLong, Liu et al. 2024, report the same comparison).

``--ranges`` scores several ranges from one read of each text (per-token losses, then one mean per
range); full attention reads only as far as the last range inside the model's positions.

    memkit eval ppl --text hamlet.txt --start 4096 --end 8192
    memkit eval ppl --text *.txt --ranges 4k-8k,16k-20k
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from memkit.errors import InvalidInputError
from memkit.evaluation.common import (
    RssSampler,
    add_common_arguments,
    check_file,
    format_table,
    load_config_arg,
    load_for_args,
    make_runner,
    max_positions,
    parse_modes,
    read_text_file,
    set_threads,
    write_json,
)

__all__ = ["add_arguments", "run", "range_loss", "full_attention_loss", "token_losses", "full_attention_token_losses",
           "parse_ranges"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, modes_default="window,memkit,full")
    p.add_argument("--text", required=True, nargs="+", metavar="FILE",
                   help="one or more UTF-8 text files to score (each is scored separately)")
    p.add_argument("--window", type=int, default=None, metavar="N",
                   help="local window in tokens for the window and memkit modes (default: the config's, 512)")
    p.add_argument("--start", default="0", metavar="TOK",
                   help="first scored token; earlier tokens are context only, e.g. 4096 or 4k (default: 0)")
    p.add_argument("--end", default=None, metavar="TOK",
                   help="end of the scored range (exclusive), e.g. 8192 or 8k (default: end of the text)")
    p.add_argument("--ranges", default=None, metavar="LIST",
                   help="several scored ranges from one read, e.g. 4k-8k,16k-20k (k = 1024; end exclusive); "
                        "replaces --start/--end")
    p.add_argument("--out", default="memkit-ppl.json", metavar="FILE",
                   help="where to write the JSON result; '-' prints it to stdout (default: memkit-ppl.json)")


def range_loss(model: Any, ids: Any, start: int, *, progress: bool = True) -> float:
    """Mean next-token loss of tokens ``[start, N)`` of ``ids`` (1, N) through a memkit-wrapped model."""
    labels = ids.clone()
    labels[:, :start] = -100
    model.memory.reset()
    out = model(ids, labels=labels, progress=progress, logits_to_keep=1)
    return float(out.loss)


def full_attention_loss(model: Any, ids: Any, start: int, *, block: int = 512, progress: bool = True) -> float:
    """The same loss with the plain model and full attention, block by block with a K/V cache (exact)."""
    import torch

    losses = full_attention_token_losses(model, ids, block=block, progress=progress)  # (N,), NaN at 0
    return float(torch.nanmean(losses[max(start, 1):])) if ids.shape[1] > max(start, 1) else 0.0


def token_losses(model: Any, ids: Any, *, progress: bool = True) -> Any:
    """Per-token losses (N,) of ``ids`` (1, N) through a memkit-wrapped model; entry i scores token i (NaN at 0)."""
    model.memory.reset()
    out = model(ids, labels=ids, token_losses=True, progress=progress, logits_to_keep=1)
    return out.token_losses[0].cpu()


def full_attention_token_losses(model: Any, ids: Any, *, block: int = 512, progress: bool = True) -> Any:
    """The same per-token losses (N,) with the plain model and full attention (block by block, exact)."""
    import torch
    import torch.nn.functional as F
    from transformers import DynamicCache

    from memkit.integrations.hf_compat import cache_kwarg

    N = ids.shape[1]
    out_losses = torch.full((N,), float("nan"))
    cache = DynamicCache()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=N, desc="full attention", unit="tok", leave=False)
    with torch.no_grad():
        for s in range(0, N, block):
            e = min(N, s + block)
            out = model(input_ids=ids[:, s:e], use_cache=True, **{cache_kwarg(model): cache})  # cache grows in place
            t1 = min(e + 1, N)  # logits at column i predict token i + 1
            if t1 > s + 1:
                lg = out.logits[0, : t1 - 1 - s].float()
                out_losses[s + 1:t1] = F.cross_entropy(lg, ids[0, s + 1:t1], reduction="none").cpu()
            if bar is not None:
                bar.update(e - s)
    if bar is not None:
        bar.close()
    return out_losses


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """'4k-8k,16k-20k' -> [(4096, 8192), (16384, 20480)]; each start < end - 1, start >= 0."""
    from memkit.evaluation.haystack import parse_length

    out = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        a, sep, b = part.partition("-")
        if not sep:
            raise InvalidInputError(f"--ranges: {part!r} is not START-END (e.g. 4k-8k)")
        lo = 0 if a.strip() in ("0", "") else parse_length(a)
        hi = parse_length(b)
        if hi <= lo + 1:
            raise InvalidInputError(f"--ranges: {part!r} ends before it starts; write START-END, e.g. 4k-8k")
        out.append((lo, hi))
    if not out:
        raise InvalidInputError("--ranges is empty; e.g. --ranges 4k-8k,16k-20k")
    return out


def _score_ranges(m: Any, mode: str, name: str, ids: Any, ranges: list[tuple[int, int]], npos: int, config: Any,
                  progress: bool) -> list[dict[str, Any]]:
    """One read of one text through one set-up, scored on each range (``--ranges``)."""
    import torch

    recs: list[dict[str, Any]] = [{"text": name, "mode": mode, "start": lo, "end": hi,
                                   "scored_tokens": hi - max(lo, 1)} for lo, hi in ranges]
    N = ids.shape[1]
    for r in recs:
        if r["end"] > N:
            r["skipped"] = f"the text has only {N} tokens"
        elif mode == "full" and npos and r["end"] > npos:
            r["skipped"] = f"range ends at {r['end']} > the model's {npos} positions"
    inside = [r for r in recs if "skipped" not in r]
    if not inside:
        print(f"[{mode}] {name}: skipped ({recs[0]['skipped']})", flush=True)
        return recs
    stop = max(r["end"] for r in inside)
    t0 = time.perf_counter()
    with RssSampler() as rss:
        if mode == "full":
            block = config.block_size if config is not None else 512
            losses = full_attention_token_losses(m, ids[:, :stop], block=block, progress=progress)
        else:
            losses = token_losses(m, ids[:, :stop], progress=progress)
    sec = time.perf_counter() - t0
    for r in inside:
        seg = losses[max(r["start"], 1):r["end"]]
        loss = float(torch.nanmean(seg))
        r.update(loss=round(loss, 5), ppl=round(math.exp(loss), 4), seconds=round(sec, 2), read_tokens=stop,
                 tokens_per_s=round(stop / sec, 1), peak_rss_bytes=rss.peak)
        print(f"[{mode}] {name}: ppl {r['ppl']:.3f} over tokens {r['start']}-{r['end'] - 1} "
              f"(read {stop} tokens in {sec:.1f}s, {stop / sec:.0f} tok/s)", flush=True)
    return recs


def _tokens(tokenizer: Any, path: Path) -> list[int]:
    text = read_text_file(path, "text file")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if getattr(tokenizer, "add_bos_token", False) and bos is not None:
        ids = [bos, *ids]
    return list(ids)


def _score(m: Any, mode: str, name: str, ids: Any, start: int, npos: int, config: Any,
           progress: bool) -> dict[str, Any]:
    """One text through one set-up: loss, perplexity, time, peak RSS."""
    N = ids.shape[1]
    rec: dict[str, Any] = {"text": name, "mode": mode, "start": start, "end": N, "scored_tokens": N - max(start, 1)}
    if mode == "full" and npos and N > npos:
        rec["skipped"] = f"range ends at {N} > the model's {npos} positions"
        print(f"[full] {name}: skipped ({rec['skipped']})", flush=True)
        return rec
    t0 = time.perf_counter()
    with RssSampler() as rss:
        if mode == "full":
            block = config.block_size if config is not None else 512
            loss = full_attention_loss(m, ids, start, block=block, progress=progress)
        else:
            loss = range_loss(m, ids, start, progress=progress)
    sec = time.perf_counter() - t0
    rec.update(loss=round(loss, 5), ppl=round(math.exp(loss), 4), seconds=round(sec, 2),
               tokens_per_s=round(N / sec, 1), peak_rss_bytes=rss.peak)
    print(f"[{mode}] {name}: ppl {rec['ppl']:.3f} over tokens {start}-{N - 1} ({sec:.1f}s, {N / sec:.0f} tok/s)",
          flush=True)
    return rec


def run(args: argparse.Namespace) -> int:
    from memkit.evaluation.haystack import parse_length
    from memkit.models import resolve_model_path

    paths = [check_file(t, "text file") for t in args.text]
    modes = parse_modes(args.modes)
    start = parse_length(args.start) if str(args.start).strip() not in ("0", "") else 0
    end = parse_length(args.end) if args.end else None
    ranges = parse_ranges(args.ranges) if args.ranges else None
    if ranges is not None and (args.end or start):
        raise InvalidInputError("use either --ranges or --start/--end, not both")
    if ranges is not None:
        start, end = min(lo for lo, _ in ranges), max(hi for _, hi in ranges)
    if end is not None and end <= start + 1:
        raise InvalidInputError(f"--end ({end}) must be greater than --start ({start}) + 1")
    overrides = {"window": args.window} if args.window is not None else {}
    if args.window is not None and args.window < 1:
        raise InvalidInputError(f"--window must be >= 1, got {args.window}")
    config = load_config_arg(args.config, **overrides) if any(m != "full" for m in modes) else None
    resolve_model_path(args.model)  # a bad --model fails here, before torch and transformers load
    import torch

    set_threads(args.threads)
    model, tok = load_for_args(args)
    npos = max_positions(model)
    progress = not args.no_progress
    results: list[dict[str, Any]] = []
    docs: list[tuple[Path, Any]] = []
    for path in paths:
        assert path is not None
        token_ids = _tokens(tok, path)
        stop = len(token_ids) if end is None else end
        if ranges is not None:  # ranges beyond a text's end are skipped for that text, not an error
            stop = min(stop, len(token_ids))
            if all(hi > stop for _, hi in ranges):
                raise InvalidInputError(f"{path.name} has {len(token_ids)} tokens, fewer than the end of every range "
                                        "in --ranges; use a longer text or shorter ranges")
        if stop > len(token_ids):
            raise InvalidInputError(f"{path.name} has {len(token_ids)} tokens, fewer than --end {stop}; "
                                    "lower --end or use a longer text")
        if stop <= start + 1:
            raise InvalidInputError(f"{path.name} has {len(token_ids)} tokens; --start {start} leaves nothing to "
                                    "score")
        docs.append((path, torch.tensor([token_ids[:stop]], device=model.device)))
    for mode in modes:
        with make_runner(model, tok, mode, config, progress=progress) as m:
            for path, ids in docs:
                if ranges is None:
                    results.append(_score(m, mode, path.name, ids, start, npos, config, progress))
                else:
                    results.extend(_score_ranges(m, mode, path.name, ids, ranges, npos, config, progress))
    rows, gaps = [], []
    for path, _ids in docs:
        spans: list[tuple[int, int | None]] = list(ranges) if ranges else [(start, None)]
        for lo, hi in spans:
            by = {r["mode"]: r for r in results if r["text"] == path.name and "ppl" in r and r["start"] == lo}
            gap = None
            if {"window", "memkit", "full"} <= set(by) and by["window"]["ppl"] != by["full"]["ppl"]:
                gap = (by["window"]["ppl"] - by["memkit"]["ppl"]) / (by["window"]["ppl"] - by["full"]["ppl"])
                gaps.append(gap)
            label = path.name if ranges is None else f"{path.name} [{lo}, {hi})"
            rows.append([label, *[f"{by[m]['ppl']:.3f}" if m in by else "skip" for m in modes],
                         "-" if gap is None else f"{gap:.0%}"])
    table = format_table(["text", *[f"ppl {m}" for m in modes], "gap closed"], rows)
    print()
    print(table)
    cfg = config.to_dict() if config is not None else None
    where = write_json({"command": "eval ppl", "model": args.model or "bundled SmolLM2-135M-Instruct",
                        "model_max_positions": npos, "modes": modes, "start": start, "end": end,
                        "ranges": [list(r) for r in ranges] if ranges else None,
                        "config": cfg, "results": results,
                        "gap_closed": gaps, "mean_gap_closed": sum(gaps) / len(gaps) if gaps else None,
                        "table": table}, args.out)
    if where and where != "stdout":
        print(f"\nJSON: {where}")
    return 0
