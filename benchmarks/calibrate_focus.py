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
from calibrate_select import TASKS, C, S, calibration_split, choose, question_step_chunks

GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 1.01)  # 1.01 = focus off (the pipeline before the stage)


def coverage(rt: Any, tok: Any, ids: list[int], answers: list[tuple[int, int, str]], retriever: Any
             ) -> dict[str, Any]:
    """Per focus.min_gap of the grid: [chunks read, answer strings visible, answer strings, focus gap or None]; and
    what the focus stage saw (``selection()["focus"]``) at the lowest."""
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
        if gap == GRID[0]:
            out["focus"] = row.selection.get("focus")  # the attention gap and both first-token probabilities
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="calibration_focus.json")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--fillers", default="meadow,ledger")
    args = p.parse_args()
    torch.set_num_threads(1)
    import memkit
    from memkit.models import converted_dir, load_smollm2
    from memkit.resources import smollm2_gguf
    from memkit.retrievers import make_retriever

    model, tok = load_smollm2()
    rt = memkit.wrap(model, tokenizer=tok).memkit_runtime
    retriever = make_retriever("text", key_dim=384)
    folder = converted_dir(smollm2_gguf())
    records = []
    fillers = tuple(f for f in args.fillers.split(",") if f)
    for head, ids, answers, _ in calibration_split(tok, folder, args.tasks.split(","), fillers):
        records.append({**head, **coverage(rt, tok, ids, answers, retriever)})
        print(json.dumps(records[-1]), flush=True)
    choose(records, GRID, GRID[:-1], Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
