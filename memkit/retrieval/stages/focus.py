"""Stage ``focus``: when retrieval shows no clear head, the model's own attention to the candidates chooses.

The ``select`` stage reads the head of a retrieval signal only when it stands apart; otherwise the question step
would read its whole budget, and a small reader misses a fact among a dozen chunks of distractors that it answers
when shown the fact's chunk alone. Retrieval scores are a weak witness there (a chat turn's BM25 gap is 0.5-0.7 of
the spread), but the reader itself can say which chunk its question is about: reading [sinks | candidates in time
order | window and question] once, the attention its last ``question_tokens`` tokens give each chunk is peaked on
the chunk that answers, as attention sorting (Peysakhovich & Lerer 2023, "Attention Sorting Combats Recency Bias in
Long Context Language Models", arXiv 2310.01427) and retrieval heads (Wu et al. 2024, "Retrieval Head
Mechanistically Explains Long-Context Factuality", arXiv 2404.15574) observe. The same largest-gap rule as
``select`` (Adaptive-k, arXiv 2506.08479) is applied to those per-chunk attention masses. Attention also peaks on a
chunk that only shares the question's words (a task's instructions, when the answer is a chain spread over many
chunks), so the head is then re-read alone and scored: it is read only when the model is surer of its next token
(the answer's first) reading the head alone than reading every candidate (a re-read-and-score step); the
``neighbours`` stage then adds the best's neighbours. Otherwise the candidates stay as they were. Costs one probe
forward of the model over the candidates and, when a head stands apart, one over the head (through the pipeline's
:class:`~memkit.retrieval.Reader`, nothing stored) per question; none at the block step.
``memory.selection()["focus"]`` reports the masses' gap and both probabilities.

Off by default: on the calibration split (``benchmarks/calibrate_focus.py``) the question of ``ruler_vt`` attends
the task's instruction chunk (gap 0.75-0.84) and in 7 of 10 samples the model is surer of its first token reading it
alone, so the chain's chunks would be dropped; docs/configuration.md has the numbers. Turn it on by naming it:
``retrieval: {question: {focus: {}}}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from memkit.configbase import check_number, check_positive
from memkit.retrieval.stage import Stage, StageConfig
from memkit.retrieval.stages.reread import probe_ids, probe_tokens
from memkit.retrieval.stages.select import largest_gap

if TYPE_CHECKING:  # pragma: no cover
    from memkit.retrieval.pipeline import Row, StepContext


@dataclass
class FocusConfig(StageConfig):
    min_gap: float = 0.5  # the attention head is read when its gap is at least this share of the masses' spread
    # (the stage is off by default: the calibration split refused it, docs/configuration.md)
    question_tokens: int = 32  # the last tokens of the question whose attention is read
    min_candidates: int = 4  # fewer candidates than this: nothing to choose among

    def __post_init__(self) -> None:
        check_number("focus.min_gap", self.min_gap, low=0.0, high=1.0)
        check_positive("focus.question_tokens", self.question_tokens, maximum=1 << 16)
        check_positive("focus.min_candidates", self.min_candidates, maximum=1 << 16)


def chunk_masses(mass: np.ndarray, first: int, lengths: list[int]) -> np.ndarray:
    """(k,) the sum of ``mass`` (N,) over each chunk's tokens, the chunks laid end to end from ``first``."""
    edges = first + np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (k + 1,)
    sums = np.concatenate([[0.0], np.cumsum(np.asarray(mass, np.float64))])  # (N + 1,)
    return sums[edges[1:]] - sums[edges[:-1]]


class FocusStage(Stage):
    name, phase, order, config_class, steps = "focus", "rank", 55, FocusConfig, ("question",)
    config: FocusConfig

    def run(self, rows: list[Row], ctx: StepContext) -> None:
        reader = ctx.reader
        if reader is None or not hasattr(reader, "attention"):
            return
        cfg = self.config
        for r in rows:
            ns = r.ns
            if ns is None or len(r.chosen) < cfg.min_candidates or any(w != "rank" for w in r.why.values()):
                continue  # nothing to choose among, or select already read a head
            order = sorted(r.chosen, key=lambda c: (ns.spans[c][0], c))  # time order, as the step reads them
            tail = r.request.tokens
            got = probe_tokens(r.request, [ns.spans[c] for c in order], [ns.token_ids.get(c) for c in order], ctx,
                               tail=tail if tail is not None else np.zeros(0, np.int64))
            if got is None or got[2].shape[0] == 0:
                continue  # a chunk's tokens are unknown, or there is no question to read
            sinks, pieces, question = got
            full = probe_ids(sinks, pieces, question)  # (1, N)
            mass, sure_all = reader.attention(full, min(cfg.question_tokens, int(question.shape[0])))
            per = chunk_masses(mass.numpy(), int(sinks.shape[0]), [int(p.shape[0]) for p in pieces])  # (k,)
            share, size = largest_gap(per, len(per))
            best = np.argsort(-per, kind="stable")
            info = r.selection["focus"] = {"gap": round(share, 4), "head": size, "min_gap": cfg.min_gap,
                                           "chunks": round(float(per.sum()), 4), "best": round(float(per[best[0]]), 4)}
            if share < cfg.min_gap or size == 0 or size >= len(per):
                continue
            keep = sorted(int(i) for i in best[:size])  # time order
            _, sure_head = reader.attention(probe_ids(sinks, [pieces[i] for i in keep], question), 1)
            info.update(sure_all=round(sure_all, 4), sure_head=round(sure_head, 4))
            if sure_head <= sure_all:
                continue  # the model is no surer of its answer reading the head alone: keep every candidate
            head = [order[int(i)] for i in best[:size]]
            r.chosen, r.target = head, len(head)
            r.why = {c: "focus" for c in head}
            r.selection["reason"] = f"focus: {size} chunk(s) whose attention lies above a gap of {share:.2f} of " \
                                    "the spread"
