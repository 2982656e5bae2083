"""Stage ``dedup``: a candidate that is a near-duplicate of a better one gives up its place.

Maximal marginal relevance with a hard threshold (Carbonell & Goldstein 1998): going down the ranking, a candidate
whose retrieval embedding has cosine >= ``max_similarity`` with a candidate kept before it is dropped, so repeated
text (a filler, boilerplate) fills one slot, not k. ``"auto"`` = ``auto_text`` for text retrievers (MiniLM puts
distinct prose chunks <= 0.73 and shifted repeats of a filler >= 0.96) and off for the ``keys`` retriever (mean keys
of distinct chunks reach 0.997: no threshold separates them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from memkit.configbase import check_number, is_cosine_setting
from memkit.errors import ConfigError
from memkit.retrieval.stage import Stage, StageConfig

if TYPE_CHECKING:  # pragma: no cover
    from memkit.retrieval.pipeline import Row, StepContext


@dataclass
class DedupConfig(StageConfig):
    max_similarity: float | str | None = "auto"  # a cosine in (-1, 1], "auto", or None (keep near-duplicates)
    auto_text: float = 0.9  # what "auto" means for text retrievers

    def __post_init__(self) -> None:
        if not is_cosine_setting(self.max_similarity):
            raise ConfigError(f"dedup.max_similarity must be a cosine in (-1, 1], 'auto' or None (keep "
                              f"near-duplicate chunks), got {self.max_similarity!r}")
        check_number("dedup.auto_text", self.auto_text, low=-1.0, high=1.0, low_open=True)

    def threshold(self, retriever_input: str) -> float | None:
        """The cosine in force for a retriever that embeds ``retriever_input`` ("text" or "keys"), or None."""
        if self.max_similarity == "auto":
            return None if retriever_input == "keys" else float(self.auto_text)
        return None if self.max_similarity is None else float(self.max_similarity)


def distinct_rows(vectors: np.ndarray, max_similarity: float, k: int | None = None) -> np.ndarray:
    """Greedy pick over candidates in rank order (n, dim): the row indices (up to k) whose cosine with every row
    picked before is < ``max_similarity``."""
    v = np.asarray(vectors, np.float32)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    picked: list[int] = []
    for t in range(v.shape[0]):
        if not picked or float((v[picked] @ v[t]).max()) < max_similarity:
            picked.append(t)
            if k is not None and len(picked) == k:
                break
    return np.asarray(picked, np.int64)


class DedupStage(Stage):
    name, phase, order, config_class = "dedup", "rank", 40, DedupConfig
    config: DedupConfig

    def run(self, rows: list[Row], ctx: StepContext) -> None:
        threshold = self.config.threshold(ctx.retriever_input)
        if threshold is None:
            return
        for r in rows:
            if r.live and r.cand is not None and len(r.cand) > 1:
                assert r.ns is not None
                r.cand = r.cand.keep(distinct_rows(r.ns.vectors(r.cand.ids), threshold))
