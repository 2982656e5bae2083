"""Stage ``candidates``: each row's bank search, one call per namespace for all its rows and queries.

Each query fetches ``k + max(k, extra)`` candidates (more than the k it needs: later stages skip near-duplicates
and chunks the call attends anyway), plus one per chunk that can lie inside the row's sinks. The row keeps every
query's ranking (for the ``fusion`` stage) and one candidate table: the candidates outside its sinks, best first by
their best score over the queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from memkit.configbase import check_positive
from memkit.retrieval.pipeline import Candidates
from memkit.retrieval.stage import Stage, StageConfig

if TYPE_CHECKING:  # pragma: no cover
    from memkit.retrieval.pipeline import Row, StepContext


@dataclass
class CandidatesConfig(StageConfig):
    extra: int = 16  # candidates fetched beyond k: at least this many (and at least k) more

    def __post_init__(self) -> None:
        check_positive("candidates.extra", self.extra, allow_zero=True, maximum=1 << 16)


def merged(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q rankings (Q, n) (-1 = padding) -> the distinct ids (m,) by their best score, and that score (m,)."""
    best: dict[int, float] = {}
    for c, v in zip(ids.reshape(-1).tolist(), scores.reshape(-1).tolist()):
        if c >= 0 and v > best.get(c, -np.inf):
            best[c] = v
    order = sorted(best, key=lambda c: -best[c])
    return np.asarray(order, np.int64), np.asarray([best[c] for c in order], np.float32)


class CandidatesStage(Stage):
    name, phase, order, config_class, required = "candidates", "rank", 20, CandidatesConfig, True
    config: CandidatesConfig

    def run(self, rows: list[Row], ctx: StepContext) -> None:
        live = [r for r in rows if r.live]
        if not live:
            return
        sinks = max((1 + (hi - lo) // ctx.chunk_size for r in live if (ex := r.request.exclude) is not None
                     for lo, hi in [ex]), default=0)
        fetch = ctx.k + max(ctx.k, self.config.extra) + sinks
        groups: dict[int, list[Row]] = {}
        for r in live:
            groups.setdefault(id(r.ns), []).append(r)
        for group in groups.values():
            ns = group[0].ns
            assert ns is not None
            q = np.concatenate([r.queries for r in group if r.queries is not None])  # (sum Q, E)
            scores, ids = ns.bank.search(q, fetch)  # (sum Q, fetch), best first
            at = 0
            for r in group:
                assert r.queries is not None
                n = r.queries.shape[0]
                sj, ij = scores[at:at + n], ids[at:at + n]
                at += n
                r.rankings = (sj, ij)
                cid, best = merged(sj, ij)
                r.known = dict(zip(cid.tolist(), best.tolist()))
                keep = ns.outside(cid, r.request.exclude)
                r.cand = r.pool = Candidates(cid[keep], best[keep])
