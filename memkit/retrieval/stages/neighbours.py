"""Stage ``neighbours``: the chunks just before and after chosen ones, so text split at a chunk boundary is read whole.

The neighbouring-chunk expansion of retrieval-augmented readers. Two rules:

* ``of_best``: the chunks around the best ``of_best`` chosen chunks are taken even when no slot is free (they
  displace the lowest-ranked, the budget is the bound): a question matches the words *before* its answer, and an
  answer split at a boundary is read whole (a 256k passkey in shuffled filler: the chunk ending "The pass key is"
  was retrieved, the digits in the next chunk were not);
* ``fill``: slots that near-duplicate skipping (or a small memory) left free below the selection's target take
  the chunks around the chosen ones, best chunk first (a 16k passkey in repeated filler: the needle's first half
  was skipped as a duplicate of filler and the key was missed).

A neighbour is the chunk before or after in the stream, never across the end of a call (a partial chunk: the next
chunk is another chat turn's text). A neighbour that is not among the candidates is scored against the row's
queries as the bank scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from memkit.configbase import check_bool, check_positive
from memkit.retrieval.stage import Stage, StageConfig

if TYPE_CHECKING:  # pragma: no cover
    from memkit.retrieval.pipeline import Row, StepContext


@dataclass
class NeighboursConfig(StageConfig):
    of_best: int = 0  # the best N chosen chunks bring their neighbours (the question step: 1)
    fill: bool = True  # free slots below the selection's target take neighbours of the chosen chunks

    def __post_init__(self) -> None:
        check_positive("neighbours.of_best", self.of_best, allow_zero=True, maximum=1 << 20)
        check_bool("neighbours.fill", self.fill)


class NeighboursStage(Stage):
    name, phase, order, config_class = "neighbours", "rank", 60, NeighboursConfig
    config: NeighboursConfig

    def run(self, rows: list[Row], ctx: StepContext) -> None:
        for r in rows:
            if not r.live or not r.chosen:
                continue
            ns, exclude = r.ns, r.request.exclude
            assert ns is not None
            if self.config.of_best > 0:
                top = r.chosen[:min(self.config.of_best, len(r.chosen))]
                need = ns.adjacent(top, top, max(0, r.budget - len(top)), exclude, whole=ctx.chunk_size)
                order = top + need + [c for c in r.chosen[len(top):] if c not in need]
                for c in need:
                    r.why.setdefault(c, "neighbour")
                r.chosen = order[:r.budget]
            if self.config.fill and 0 < len(r.chosen) < r.target:
                extra = ns.adjacent(r.chosen, r.chosen, r.target - len(r.chosen), exclude, whole=ctx.chunk_size)
                for c in extra:
                    r.why.setdefault(c, "fill")
                r.chosen = r.chosen + extra
            r.why = {c: r.why[c] for c in r.chosen}
