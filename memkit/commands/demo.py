"""``memkit demo`` (``make demo``): SmolLM2 reads an 80k-token haystack through memkit and finds the passkey.

SmolLM2-135M-Instruct was trained on 8k positions; with full attention it cannot answer from 16k
tokens. Wrapped by memkit with the default config, it ingests a haystack ten times that long (a
five-digit key hidden in filler, see :mod:`memkit.evaluation.haystack`) block by block into chunk
memory, then answers the question, retrieving the chunks it needs. The demo prints the answer, the
time and tokens/s, the peak memory of the process (RSS) next to the memory's own K/V pages and
retrieval vectors, and the chunks that were retrieved for the answer.

    memkit demo                    # 80k tokens
    memkit demo --tokens 16k       # a shorter run
"""

from __future__ import annotations

import argparse
import time

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", default="80k", metavar="N",
                   help="haystack length in tokens, k = 1024 (default: 80k = 81920)")
    p.add_argument("--depth", type=float, default=0.5, metavar="F",
                   help="where the key sits in the filler, 0 = start .. 1 = end (default: 0.5)")
    p.add_argument("--key", default=None, metavar="DIGITS", help="the five-digit key (default: drawn from --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the key (default: 0)")
    p.add_argument("--filler", default="classic", choices=("classic", "real"),
                   help="classic repeated sentences or real Shakespeare text (default: classic)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="local HF model folder or .gguf (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="memkit config (YAML/JSON MemoryConfig) (default: memkit's defaults)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    p.add_argument("--chunks", type=int, default=8, metavar="N", help="retrieved chunks to print (default: 8)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--check", action="store_true", help="exit with status 1 when the answer is wrong")
    p.add_argument("--out", default="memkit-demo.json", metavar="FILE",
                   help="where to write the JSON result; '-' prints it to stdout (default: memkit-demo.json)")


def _snippet(text: str, width: int = 70) -> str:
    one = " ".join(str(text).split())
    return one if len(one) <= width else one[: width - 3] + "..."


def run(args: argparse.Namespace) -> int:
    from memkit.errors import InvalidInputError
    from memkit.evaluation.common import (
        format_table,
        human_bytes,
        load_config_arg,
        memory_bytes,
        peak_rss_bytes,
        set_threads,
        write_json,
    )
    from memkit.evaluation.haystack import build_haystack, extract_key, parse_length
    from memkit.models import load_model, resolve_model_path

    n = parse_length(args.tokens)
    if not 0.0 <= args.depth <= 1.0:
        raise InvalidInputError(f"--depth {args.depth} is outside [0, 1]")
    if args.key is not None and not (len(args.key) == 5 and args.key.isdigit()):
        raise InvalidInputError(f"--key {args.key!r} must be five digits")
    config = load_config_arg(args.config, progress=not args.no_progress)
    resolve_model_path(args.model)  # a bad --model fails here, before torch and transformers load
    import torch

    import memkit
    set_threads(args.threads)
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    t_load = time.perf_counter() - t0
    rss_model = peak_rss_bytes()
    name = args.model or "SmolLM2-135M-Instruct (bundled)"
    print(f"model: {name}, loaded in {t_load:.1f}s; trained positions: "
          f"{getattr(model.config, 'max_position_embeddings', '?')}")
    wrapped = memkit.wrap(model, config, tokenizer=tok)
    print(f"wrapped: {wrapped!r}")
    hay = build_haystack(tok, n, args.depth, key=args.key, filler=args.filler, prompt="plain", seed=args.seed)
    print(f"haystack: {len(hay)} tokens of {args.filler} filler, key {hay.key} at depth {args.depth:g} "
          f"(tokens {hay.needle_span[0]}-{hay.needle_span[1]})")
    wrapped.memory.reset()
    t1 = time.perf_counter()
    info = wrapped.memory.ingest(hay.context_ids, progress=not args.no_progress)
    t_ingest = time.perf_counter() - t1
    q = torch.tensor([hay.question_ids])
    t2 = time.perf_counter()
    out = wrapped.generate(q, attention_mask=torch.ones_like(q), max_new_tokens=8, do_sample=False,
                           pad_token_id=tok.eos_token_id)
    t_answer = time.perf_counter() - t2
    answer = tok.decode(out[0, q.shape[1]:], skip_special_tokens=True).strip()
    correct = extract_key(answer) == hay.key
    trace = wrapped.memory.trace()
    mem = memory_bytes(wrapped)
    peak = peak_rss_bytes()
    lo, hi = hay.needle_span
    rows = []
    shown = sorted(trace, key=lambda t: t.get("rank", 0))[: args.chunks]  # best first
    for t in sorted(shown, key=lambda t: int(t["span"][0])):  # printed in time order
        s, e = int(t["span"][0]), int(t["span"][1])
        rows.append([t.get("rank", "-"), f"{float(t['score']):.3f}", f"{s}-{e}", "yes" if s < hi and e > lo else "",
                     _snippet(t.get("text", ""))])
    total = t_ingest + t_answer
    print()
    print(f"question: What is the pass key?   answer: {answer!r}   expected {hay.key}: "
          f"{'CORRECT' if correct else 'WRONG'}")
    print(f"time: ingest {t_ingest:.1f}s ({len(hay.context_ids) / t_ingest:.0f} tok/s), answer {t_answer:.1f}s, "
          f"total {total:.1f}s ({len(hay) / total:.0f} tok/s)")
    print(f"peak RSS: {human_bytes(peak)} (after loading the model: {human_bytes(rss_model)}); "
          f"memory: {mem['chunks']} chunks, K/V pages {human_bytes(mem['pages_bytes'])}, "
          f"vectors {human_bytes(mem['vectors_bytes'])}")
    print(f"\nretrieved chunks for the answer (needle at tokens {lo}-{hi}):")
    table = format_table(["rank", "score", "tokens", "needle", "text"], rows)
    print(table)
    result = {"command": "demo", "model": name, "tokens": len(hay), "depth": args.depth, "key": hay.key,
              "answer": answer, "correct": correct, "needle_span": [lo, hi],
              "needle_retrieved": any(int(t["span"][0]) < hi and int(t["span"][1]) > lo for t in trace),
              "seconds": {"load": t_load, "ingest": t_ingest, "answer": t_answer, "total": total},
              "tokens_per_s": len(hay) / total, "ingest": info, "peak_rss_bytes": peak,
              "rss_after_model_load_bytes": rss_model, "memory": mem, "trace": trace,
              "config": wrapped.memkit_config.to_dict()}
    where = write_json(result, args.out)
    if where and where != "stdout":
        print(f"\nJSON: {where}")
    return 1 if (args.check and not correct) else 0
