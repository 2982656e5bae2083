"""What the model answers from what the question step reads: retrieval settings scored through the model, fast.

At generate's question step memkit reads [sinks | chosen chunks | window and question] afresh (the ``reread``
stage) and answers from those K/V, which is what the plain model answers given that short prompt
(tests/test_wrap_generate.py checks the equality). So each setting is scored here without a 16k read per prompt:
the real question-step pipeline picks the chunks of a prompt's memory (built as ``calibrate_select.py`` builds it),
and the bundled SmolLM2 answers the prompt [the stream's first ``sink_tokens`` tokens | the chunks | the window and
the last block] with greedy decoding, scored by the task's own metric (RULER) or the key (passkeys). The split is
the calibration split (``calibrate_select.calibration_split``), never the battery's samples.

Settings (``--settings``): ``default`` (memkit's, with its ``reread.recent`` for lookups), ``gap0.6``/``gap0.5``
(``select.min_gap``), ``k3`` (a fixed 3),
``best_last`` (the default chunks, the best by the selection's merit read last instead of in time order),
``focus`` (the ``focus`` stage on, through the model's probe reader), ``window`` (the default chunks; the question
reads its whole window: ``reread.recent`` 0, memkit's default before 2026-12-08), ``tail512``/``tail384``/``tail256``
(the default chunks; the question reads only the last 512/384/256 tokens of its window and its own step).

    python benchmarks/calibrate_reading.py --out benchmarks/results/battery/calibration/reading.json
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
from calibrate_select import BS, TASKS, C, S, calibration_split, question_step_chunks

SETTINGS: dict[str, dict[str, Any]] = {
    "default": {}, "gap0.6": {"select": {"min_gap": 0.6}}, "gap0.5": {"select": {"min_gap": 0.5}},
    "k3": {"select": {"adaptive": False, "k": 3}}, "best_last": {}, "focus": {"focus": {}},
    "window": {}, "tail512": {}, "tail384": {}, "tail256": {},
}
TAILS = {"window": 0, "tail512": 512, "tail384": 384, "tail256": 256}  # reread.recent of these settings (0: all)


def recent_tokens(ids: list[int], stored: int, recent: int) -> list[int]:
    """The tokens after the chunks a question with ``reread.recent`` = ``recent`` reads: its own step (the last block)
    always, then the window's latest, ``recent`` in all (the stage's own ``skipped``); 0: the whole window."""
    from memkit.retrieval import RowRequest
    from memkit.retrieval.stages.reread import skipped

    tail = ids[stored:]
    step = len(ids) - BS * ((len(ids) - 1) // BS)  # the last block's tokens
    req = RowRequest("default", tokens=np.asarray(tail), window=np.asarray(tail[:len(tail) - step]))
    return tail[skipped(req, recent):]


def chunks_read(rt: Any, tok: Any, ids: list[int], retriever: Any, settings: list[str]) -> dict[str, Any]:
    """Per setting: (the chosen chunks' token arrays in reading order, their spans, where the stored part ends)."""
    from memkit.config import MemoryConfig
    from memkit.memory import MemoryManager
    from memkit.retrieval import RowRequest
    from memkit.retrieval.stages.reread import lookup

    chunks, stored = question_step_chunks(tok, ids, lambda texts: retriever(texts))
    tids = [r[r >= 0] for r in chunks["token_ids"]]
    out: dict[str, Any] = {}
    for name in settings:
        config = MemoryConfig(retrieval={"question": {**SETTINGS[name], "reread": False}})
        mm = MemoryManager(config, num_layers=1, kv_heads=1, head_dim=1, embed_dim=384, retriever=retriever)
        kv = torch.zeros(len(chunks["texts"]), 1, 1, C, 1)  # retrieval never reads the pages
        mm.add_chunks(kv, kv, chunks["emb"], chunks["spans"], texts=chunks["texts"], token_ids=chunks["token_ids"])
        with rt.calling(1, ["__calibrate__"], mode="probe"):
            row = mm.retrieve_step([RowRequest("default", tokens=np.asarray(ids[stored:]), exclude=(0, S))],
                                   "question", decode=tok.decode, reader=rt.reader)[0]
        res = row.result
        order = list(range(len(res))) if res is not None else []  # time order
        if name == "best_last":
            merit = {c: i for i, c in enumerate(row.chosen)}
            order = sorted(order, key=lambda i: -merit.get(int(res.ids[i]), len(merit)))
        # a bank id is not an index of ``chunks`` (near-duplicate chunks of a repeating filler are not stored):
        # the tokens and spans come from the result
        spans = [tuple(map(int, res.spans[i])) for i in order]
        out[name] = ([tids[a // C] for a, _ in spans], spans, row.selection.get("reason"), lookup(row))
    out["stored"] = stored
    return out


def adopt(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """The rule, fixed before the run: a setting replaces ``default`` when its mean score is at least the default's
    on every calibration task and higher in total; among several, the highest total (ties: the first listed)."""
    names = list(next(iter(summary.values())))
    total = {n: sum(t[n]["score"] for t in summary.values()) for n in names}
    ok = [n for n in names if n != "default" and all(t[n]["score"] >= t["default"]["score"] for t in summary.values())
          and total[n] > total["default"]]
    return max(ok, key=lambda n: total[n]) if ok else "default"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="calibration_reading.json")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--fillers", default="meadow,ledger")
    p.add_argument("--depths", default="0.2,0.4,0.6,0.8", help="passkey depths (the battery's are 0.1-0.9 by 0.2)")
    p.add_argument("--seed", type=int, default=1, help="passkeys' key seed (the battery's is 0)")
    p.add_argument("--settings", default=",".join(SETTINGS))
    args = p.parse_args()
    torch.set_num_threads(1)
    import memkit
    from memkit.evaluation import ruler as R
    from memkit.evaluation.haystack import extract_key
    from memkit.evaluation.lm_eval_model import MemkitLM
    from memkit.models import converted_dir, load_smollm2
    from memkit.resources import smollm2_gguf
    from memkit.retrievers import make_retriever

    settings = [s for s in args.settings.split(",") if s]
    from memkit.retrieval.stages.reread import RereadConfig

    default_recent = RereadConfig().recent
    model, tok = load_smollm2()
    lm = MemkitLM(model, tokenizer=tok, mode="full")  # the plain model: what the question step's re-read reads
    rt = memkit.wrap(load_smollm2()[0], tokenizer=tok, progress=False).memkit_runtime  # its probe reader (focus)
    retriever = make_retriever("text", key_dim=384)
    folder = converted_dir(smollm2_gguf())
    records: list[dict[str, Any]] = []
    fillers = tuple(f for f in args.fillers.split(",") if f)
    for head, ids, answers, how in calibration_split(tok, folder, args.tasks.split(","), fillers,
                                                     tuple(float(d) for d in args.depths.split(",")), args.seed):
        got = chunks_read(rt, tok, ids, retriever, settings)
        rec: dict[str, Any] = dict(head)
        for name in settings:
            pieces, spans, reason, is_lookup = got[name]
            recent = recent_tokens(ids, got["stored"], TAILS.get(name, default_recent if is_lookup else 0))
            prompt = ids[:S] + [int(t) for p in pieces for t in p] + recent
            gen_kwargs = how.get("gen_kwargs", {"until": ["\n"], "max_gen_toks": 12})
            text = lm.generate_one("", gen_kwargs, prompt_ids=prompt).text
            score = R.score_of(how["task"], how["doc"], text) if "task" in how else float(extract_key(text) == how["key"])
            first = len(ids) - len(recent)  # the first recent token the question reads
            visible = sum(any(a < e and b > s for s, e in spans) or b > first for a, b, _ in answers)
            rec[name] = {"score": score, "chunks": len(spans), "visible": visible, "answers": len(answers),
                         "reason": reason, "text": text[:120]}
        records.append(rec)
        print(json.dumps({k: (v if not isinstance(v, dict) else [v["score"], v["chunks"]]) for k, v in rec.items()}),
              flush=True)
    summary = {task: {name: {"score": round(float(np.mean([r[name]["score"] for r in records if r["task"] == task])), 3),
                             "chunks": round(float(np.mean([r[name]["chunks"] for r in records if r["task"] == task])),
                                             2)} for name in settings}
               for task in dict.fromkeys(r["task"] for r in records)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    chosen = adopt(summary)
    Path(args.out).write_text(json.dumps({"settings": {k: SETTINGS[k] for k in settings}, "summary": summary,
                                          "rule": adopt.__doc__, "adopted": chosen, "records": records}, indent=1))
    print(json.dumps(summary, indent=1), "\nadopted:", chosen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
