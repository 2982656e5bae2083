"""Set the question step's ``focus.min_gap`` on the calibration split (not part of the task battery).

The split is ``calibrate_select.py``'s: RULER samples 100-109 of the six tasks at 16k (the battery runs 0-19) and
the meadow and ledger passkeys at 16k and 32k, 5 depths each. For each prompt the memory the question step sees is
built as a one-call prompt leaves it (128-token chunks with their MiniLM embeddings and token ids) and the real
question-step pipeline runs with each ``focus.min_gap`` of the grid (and with focus off) through the bundled
SmolLM2's probe reader: where the selection reads its whole budget (no retrieval head), the focus stage reads the
attention the question's last 32 tokens give each candidate chunk ([sinks | chunks | window and question] read
afresh) and may narrow the chunks to its head. Reported per task: the share of answer strings
kept visible (in a chosen chunk or its best's neighbours, or in the window) and the chunks read. The rule, fixed
before the run: the lowest ``min_gap`` with coverage >= 0.95 on every task.

    python benchmarks/calibrate_focus.py --out benchmarks/results/battery/calibration/focus_min_gap.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrate_select import TASKS, C, S, question_step_chunks

GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 1.01)  # 1.01 = focus off (the pipeline before the stage)


def coverage(rt: Any, tok: Any, ids: list[int], answers: list[tuple[int, int, str]], retriever: Any
             ) -> dict[str, Any]:
    """Per focus.min_gap of the grid: [chunks read, answer strings visible, answer strings, focus gap or None]."""
    from memkit.config import MemoryConfig
    from memkit.memory import MemoryManager
    from memkit.retrieval import RowRequest

    chunks, stored = question_step_chunks(tok, ids, lambda texts: retriever(texts))
    out: dict[str, Any] = {}
    for gap in GRID:
        focus = {"min_gap": gap} if gap <= 1.0 else False
        config = MemoryConfig(retrieval={"question": {"focus": focus, "reread": False}})
        mm = MemoryManager(config, num_layers=1, kv_heads=1, head_dim=1, embed_dim=384, retriever=retriever)
        kv = torch.zeros(len(chunks["texts"]), 1, 1, C, 1)  # retrieval never reads the pages
        mm.add_chunks(kv, kv, chunks["emb"], chunks["spans"], texts=chunks["texts"], token_ids=chunks["token_ids"])
        with rt.calling(1, ["__calibrate__"], mode="probe"):  # the reader's probe runs inside a memkit call
            row = mm.retrieve_step([RowRequest("default", tokens=np.asarray(ids[stored:]), exclude=(0, S))],
                                   "question", decode=tok.decode, reader=rt.reader)[0]
        sp = row.result.spans.numpy() if row.result is not None else np.zeros((0, 2))
        seen: dict[str, bool] = {}
        for a, b, s in answers:
            inside = bool(((sp[:, 0] < b) & (sp[:, 1] > a)).any()) if len(sp) else False
            seen[s] = seen.get(s, False) or inside or b > stored
        out[str(gap)] = [len(sp), sum(seen.values()), len(seen), row.selection.get("focus", {}).get("gap")]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="calibration_focus.json")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--fillers", default="meadow,ledger")
    args = p.parse_args()
    torch.set_num_threads(1)
    import memkit
    from memkit.evaluation import ruler as R
    from memkit.evaluation.haystack import build_haystack
    from memkit.models import converted_dir, load_smollm2
    from memkit.resources import smollm2_gguf
    from memkit.retrievers import make_retriever

    model, tok = load_smollm2()
    rt = memkit.wrap(model, tokenizer=tok).memkit_runtime
    retriever = make_retriever("text", key_dim=384)
    folder = converted_dir(smollm2_gguf())
    records = []
    for filler in [f for f in args.fillers.split(",") if f]:
        for n in (16384, 32768):
            for d in (0.1, 0.3, 0.5, 0.7, 0.9):
                h = build_haystack(tok, n, d, filler=filler, prompt="auto")
                records.append({"task": filler, "length": n, "depth": d,
                                **coverage(rt, tok, h.input_ids, [(*h.needle_span, "needle")], retriever)})
                print(json.dumps(records[-1]), flush=True)
    for name in [t for t in args.tasks.split(",") if t]:
        task = R.make_task(R.load_samples(name, 16384, tok, folder), folder)
        for rq in R.requests_for(task, 110)[100:110]:
            ctx, _ = rq.args
            ids = list(tok(ctx, add_special_tokens=False)["input_ids"])
            answers = [(a, b, str(o)) for o in rq.doc["outputs"] for a, b in R.answer_token_spans(tok, ctx, ids, str(o))]
            records.append({"task": name, "length": 16384, "index": int(rq.doc.get("index", -1)),
                            **coverage(rt, tok, ids, answers, retriever)})
            print(json.dumps(records[-1]), flush=True)
    summary: dict[str, Any] = {}
    for task in dict.fromkeys(r["task"] for r in records):
        rs = [r for r in records if r["task"] == task]
        summary[task] = {}
        for g in GRID:
            got = [r[str(g)] for r in rs]
            summary[task][str(g)] = {"coverage": round(float(np.mean([v / max(t, 1) for _, v, t, _ in got])), 3),
                                     "chunks": round(float(np.mean([k for k, _, _, _ in got])), 2), "n": len(rs)}
    ok = [g for g in GRID[:-1] if all(s[str(g)]["coverage"] >= 0.95 for s in summary.values())]
    chosen = min(ok) if ok else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"grid": list(GRID), "rule": "lowest min_gap with coverage >= 0.95 on every "
                                          "task", "chosen": chosen, "summary": summary, "records": records}, indent=1))
    print(json.dumps(summary, indent=1), "\nchosen min_gap:", chosen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
