"""``memkit bench train``: does LongMem's memory do measurable work after ``memkit train``? (Wang et al. 2023)

Trains the documented recipe (:mod:`memkit.commands.train`: LongMem style on SmolLM2-135M, frozen backbone, the
memory layer's gates and memory read trained on the KJV and twelve plays for ``--minutes``), or reads an adapter
trained before (``--trained DIR``), and measures on text it never saw:

* **held-out loss** on ``--held-out`` plays (none of them trained on; tokens ``--context``..``--eval-tokens`` of
  each, memory holding each play's earlier text): the trained model with memory on (``memory_on_loss``) and off
  (``memory_off_loss``), window-only (MemLong path, ``top_k=0``, same window, sinks and blocks), untrained LongMem,
  and the training-free MemLong default at the same window (``memkit.wrap(model, tokenizer=tok, window=W)``) and
  with this recipe's blocks/sinks (the ``memkit eval styles`` row);
* **in-context learning** with the demonstrations in memory (:mod:`memkit.evaluation.icl`: a hidden word ->
  colour mapping, ``--icl-keys`` queries): trained (memory on / off), untrained, window-only;
* **passkey** at ``--passkey-length`` tokens and 3 depths, untrained vs trained (training must not break
  instruction following);
* the **curve** of held-out loss against training minutes (from the training log) and the adapter's size.

Writes ``train.json`` (keys ``memory_on_loss``, ``memory_off_loss``, ``window_only_loss``, ``memlong_default_loss``,
``icl`` accuracies, ``passkey``...), ``train.md`` and ``train_curve.png``.

    memkit bench train --minutes 45 --save runs/longmem        # train + measure
    memkit bench train --trained runs/longmem                  # measure an adapter from `memkit train`
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run", "main", "HELD_OUT_PLAYS"]

HELD_OUT_PLAYS = ("romeo_and_juliet", "julius_caesar", "antony_and_cleopatra", "winters_tale")  # not trained on


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trained", default=None, metavar="DIR", help="adapter from `memkit train` (skips training)")
    p.add_argument("--minutes", type=float, default=45.0, help="training minutes when training here (default 45)")
    p.add_argument("--eval-every", type=float, default=5.0, help="minutes between curve points (default 5)")
    p.add_argument("--save", default="runs/longmem", metavar="DIR", help="where training here saves the adapter")
    p.add_argument("--held-out", default=",".join(HELD_OUT_PLAYS), help="comma list of held-out plays")
    p.add_argument("--eval-tokens", type=int, default=4096, help="tokens read per held-out play (default 4096)")
    p.add_argument("--context", type=int, default=1024, help="tokens read before scoring starts (default 1024)")
    p.add_argument("--icl-keys", type=int, default=128, help="ICL queries (one per key; default 128)")
    p.add_argument("--icl-seed", type=int, default=0, help="seed of the ICL mapping (default 0)")
    p.add_argument("--passkey-length", default="1k", help="passkey prompt length (default 1k)")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="passkey depths (default 0.1,0.5,0.9)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: memlong, icl, passkey")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default="benchmarks/results/train.json", help="JSON result (.md and .png beside it)")


def _loss(wrapped: Any, docs: dict[str, Any], context: int) -> dict[str, Any]:
    from memkit.commands.train import held_out_loss

    t0 = time.perf_counter()
    per = {name: held_out_loss(wrapped, {name: ids}, context) for name, ids in docs.items()}
    loss = sum(per.values()) / len(per)  # every play scores the same number of tokens
    return {"loss": loss, "ppl": math.exp(loss), "per_text": per, "seconds": round(time.perf_counter() - t0, 1)}


def run(args: argparse.Namespace) -> int:
    import torch

    import memkit
    from memkit.commands.train import LOG_FILE, RECIPE, read_texts, train_recipe, wrap_config
    from memkit.corpora import TRAIN_PLAYS, play_ids
    from memkit.errors import InvalidInputError
    from memkit.evaluation.haystack import parse_depths, parse_length
    from memkit.evaluation.icl import evaluate as icl_evaluate
    from memkit.evaluation.icl import make_task
    from memkit.evaluation.machine import machine_info, machine_line
    from memkit.evaluation.passkey import evaluate as passkey_evaluate
    from memkit.integrations.curriculum import training_documents
    from memkit.models import load_smollm2

    torch.set_num_threads(args.threads)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    held_names = [n.strip() for n in args.held_out.split(",") if n.strip()]
    if set(held_names) & set(TRAIN_PLAYS):
        raise InvalidInputError(f"{sorted(set(held_names) & set(TRAIN_PLAYS))} are trained on; hold out other plays")
    model, tok = load_smollm2()
    held = play_ids(tok, held_names, args.eval_tokens)
    res: dict[str, Any] = {"model": "SmolLM2-135M-Instruct (bundled GGUF, fp32)", "machine": machine_info(("torch",
                           "transformers")), "held_out": held_names, "eval_tokens": args.eval_tokens,
                           "context": args.context, "scored_tokens": len(held) * (args.eval_tokens - args.context - 1),
                           "rows": {}}
    log = print
    if args.trained:
        trained_dir = Path(args.trained)
        train_log = json.loads((trained_dir / LOG_FILE).read_text()) if (trained_dir / LOG_FILE).is_file() else {}
    else:
        texts = read_texts(["kjv", "train-plays"])
        ids = [tok(body, return_tensors="pt", add_special_tokens=False)["input_ids"][0] for _, body in texts]
        docs = training_documents(ids, doc_tokens=RECIPE["doc_tokens"], window=RECIPE["window"])
        w = memkit.wrap(model, **wrap_config("longmem", window=RECIPE["window"], layer=None, sidenet=False,
                                             num_layers=int(model.config.num_hidden_layers)))
        curve_docs = play_ids(tok, ["romeo_and_juliet", "julius_caesar"], 2048)
        train_log = train_recipe(w, docs, minutes=args.minutes, held=curve_docs, context=512,
                                 eval_every=args.eval_every, segment=RECIPE["segment"], lr=RECIPE["lr"],
                                 reader_lr=RECIPE["reader_lr"], gate_lr=RECIPE["gate_lr"])
        trained_dir = Path(args.save)
        w.save_pretrained(trained_dir)
        train_log["adapter_bytes"] = (trained_dir / "memkit_weights.safetensors").stat().st_size
        (trained_dir / LOG_FILE).write_text(json.dumps(train_log, indent=1) + "\n")
        memkit.unwrap(w)
    res["train"] = {k: v for k, v in train_log.items() if k not in ("losses", "config")}
    rows = res["rows"]

    def row(name: str, wrapped: Any) -> None:
        rows[name] = _loss(wrapped, held, args.context)
        log(f"{name:40s} held-out loss {rows[name]['loss']:.4f} ppl {rows[name]['ppl']:.3f} "
            f"({rows[name]['seconds']:.0f}s)")

    trained = memkit.from_pretrained(model, trained_dir)
    cfg = trained.memkit_config
    base = dict(window=cfg.window, block_size=cfg.block_size, chunk_size=cfg.chunk_size, sink_tokens=cfg.sink_tokens,
                progress=False)
    res["config"] = cfg.to_dict()
    res["adapter_bytes"] = (trained_dir / "memkit_weights.safetensors").stat().st_size
    res["adapter_parameters"] = sum(p.numel() for p in trained.memkit_modules.parameters())
    row("longmem trained, memory on", trained)
    top_k, cfg.top_k = cfg.top_k, 0
    row("longmem trained, memory off", trained)
    cfg.top_k = top_k
    icl_task = make_task(tok, n_keys=args.icl_keys, seed=args.icl_seed)
    icl: dict[str, Any] = {}

    def icl_row(name: str, wrapped: Any) -> None:
        if "icl" in skip:
            return
        r = icl_evaluate(wrapped, tok, icl_task)
        icl[name] = {k: v for k, v in r.items() if k != "queries"}
        log(f"[icl] {name:36s} accuracy {r['accuracy']:.3f} ({r['correct']}/{r['n']})")

    pk_len = parse_length(args.passkey_length)
    depths = parse_depths(args.depths)
    passkey: dict[str, Any] = {}

    def pk_row(name: str, wrapped: Any) -> None:
        if "passkey" in skip:
            return
        recs = passkey_evaluate(wrapped, tok, [pk_len], depths)
        passkey[name] = {"correct": sum(r["correct"] for r in recs), "n": len(recs),
                         "answers": [{k: r[k] for k in ("depth", "key", "answer", "correct")} for r in recs]}
        log(f"[passkey] {name:32s} {passkey[name]['correct']}/{len(recs)}")

    icl_row("longmem trained, memory on", trained)
    cfg.top_k = 0
    icl_row("longmem trained, memory off", trained)
    cfg.top_k = top_k
    pk_row("longmem trained", trained)
    memkit.unwrap(trained)
    w = memkit.wrap(model, style="longmem", **base)
    row("longmem untrained", w)
    icl_row("longmem untrained", w)
    pk_row("longmem untrained", w)
    memkit.unwrap(w)
    w = memkit.wrap(model, style="memlong", top_k=0, **base)
    row("window-only", w)
    icl_row("window-only", w)
    pk_row("window-only", w)
    memkit.unwrap(w)
    if "memlong" not in skip:
        w = memkit.wrap(model, tokenizer=tok, window=cfg.window, progress=False)
        row("memlong default (same window)", w)
        icl_row("memlong default (same window)", w)
        memkit.unwrap(w)
        w = memkit.wrap(model, style="memlong", retriever="keys", top_k=8, **base)
        row("memlong, recipe's blocks and sinks", w)
        icl_row("memlong, recipe's blocks and sinks", w)
        memkit.unwrap(w)
    res["icl"], res["passkey"] = icl, passkey
    res["icl_task"] = {"n_keys": args.icl_keys, "seed": args.icl_seed, "demo_tokens": len(icl_task.demo_ids),
                       "labels": list(icl_task.labels)}
    on, off = rows["longmem trained, memory on"]["loss"], rows["longmem trained, memory off"]["loss"]
    res.update(memory_on_loss=on, memory_off_loss=off, memory_gain=off - on,
               window_only_loss=rows["window-only"]["loss"], longmem_untrained_loss=rows["longmem untrained"]["loss"],
               memlong_default_loss=rows.get("memlong default (same window)", {}).get("loss"),
               date=time.strftime("%Y-%m-%d"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    md = _markdown(res, machine_line(res["machine"]))
    out.with_suffix(".md").write_text(md)
    _plot(res, out.with_name(out.stem + "_curve.png"))
    print(md)
    return 0


def _markdown(res: dict[str, Any], machine: str) -> str:
    t = res["train"]
    ref = res["window_only_loss"]
    lines = ["# LongMem memory after `memkit train`: held-out loss, in-context learning, passkey", "",
             f"*{machine}*", "",
             f"Held-out: {', '.join(res['held_out'])} (tokens {res['context']}-{res['eval_tokens']} of each, "
             f"{res['scored_tokens']:,} scored; never trained on). SmolLM2-135M, window {res['config']['window']}, "
             f"blocks {res['config']['block_size']}, sinks {res['config']['sink_tokens']}.", "",
             "| run | held-out loss | perplexity | Δ loss vs window-only |", "|---|---|---|---|"]
    for name, r in res["rows"].items():
        lines.append(f"| {name} | {r['loss']:.4f} | {r['ppl']:.3f} | {r['loss'] - ref:+.4f} |")
    lines += ["", f"Memory on vs off (same trained model): {res['memory_on_loss']:.4f} vs {res['memory_off_loss']:.4f}, "
              f"gain **{res['memory_gain']:.4f} nats** ({100 * (1 - math.exp(-res['memory_gain'])):.1f}% perplexity)."]
    if t:
        lines += ["", f"Training: {t.get('steps')} steps, {t.get('tokens', 0):,} tokens, "
                  f"{t.get('train_seconds', 0) / 60:.1f} min of training ({t.get('wall_seconds', 0) / 60:.1f} min with "
                  f"curve evaluations); {res['adapter_parameters']:,} trained parameters, adapter "
                  f"{res['adapter_bytes']:,} bytes; gates after training: {t.get('gate')}."]
        if t.get("curve"):
            lines += ["", "| training minutes | step | held-out loss (romeo_and_juliet, julius_caesar 512-2048) |",
                      "|---|---|---|"]
            lines += [f"| {c['minutes']:.1f} | {c['step']} | {c['held_out_loss']:.4f} |" for c in t["curve"]]
    if res.get("icl"):
        task = res["icl_task"]
        lines += ["", f"In-context learning: {task['n_keys']} words with a hidden colour ({', '.join(task['labels'])}; "
                  f"chance 25%), 2 demonstrations each ({task['demo_tokens']} tokens) read into memory; each query "
                  "holds only other words' lines in its window.", "", "| model | accuracy | correct |", "|---|---|---|"]
        lines += [f"| {n} | {r['accuracy']:.3f} | {r['correct']}/{r['n']} |" for n, r in res["icl"].items()]
    if res.get("passkey"):
        lines += ["", "| passkey (1k tokens, 3 depths) | correct |", "|---|---|"]
        lines += [f"| {n} | {r['correct']}/{r['n']} |" for n, r in res["passkey"].items()]
    return "\n".join(lines) + "\n"


def _plot(res: dict[str, Any], path: Path) -> None:
    curve = res["train"].get("curve") or []
    if not curve:
        return
    from memkit.evaluation.machine import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([c["minutes"] for c in curve], [c["held_out_loss"] for c in curve], "o-", label="memory on")
    base = curve[0]["held_out_loss"]
    ax.axhline(base, color="#888888", ls="--", label="untrained = window-only")
    ax.set_xlabel("training minutes (1 CPU thread)")
    ax.set_ylabel("held-out loss (nats)")
    ax.set_title("LongMem recipe: held-out loss vs training time", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
