"""Stage ``links``: the chunks a read head names again, so an answer that is a chain is read whole.

When the ``select`` stage reads a head (a few chunks standing apart), the answer may continue elsewhere: RULER's
variable tracking asks for every variable assigned a value, and the head holds only the first assignment
(``VAR A = 12345``); the next one (``VAR B = VAR A``) names ``A`` again in another chunk, and so on. Multi-hop readers
follow such shared entities; here a chunk is linked to the head when they share an adjacent-token pair found in at
most ``max_df`` chunks (a name or key spelled the same way twice, never a phrase common to the text), and when it is
among the step's candidates (so a rare phrase the question is not about links nothing). Links are followed up to
``hops`` times and never past the budget. A head of one fact that no other chunk names (a passkey, a fact told once)
gains nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from memkit.configbase import check_positive
from memkit.retrieval.stage import Stage, StageConfig

if TYPE_CHECKING:  # pragma: no cover
    from memkit.retrieval.pipeline import Row, StepContext


@dataclass
class LinksConfig(StageConfig):
    max_df: int = 2  # a pair shared by at most this many chunks links them
    hops: int = 8  # links followed from the head, one chunk further each time

    def __post_init__(self) -> None:
        check_positive("links.max_df", self.max_df, maximum=1 << 20)
        if self.max_df < 2:
            from memkit.errors import ConfigError

            raise ConfigError(f"links.max_df must be >= 2 (a pair in one chunk links nothing), got {self.max_df}")
        check_positive("links.hops", self.hops, allow_zero=True, maximum=1024)


class LinksStage(Stage):
    name, phase, order, config_class, steps = "links", "rank", 55, LinksConfig, ("question",)
    config: LinksConfig

    def run(self, rows: list[Row], ctx: StepContext) -> None:
        for r in rows:
            if not r.live or not r.chosen or not any(w == "head" for w in r.why.values()):
                continue
            ns = r.ns
            assert ns is not None
            frontier = list(r.chosen)
            added: list[int] = []
            for _ in range(self.config.hops):
                new = [c for f in frontier for c in ns.linked(f, self.config.max_df)
                       if c in r.known and c not in r.chosen and c not in added
                       and bool(ns.outside(np.asarray([c]), r.request.exclude)[0])]
                new = list(dict.fromkeys(new))[:max(0, r.budget - len(r.chosen) - len(added))]
                if not new:
                    break
                added += new
                frontier = new
            if added:
                r.chosen = r.chosen + added
                r.why.update({c: "link" for c in added})
                r.target = len(r.chosen)
                r.selection["links"] = len(added)
