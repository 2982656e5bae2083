"""Stage ``fusion``: one ranking from the query rankings and a lexical one.

Reciprocal rank fusion (Cormack, Clarke & Buettcher 2009) of every query's ranking and, with ``lexical_tokens``, a
BM25 ranking (Robertson & Zaragoza 2009, :mod:`memkit.lexical`) of the row's last ``lexical_tokens`` token ids over
the token ids memory keeps per chunk. A needle shares rare words with its question (a name, a key, a uuid) that one
sentence embedding of a 128-token chunk dilutes; BM25 does not. When the BM25 best chunk scores at least ``lead``
times the median chunk, it leads the fused ranking: rank fusion alone lets two embedding rankings that agree on
filler outvote it. Chunks inside the row's sinks leave the BM25 ranking before the lead is chosen (a prompt's
opening instructions share the question's words). Each candidate keeps its best embedding score (what the trace
reports) and its BM25 score (a signal the ``select`` stage reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from memkit.configbase import check_number, check_positive
from memkit.retrieval.pipeline import Candidates
from memkit.retrieval.stage import Stage, StageConfig

if TYPE_CHECKING:  # pragma: no cover
    from memkit.retrieval.pipeline import Row, StepContext


@dataclass
class FusionConfig(StageConfig):
    lexical_tokens: int = 16  # BM25 of the last N token ids (and their adjacent pairs); 0 = rank fusion only
    lead: float = 2.0  # the BM25 best leads when it scores >= lead x the median chunk
    rrf_k: int = 60  # reciprocal rank fusion's k (Cormack et al.)
    k1: float = 1.2  # BM25 term-frequency saturation (Robertson & Zaragoza's usual value)
    b: float = 0.75  # BM25 length normalisation (the usual value)

    def __post_init__(self) -> None:
        check_positive("fusion.lexical_tokens", self.lexical_tokens, allow_zero=True, maximum=1 << 20)
        check_number("fusion.lead", self.lead, low=0.0)
        check_positive("fusion.rrf_k", self.rrf_k, allow_zero=True, maximum=1 << 20)
        check_number("fusion.k1", self.k1, low=0.0)
        check_number("fusion.b", self.b, low=0.0, high=1.0)


def fuse_ranks(scores: np.ndarray, ids: np.ndarray, *, k0: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reciprocal rank fusion of Q ranked candidate lists (Q, n), best first, -1 = padding: (ids, fused score, best
    raw score) ordered by fused score, ties by the best raw score."""
    fused: dict[int, float] = {}
    raw: dict[int, float] = {}
    for q in range(ids.shape[0]):
        for rank, (c, v) in enumerate(zip(ids[q].tolist(), scores[q].tolist())):
            if c < 0:
                continue
            fused[c] = fused.get(c, 0.0) + 1.0 / (k0 + rank + 1)
            raw[c] = max(raw.get(c, -np.inf), v)
    order = sorted(fused, key=lambda c: (-fused[c], -raw[c]))
    return (np.asarray(order, np.int64), np.asarray([fused[c] for c in order], np.float64),
            np.asarray([raw[c] for c in order], np.float32))


class FusionStage(Stage):
    name, phase, order, config_class = "fusion", "rank", 30, FusionConfig
    config: FusionConfig

    def run(self, rows: list[Row], ctx: StepContext) -> None:
        cfg = self.config
        for r in rows:
            if not r.live or r.rankings is None or r.queries is None:
                continue
            ns = r.ns
            assert ns is not None
            scores, ids = r.rankings  # (Q, fetch)
            words = r.request.words
            if words is None and cfg.lexical_tokens and r.request.tokens is not None and len(r.request.tokens):
                words = np.asarray(r.request.tokens[-cfg.lexical_tokens:], np.int64)
            if words is None and scores.shape[0] == 1:
                continue  # one ranking and no lexical one: nothing to fuse
            lead, bm25 = None, None
            if words is not None:
                lid, lsc, typical, bm25 = ns.lexical(words, ids.shape[1], k1=cfg.k1, b=cfg.b)
                usable = ns.outside(lid, r.request.exclude)
                lid, lsc = lid[usable], lsc[usable]
                if len(lid):
                    row = np.full((1, ids.shape[1]), -1, np.int64)
                    raw = np.full((1, ids.shape[1]), -np.inf, scores.dtype)
                    row[0, :len(lid)], raw[0, :len(lid)] = lid[:ids.shape[1]], ns.scores_of(r.queries, lid)[:ids.shape[1]]
                    scores, ids = np.concatenate([scores, raw]), np.concatenate([ids, row])
                    if lsc[0] >= cfg.lead * typical:
                        lead = int(lid[0])
            fused, _, best = fuse_ranks(scores, ids, k0=cfg.rrf_k)
            if lead is not None:
                at = int(np.flatnonzero(fused == lead)[0])
                order = np.r_[at, np.delete(np.arange(len(fused)), at)]
                fused, best = fused[order], best[order]
            r.known = dict(zip(fused.tolist(), best.tolist()))
            keep = ns.outside(fused, r.request.exclude)
            cand = Candidates(fused[keep], best[keep])
            if bm25 is not None:
                cand.signals["bm25"] = bm25(cand.ids)
            r.cand = r.pool = cand
