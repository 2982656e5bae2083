"""Set the question step's ``select.min_gap`` on a calibration split that is not part of the task battery.

The split: RULER samples 100-109 of each of the six tasks at 16k (the battery runs samples 0-19) and the meadow and
ledger passkeys at 16k and 32k, 5 depths each (the battery's passkeys are scored through the model; these only
through retrieval). For each prompt the memory the question step sees is built exactly as a one-call prompt leaves
it (128-token chunks of everything before the last block's window, each with its real MiniLM embedding and its token
ids; K/V pages are zeros: retrieval never reads them) and the real question-step pipeline runs with each candidate
setting. Reported per task: the share of answer strings the step keeps visible (in a chosen chunk, or in the window),
and the chunks read. The rule fixed before any run: the lowest ``min_gap`` in the grid whose coverage is >= 0.95 on
every task.

    python benchmarks/calibrate_select.py --out benchmarks/results/battery/calibration_select.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

C, W, BS, S = 128, 512, 256, 128  # the defaults' chunk, window, block and sinks
GRID = (0.5, 0.6, 0.7)
TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")


def question_step_chunks(tok: Any, ids: list[int], embed: Any) -> tuple[dict[str, Any], int]:
    """What a one-call prompt of ``ids`` has stored when its last block starts (128-token chunks with their texts,
    MiniLM embeddings and token ids), and where the stored part ends (the rest is the window and the last block)."""
    last = BS * ((len(ids) - 1) // BS)  # the last block's first column
    stored = C * max(0, (last - W) // C) if last >= W else 0
    rows = [ids[a:min(a + C, stored)] for a in range(0, stored, C)]
    tid = np.full((len(rows), C), -1, np.int64)
    for j, r in enumerate(rows):
        tid[j, :len(r)] = r
    texts = [tok.decode(r) for r in rows]
    spans = np.asarray([(a, min(a + C, stored)) for a in range(0, stored, C)])
    return {"texts": texts, "emb": embed(texts=texts), "spans": spans, "token_ids": tid}, stored


def coverage(tok: Any, ids: list[int], answers: list[tuple[int, int, str]], retriever: Any) -> dict[str, list[Any]]:
    """Per setting: [chunks read, answer strings visible, answer strings, deciding signal, its gap]."""
    from memkit.config import MemoryConfig
    from memkit.memory import MemoryManager
    from memkit.retrieval import RowRequest

    chunks, stored = question_step_chunks(tok, ids, lambda texts: retriever(texts))
    out: dict[str, list[Any]] = {}
    for gap in GRID:
        config = MemoryConfig(retrieval={"question": {"select": {"min_gap": gap}, "reread": False}})
        mm = MemoryManager(config, num_layers=1, kv_heads=1, head_dim=1, embed_dim=384, retriever=retriever)
        kv = torch.zeros(len(chunks["texts"]), 1, 1, C, 1)  # retrieval never reads the pages
        mm.add_chunks(kv, kv, chunks["emb"], chunks["spans"], texts=chunks["texts"], token_ids=chunks["token_ids"])
        row = mm.retrieve_step([RowRequest("default", tokens=np.asarray(ids[stored:]), exclude=(0, S))], "question",
                               decode=tok.decode)[0]
        sp = row.result.spans.numpy() if row.result is not None else np.zeros((0, 2))
        seen: dict[str, bool] = {}
        for a, b, s in answers:
            inside = bool(((sp[:, 0] < b) & (sp[:, 1] > a)).any()) if len(sp) else False
            seen[s] = seen.get(s, False) or inside or b > stored
        out[str(gap)] = [len(sp), sum(seen.values()), len(seen), row.selection.get("signal"), row.selection.get("gap")]
    return out


def calibration_split(tok: Any, folder: Any, tasks: list[str], fillers: tuple[str, ...] = ("meadow", "ledger"),
                      depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9), seed: int = 0
                      ) -> Iterator[tuple[dict[str, Any], list[int], list[tuple[int, int, str]], dict[str, Any]]]:
    """The calibration split, prompt by prompt: (what names the prompt, its token ids, its answers as (start, end,
    answer string) token spans, how to score an answer: {"key": passkey} or {"task", "doc", "gen_kwargs"} of RULER):
    the fillers' passkeys at 16k and 32k at ``depths`` (keys drawn from ``seed``), then RULER samples 100-109 of each
    task at 16k. The default depths and seed are the battery's own passkeys (scored here through retrieval only);
    ``calibrate_reading.py`` scores through the model and so uses other depths and another seed."""
    from memkit.evaluation import ruler as R
    from memkit.evaluation.haystack import build_haystack

    for filler in fillers:
        for n in (16384, 32768):
            for d in depths:
                h = build_haystack(tok, n, d, filler=filler, prompt="auto", seed=seed)
                yield {"task": filler, "length": n, "depth": d}, h.input_ids, [(*h.needle_span, "needle")], \
                    {"key": h.key}
    for name in [t for t in tasks if t]:
        task = R.make_task(R.load_samples(name, 16384, tok, folder), folder)
        for rq in R.requests_for(task, 110)[100:110]:
            ctx, gen_kwargs = rq.args
            ids = list(tok(ctx, add_special_tokens=False)["input_ids"])
            answers = [(a, b, str(o)) for o in rq.doc["outputs"] for a, b in R.answer_token_spans(tok, ctx, ids, str(o))]
            yield {"task": name, "length": 16384, "index": int(rq.doc.get("index", -1))}, ids, answers, \
                {"task": task, "doc": rq.doc, "gen_kwargs": gen_kwargs}


def choose(records: list[dict[str, Any]], grid: tuple[float, ...], candidates: tuple[float, ...], out: Path) -> None:
    """Per task and grid value (each record's ``str(value)`` entry starts [chunks read, answers visible, answers]):
    the mean coverage and chunks read; the lowest of ``candidates`` with coverage >= 0.95 on every task is chosen.
    Writes everything to ``out`` and prints the summary."""
    summary: dict[str, Any] = {}
    for task in dict.fromkeys(r["task"] for r in records):
        rs = [r[str(g)] for r in records if r["task"] == task for g in grid]
        summary[task] = {str(g): {"coverage": round(float(np.mean([v[1] / max(v[2], 1) for v in rs[i::len(grid)]])), 3),
                                  "chunks": round(float(np.mean([v[0] for v in rs[i::len(grid)]])), 2),
                                  "n": len(rs) // len(grid)} for i, g in enumerate(grid)}
    ok = [g for g in candidates if all(s[str(g)]["coverage"] >= 0.95 for s in summary.values())]
    chosen = min(ok) if ok else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"grid": list(grid), "rule": "lowest value with coverage >= 0.95 on every task",
                               "chosen": chosen, "summary": summary, "records": records}, indent=1))
    print(json.dumps(summary, indent=1), "\nchosen:", chosen)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="calibration_select.json")
    p.add_argument("--tasks", default=",".join(TASKS))
    args = p.parse_args()
    torch.set_num_threads(1)
    from memkit.models import converted_dir, load_smollm2
    from memkit.resources import smollm2_gguf
    from memkit.retrievers import make_retriever

    _, tok = load_smollm2()
    retriever = make_retriever("text", key_dim=384)
    folder = converted_dir(smollm2_gguf())
    records = []
    for head, ids, answers, _ in calibration_split(tok, folder, args.tasks.split(",")):
        records.append({**head, **coverage(tok, ids, answers, retriever)})
        print(json.dumps(records[-1]), flush=True)
    choose(records, GRID, GRID, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
