"""``memkit eval passkey``: passkey retrieval accuracy over context lengths x depths.

A five-digit key is hidden at each depth of filler text of each length (see
:mod:`memkit.evaluation.haystack`; Mohtashami & Jaggi 2023), the model is asked for it with greedy
decoding, and an answer counts as correct when its first five-digit number is the key. Each
set-up (``--modes``: memkit, window-only, full attention) reads the same prompts. For memkit modes
the trace of the last retrieval tells whether the needle's chunk was among the retrieved chunks.

    memkit eval passkey --lengths 16k,32k,80k --depths 0.1,0.5,0.9
    memkit eval passkey --modes full --lengths 4k,16k           # the plain model alone

Default prompt: classic repeated filler with a plain instruction, the format SmolLM2-135M-Instruct
answers best with full attention (measured at 4k tokens over depths 0.1..0.9: classic+plain 5/5,
real text+chat 3/5, real text+plain 3/5, classic+chat 1/5).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from memkit.evaluation.common import (
    RssSampler,
    add_common_arguments,
    format_table,
    load_config_arg,
    load_for_args,
    make_runner,
    max_positions,
    memory_breakdown,
    parse_modes,
    set_threads,
    write_json,
)
from memkit.evaluation.haystack import FILLERS, PROMPTS, Haystack, build_haystack, check_key, extract_key, parse_depths, parse_lengths

__all__ = ["add_arguments", "run", "answer", "evaluate"]

DEFAULT_FILLER = "classic"
DEFAULT_PROMPT = "plain"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, modes_default="memkit")
    p.add_argument("--lengths", default="16k,32k,80k", metavar="LIST",
                   help="comma-separated prompt lengths in tokens; k = 1024 (default: 16k,32k,80k)")
    p.add_argument("--depths", default="0.1,0.5,0.9", metavar="LIST",
                   help="comma-separated depth fractions of the key inside the filler, 0=start 1=end "
                        "(default: 0.1,0.5,0.9)")
    p.add_argument("--filler", default=DEFAULT_FILLER, choices=FILLERS,
                   help="'classic' repeated sentences (the standard test); 'meadow' and 'ledger' other "
                        "repeated sentences (nature, bookkeeping); 'shuffled' varied sentences in random order; "
                        "'real' Shakespeare; 'kjv' King James verses "
                        f"(default: {DEFAULT_FILLER})")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, choices=PROMPTS,
                   help="'plain' instruction, 'chat' template of the tokenizer, or 'auto' (chat when the "
                        f"tokenizer has one) (default: {DEFAULT_PROMPT})")
    p.add_argument("--trials", type=int, default=1, metavar="N",
                   help="different keys per length x depth cell (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys (default: 0)")
    p.add_argument("--key", default=None, metavar="DIGITS",
                   help="the same five-digit key in every cell instead of keys drawn from --seed, e.g. to ask the "
                        "plain model at a length it fits for the key a long prompt missed (default: drawn per cell)")
    p.add_argument("--max-new-tokens", type=int, default=8, metavar="N",
                   help="tokens generated for the answer (default: 8)")
    p.add_argument("--full-max", default=None, metavar="LEN",
                   help="longest prompt run in 'full' mode (default: 2x the model's trained positions; full "
                        "attention beyond that costs minutes per prompt and is known to fail)")
    p.add_argument("--out", default="memkit-passkey.json", metavar="FILE",
                   help="where to write the JSON result; '-' prints it to stdout (default: memkit-passkey.json)")


def answer(model: Any, tokenizer: Any, hay: Haystack, *, max_new_tokens: int = 8) -> dict[str, Any]:
    """Ask ``model`` (wrapped or plain) for the key of ``hay``; memory is reset first."""
    import torch

    mem = getattr(model, "memory", None)
    if mem is not None:
        mem.reset()
    ids = torch.tensor([hay.input_ids], device=model.device)
    t0 = time.perf_counter()
    with torch.no_grad(), RssSampler() as rss:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=getattr(tokenizer, "eos_token_id", None))
    seconds = time.perf_counter() - t0
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    got = extract_key(text)
    rec: dict[str, Any] = {"tokens": len(hay), "depth": hay.depth, "key": hay.key, "answer": text.strip(),
                           "correct": got == hay.key, "seconds": round(seconds, 3),
                           "tokens_per_s": round(len(hay) / seconds, 1) if seconds else None}
    rec.update(rss_start_bytes=rss.start, peak_rss_bytes=rss.peak)
    if mem is not None:
        lo, hi = hay.needle_span
        trace = mem.trace()
        rec["needle_retrieved"] = any(int(t["span"][0]) < hi and int(t["span"][1]) > lo for t in trace)
        rec["retrieved_spans"] = [list(map(int, t["span"])) for t in trace]
        rec["bytes"] = memory_breakdown(model)
    return rec


def evaluate(model: Any, tokenizer: Any, lengths: list[int], depths: list[float], *, trials: int = 1,
             seed: int = 0, filler: str = DEFAULT_FILLER, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 8,
             key: str | None = None, log: Any = None) -> list[dict[str, Any]]:
    """One record per length x depth x trial (see :func:`answer`); ``key`` fixes the digits of every cell."""
    out = []
    for n in lengths:
        for d in depths:
            for t in range(trials):
                hay = build_haystack(tokenizer, n, d, key=key, filler=filler, prompt=prompt, seed=seed + t)
                rec = answer(model, tokenizer, hay, max_new_tokens=max_new_tokens)
                rec.update(length=n, trial=t)
                out.append(rec)
                if log is not None:
                    log(rec)
    return out


def _summary(results: list[dict[str, Any]], modes: list[str], lengths: list[int], depths: list[float]) -> str:
    headers = ["mode", "length", *[f"d={d:g}" for d in depths], "accuracy", "tok/s"]
    rows = []
    for mode in modes:
        for n in lengths:
            cell = [r for r in results if r["mode"] == mode and r["length"] == n]
            if not cell:
                continue
            if all(r.get("skipped") for r in cell):
                rows.append([mode, n, *["skip"] * len(depths), cell[0]["skipped"], "-"])
                continue
            marks = []
            for d in depths:
                rs = [r for r in cell if r["depth"] == d]
                marks.append(f"{sum(r['correct'] for r in rs)}/{len(rs)}")
            acc = sum(r["correct"] for r in cell) / len(cell)
            tps = sorted(r["tokens_per_s"] or 0 for r in cell)[len(cell) // 2]
            rows.append([mode, n, *marks, f"{acc:.0%}", f"{tps:.0f}"])
    return format_table(headers, rows)


def run(args: argparse.Namespace) -> int:
    from memkit.errors import InvalidInputError
    from memkit.evaluation.haystack import parse_length

    lengths = parse_lengths(args.lengths)
    depths = parse_depths(args.depths)
    modes = parse_modes(args.modes)
    if args.trials < 1 or args.max_new_tokens < 1:
        raise InvalidInputError("--trials and --max-new-tokens must be >= 1")
    if args.key is not None:
        check_key(args.key, "--key")
    config = load_config_arg(args.config) if any(m != "full" for m in modes) else None
    from memkit.models import resolve_model_path

    resolve_model_path(args.model)  # a bad --model fails here, before torch and transformers load
    set_threads(args.threads)
    model, tok = load_for_args(args)
    npos = max_positions(model)
    full_max = parse_length(args.full_max) if args.full_max else (2 * npos if npos else max(lengths))
    results: list[dict[str, Any]] = []

    def log(rec: dict[str, Any]) -> None:
        flag = "ok  " if rec["correct"] else "MISS"
        extra = f" needle_retrieved={rec['needle_retrieved']}" if "needle_retrieved" in rec else ""
        print(f"[{rec['mode']}] {flag} length={rec['length']} depth={rec['depth']:g} key={rec['key']} "
              f"answer={rec['answer']!r} {rec['seconds']:.1f}s{extra}", flush=True)

    header = {"command": "eval passkey", "model": args.model or "bundled SmolLM2-135M-Instruct",
              "model_max_positions": npos, "modes": modes, "lengths": lengths, "depths": depths,
              "filler": args.filler, "prompt": args.prompt, "trials": args.trials, "key": args.key,
              "config": config.to_dict() if config is not None else None}
    for mode in modes:
        run_lengths = [n for n in lengths if mode != "full" or n <= full_max]
        for n in lengths:
            if n not in run_lengths:
                reason = f"> {full_max} tokens (--full-max)"
                results.extend({"mode": mode, "length": n, "depth": d, "skipped": reason, "correct": False}
                               for d in depths)
        if not run_lengths:
            continue
        done: list[dict[str, Any]] = []

        def tagged(rec: dict[str, Any], mode: str = mode, done: list[dict[str, Any]] = done) -> None:
            rec["mode"] = mode
            log(rec)
            done.append(rec)
            if args.out not in (None, "-"):  # a long run cut short keeps what it measured
                write_json({**header, "partial": True, "results": results + done}, args.out)

        with make_runner(model, tok, mode, config, progress=not args.no_progress) as m:
            results.extend(evaluate(m, tok, run_lengths, depths, trials=args.trials, seed=args.seed,
                                    filler=args.filler, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                                    key=args.key, log=tagged))
    table = _summary(results, modes, lengths, depths)
    print()
    print(table)
    where = write_json({**header, "results": results, "table": table}, args.out)
    if where and where != "stdout":
        print(f"\nJSON: {where}")
    return 0
