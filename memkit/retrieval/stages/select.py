"""Stage ``select``: how many candidates the step reads, and which.

Fixed: the first ``k`` candidates of the ranking (``k`` None = the step's budget, ``top_k``). Adaptive (the question
step's default): the count follows the evidence of this question, as Adaptive-k does (Taguchi, Maekawa & Bhutani
2025, "No Tuning, No Iteration, Just Adaptive-k", arXiv 2506.08479: cut the sorted similarities at their largest
gap). Each signal the earlier stages left on the candidates (the question query's cosine, the chunk-sized query's
cosine, BM25) is sorted; its largest gap among the first ``budget`` positions, as a share of the spread of its top
``budget + 1`` scores, says how clearly a head stands apart from the rest. The signal with the clearest head wins;
when that share is at least ``min_gap`` the step reads the head (its best chunks above the gap; the ``neighbours``
stage then brings the chunks around the best), else the first ``budget`` candidates as a fixed selection would.
A small reader answers a fact it is shown alone and misses it among a dozen chunks of distractors, so reading
the head only is what makes a clear question answerable; a question whose evidence has no clear head (an
aggregate over the text, a chain of assignments) keeps the whole budget. ``memory.selection()`` reports the choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from memkit.configbase import check_bool, check_number, check_positive
from memkit.errors import ConfigError
from memkit.retrieval.stage import Stage, StageConfig

if TYPE_CHECKING:  # pragma: no cover
    from memkit.retrieval.pipeline import Row, StepContext

SIGNALS = ("question", "query", "bm25")  # the question query's cosine, the chunk-sized query's cosine, BM25


@dataclass
class SelectConfig(StageConfig):
    k: int | None = None  # chunks read; None = the step's budget (top_k). With adaptive, the most read
    adaptive: bool = False  # read the head of the clearest signal when it stands apart (the question step: true)
    min_gap: float = 0.5  # a head is taken when its gap is at least this share of the top scores' spread (set on
    # the calibration split through the model: benchmarks/calibrate_reading.py; docs/configuration.md)
    signals: tuple[str, ...] | list[str] = SIGNALS  # which signals may decide
    min_candidates: int = 4  # a gap is read over at least this many candidates (with 2 or 3 any gap is most of the
    # spread: the head would always stand apart)

    def __post_init__(self) -> None:
        check_positive("select.k", self.k, allow_none=True, maximum=1024)
        check_bool("select.adaptive", self.adaptive)
        check_number("select.min_gap", self.min_gap, low=0.0, high=1.0)
        check_positive("select.min_candidates", self.min_candidates, maximum=1 << 16)
        if not isinstance(self.signals, (list, tuple)) or not self.signals or any(s not in SIGNALS
                                                                                  for s in self.signals):
            raise ConfigError(f"select.signals must be a non-empty list of {list(SIGNALS)}, got {self.signals!r}")
        self.signals = tuple(self.signals)


def largest_gap(scores: np.ndarray, budget: int) -> tuple[float, int]:
    """(share, head): the largest gap between consecutive scores sorted best first, among the first ``budget``
    positions, as a share of the spread of the top ``budget + 1`` scores, and how many scores lie above it.
    (0.0, 0) when there are fewer than two scores or they are all equal."""
    x = np.sort(np.asarray(scores, np.float64))[::-1][:budget + 1]  # (m,)
    if x.shape[0] < 2 or x[0] <= x[-1]:
        return 0.0, 0
    gaps = x[:-1] - x[1:]  # (m - 1,)
    i = int(np.argmax(gaps))
    return float(gaps[i] / (x[0] - x[-1])), i + 1


class SelectStage(Stage):
    name, phase, order, config_class, required = "select", "rank", 50, SelectConfig, True
    config: SelectConfig

    def run(self, rows: list[Row], ctx: StepContext) -> None:
        cfg = self.config
        budget = min(ctx.k, cfg.k) if cfg.k is not None else ctx.k
        for r in rows:
            if not r.live or r.cand is None:
                continue
            r.budget = budget
            ids = r.cand.ids
            head: list[int] | None = None
            if cfg.adaptive and len(ids) > 1 and budget > 1:
                head, r.selection = self._head(r, budget)
            else:
                r.selection = {"mode": "fixed", "k": budget}
            if head is None:
                r.target = budget
                r.chosen = [int(c) for c in ids[:budget]]
                r.why = {c: "rank" for c in r.chosen}
            else:
                r.target = len(head)
                r.chosen = head
                r.why = {c: "head" for c in head}
            r.selection["candidates"] = len(ids)
            r.selection["chosen"] = len(r.chosen)

    def _signals(self, r: Row, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Each signal's score of ``ids`` (n,): the queries' cosines and, when fused, BM25 (from the pool)."""
        assert r.ns is not None and r.queries is not None and r.pool is not None
        out: dict[str, np.ndarray] = {}
        names = ["query", "question"][:r.queries.shape[0]]
        for j, name in enumerate(names):
            if name in self.config.signals:
                out[name] = np.asarray(r.ns.scores_of(r.queries[j], ids), np.float64)
        if "bm25" in self.config.signals and "bm25" in r.pool.signals:
            at = dict(zip(r.pool.ids.tolist(), r.pool.signals["bm25"].tolist()))
            out["bm25"] = np.asarray([at.get(int(c), 0.0) for c in ids], np.float64)
        return out

    def _head(self, r: Row, budget: int) -> tuple[list[int] | None, dict[str, Any]]:
        """The evidence is read over the pool (every candidate outside the sinks, near-duplicates included: a filler's
        repeats are part of "the rest"); the head is the candidates left after skipping near-duplicates whose score
        by the deciding signal lies above its largest gap."""
        assert r.cand is not None and r.pool is not None
        pool = self._signals(r, r.pool.ids)
        shares = {name: largest_gap(s, budget) for name, s in pool.items()}
        info: dict[str, Any] = {"mode": "adaptive", "budget": budget, "min_gap": self.config.min_gap,
                                "gaps": {n: round(g, 4) for n, (g, _) in shares.items()}}
        if not shares or len(r.pool) < self.config.min_candidates:
            info["reason"] = "too few candidates to read a gap" if shares else "no signal"
            return None, info
        name = max(shares, key=lambda n: shares[n][0])
        share, size = shares[name]
        info.update(signal=name, gap=round(share, 4), head=size)
        if share < self.config.min_gap or size == 0 or size >= budget:
            info["reason"] = f"no clear head: the largest gap ({name}) is {share:.2f} of the spread < " \
                             f"{self.config.min_gap}" if share < self.config.min_gap else "the head fills the budget"
            return None, info
        floor = float(np.sort(pool[name])[::-1][size - 1])  # the lowest score above the gap
        by_id = dict(zip(r.pool.ids.tolist(), pool[name].tolist()))  # built-in stages only ever shrink the pool
        extra = np.asarray([c for c in r.cand.ids.tolist() if c not in by_id], np.int64)
        if len(extra):  # a user's stage added candidates: score them as the pool was scored
            by_id.update(zip(extra.tolist(), self._signals(r, extra)[name].tolist()))
        mine = np.asarray([by_id[int(c)] for c in r.cand.ids], np.float64)
        order = [i for i in np.argsort(-mine, kind="stable") if mine[i] >= floor]
        if not order:
            info["reason"] = "the head was skipped as near-duplicates"
            return None, info
        info["head"] = len(order)
        info["reason"] = f"{name}: {len(order)} chunk(s) above a gap of {share:.2f} of the spread"
        return [int(c) for c in r.cand.ids[order]], info
