"""``memkit eval qa``: questions about long real documents, plain (inside its positions) vs wrapped (beyond).

The question set (:mod:`memkit.evaluation.qa_set`): dramatis personae and speakers of lines of three Shakespeare
plays, and invented facts inserted into King James Bible prose; each fact is stated once and asked 8k-64k tokens
later. Modes:

* ``full`` — the plain model reads ``--plain-tokens`` of the document with the fact near the start of that slice
  (the persons list is the play's start anyway), then the question: the model's own ability inside its positions.
* ``memkit`` — the wrapped model reads the whole document into memory once (``model.memory.ingest``), the memory
  is saved, and each question is asked in a fresh call on a reloaded copy (questions never see each other). The
  trace tells whether the fact's chunk was among the retrieved chunks.
* ``window`` — the same with ``top_k: 0``: what the model guesses without memory.

    memkit eval qa --modes full,memkit --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from memkit.evaluation.common import (
    add_common_arguments,
    format_table,
    load_config_arg,
    load_for_args,
    make_runner,
    parse_modes,
    set_threads,
    write_json,
)
from memkit.evaluation.qa_set import QA_KINDS, Document, Question, build_documents, score_answer

__all__ = ["add_arguments", "run", "evaluate", "prompt_ids", "answer_saved"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, modes_default="full,memkit")
    p.add_argument("--kinds", default=",".join(QA_KINDS), metavar="LIST",
                   help=f"question kinds, comma-separated (default: {','.join(QA_KINDS)})")
    p.add_argument("--plain-tokens", type=int, default=4096, metavar="N",
                   help="tokens of the document the plain model reads before the question, the fact near their "
                        "start (default: 4096)")
    p.add_argument("--doc-tokens", type=int, default=None, metavar="N",
                   help="read at most N tokens of each document (default: whole plays, 64k tokens of KJV)")
    p.add_argument("--min-distance", type=int, default=8192, metavar="N",
                   help="ask only about facts at least N tokens before the end of their document (default: 8192)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N questions per document")
    p.add_argument("--max-new-tokens", type=int, default=12, metavar="N", help="answer tokens (default: 12)")
    p.add_argument("--out", default="memkit-qa.json", metavar="FILE",
                   help="where to write the JSON result; '-' prints it to stdout (default: memkit-qa.json)")


def prompt_ids(tokenizer: Any, q: Question) -> list[int]:
    """The question and the start of its answer, as the model reads them after the document."""
    text = f"\n\nQuestion: {q.question}\nAnswer: {q.prefix}"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _generate(model: Any, tokenizer: Any, ids: list[int], max_new_tokens: int) -> tuple[str, float]:
    import torch

    x = torch.tensor([ids], device=model.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=getattr(tokenizer, "eos_token_id", None))
    return tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True), time.perf_counter() - t0


def _plain_slice(doc: Document, q: Question, n: int) -> list[int]:
    """``n`` tokens of the document with the fact near their start (the play's start for a persons question)."""
    start = 0 if q.kind == "persons" else max(0, q.fact_span[0] - 64)
    return doc.ids[start:start + n]


def _record(doc: Document, q: Question, text: str, seconds: float, distance: int) -> dict[str, Any]:
    return {"document": doc.name, "kind": q.kind, "question": q.question, "answers": q.answers,
            "answer": (q.prefix + text).strip(), "correct": score_answer(text, q.answers), "distance": distance,
            "seconds": round(seconds, 2)}


def evaluate(model: Any, tokenizer: Any, docs: list[Document], mode: str, *, plain_tokens: int = 4096,
             max_new_tokens: int = 12, log: Any = None) -> list[dict[str, Any]]:
    """One record per question. ``model`` is the plain model for ``full``, a wrapped one otherwise."""
    out = []
    for doc in docs:
        if mode == "full":
            for q in doc.questions:
                ids = _plain_slice(doc, q, plain_tokens)
                start = 0 if q.kind == "persons" else max(0, q.fact_span[0] - 64)
                text, sec = _generate(model, tokenizer, ids + prompt_ids(tokenizer, q), max_new_tokens)
                rec = _record(doc, q, text, sec, start + len(ids) - q.fact_span[1])
                out.append(rec)
                if log:
                    log(mode, rec)
            continue
        mem = model.memory
        mem.reset()
        t0 = time.perf_counter()
        mem.ingest(doc.ids)
        read_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory(prefix="memkit-qa-") as tmp:
            saved = Path(tmp) / "memory"
            mem.save(saved)
            for q in doc.questions:
                rec = answer_saved(model, tokenizer, doc, q, saved, max_new_tokens=max_new_tokens)
                rec["read_seconds"] = round(read_s, 1)
                out.append(rec)
                if log:
                    log(mode, rec)
        mem.reset()
    return out


def answer_saved(model: Any, tokenizer: Any, doc: Document, q: Question, saved: Path, *,
                 max_new_tokens: int = 12) -> dict[str, Any]:
    """Ask ``q`` in a fresh call on the memory saved in ``saved`` (the document read once): the record, with whether
    the fact's chunk was among the chunks the question step read."""
    mem = model.memory
    mem.load(saved)
    text, sec = _generate(model, tokenizer, prompt_ids(tokenizer, q), max_new_tokens)
    rec = _record(doc, q, text, sec, len(doc.ids) - q.fact_span[1])
    lo, hi = q.fact_span
    rec["fact_retrieved"] = any(int(t["span"][0]) < hi and int(t["span"][1]) > lo for t in mem.trace())
    rec["chunks_read"] = len(mem.trace())
    rec["selection"] = mem.manager.selection()
    rec["document_tokens"] = len(doc.ids)
    return rec


def summary(results: list[dict[str, Any]], modes: list[str]) -> str:
    """Accuracy per kind and mode (with the median fact distance) as a markdown table."""
    kinds = [k for k in QA_KINDS if any(r["kind"] == k for r in results)]
    headers = ["kind", *[f"{m}" for m in modes], "questions", "memkit: fact retrieved", "distance (memkit)"]
    rows = []
    for kind in [*kinds, "all"]:
        row: list[Any] = [kind]
        for m in modes:
            cell = [r for r in results if r["mode"] == m and (kind == "all" or r["kind"] == kind)]
            row.append(f"{sum(r['correct'] for r in cell)}/{len(cell)}" if cell else "—")
        mk = [r for r in results if r["mode"] == "memkit" and (kind == "all" or r["kind"] == kind)]
        anyc = [r for r in results if kind == "all" or r["kind"] == kind]
        row.append(len({(r["document"], r["question"]) for r in anyc}))
        if mk:
            d = sorted(r["distance"] for r in mk)
            row += [f"{sum(r['fact_retrieved'] for r in mk)}/{len(mk)}", f"{d[0]}-{d[-1]} (median {d[len(d) // 2]})"]
        else:
            row += ["—", "—"]
        rows.append(row)
    return format_table(headers, rows)


def run(args: argparse.Namespace) -> int:
    from memkit.errors import InvalidInputError

    modes = parse_modes(args.modes)
    kinds = tuple(k.strip() for k in str(args.kinds).split(",") if k.strip())
    bad = [k for k in kinds if k not in QA_KINDS]
    if bad or not kinds:
        raise InvalidInputError(f"--kinds {args.kinds!r}: choose from {list(QA_KINDS)}")
    if args.min_distance < 1 or (args.doc_tokens is not None and args.doc_tokens <= args.min_distance):
        raise InvalidInputError("--min-distance must be >= 1 and --doc-tokens larger than it")
    if args.plain_tokens < 256 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        raise InvalidInputError("--plain-tokens must be >= 256, --max-new-tokens and --limit >= 1")
    config = load_config_arg(args.config) if any(m != "full" for m in modes) else None
    from memkit.models import resolve_model_path

    resolve_model_path(args.model)
    set_threads(args.threads)
    model, tok = load_for_args(args)
    docs = build_documents(tok, kinds, doc_tokens=args.doc_tokens, min_distance=args.min_distance)
    if not any(d.questions for d in docs):
        raise InvalidInputError("no question has its fact --min-distance tokens before the end of its document; "
                                "raise --doc-tokens or lower --min-distance")
    if args.limit:
        for d in docs:
            d.questions = d.questions[: args.limit]
    results: list[dict[str, Any]] = []

    def log(mode: str, rec: dict[str, Any]) -> None:
        rec["mode"] = mode
        flag = "ok  " if rec["correct"] else "MISS"
        extra = f" fact_retrieved={rec['fact_retrieved']}" if "fact_retrieved" in rec else ""
        print(f"[{mode}] {flag} {rec['document']} {rec['kind']} d={rec['distance']} {rec['question']!r} -> "
              f"{rec['answer']!r}{extra}", flush=True)

    t0 = time.perf_counter()
    for mode in modes:
        with make_runner(model, tok, mode, config, progress=not args.no_progress) as m:
            results.extend(evaluate(m, tok, docs, mode, plain_tokens=args.plain_tokens,
                                    max_new_tokens=args.max_new_tokens, log=log))
    table = summary(results, modes)
    print()
    print(table)
    where = write_json({"command": "eval qa", "model": args.model or "bundled SmolLM2-135M-Instruct", "modes": modes,
                        "kinds": list(kinds), "plain_tokens": args.plain_tokens, "doc_tokens": args.doc_tokens,
                        "min_distance": args.min_distance,
                        "documents": [{"name": d.name, "tokens": len(d.ids), "questions": len(d.questions)}
                                      for d in docs],
                        "config": config.to_dict() if config is not None else None, "results": results,
                        "table": table, "seconds": round(time.perf_counter() - t0, 1)}, args.out)
    if where and where != "stdout":
        print(f"\nJSON: {where}")
    return 0
