"""Stage ``query``: each row's query vectors, formed from what the step may read.

MemLong (Liu et al. 2024) queries with the text before the block. The text retriever embeds the last ``tokens``
token ids the row may read (None = one chunk's worth); with ``question_tokens`` it also embeds the last
``question_tokens`` alone, a second query whose ranking the ``fusion`` stage fuses with the first (in a filler that
shares words with the question, the chunk-sized query is mostly filler). The ``keys`` retriever queries with the
mean position-free query of the recent tokens (the request's ``recent_query``) or, at the question step, with the
queries of the question's own tokens read afresh through the pipeline's reader (the window may be another call's).
Query 0 is always the chunk-sized one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from memkit.configbase import check_positive
from memkit.retrieval.stage import Stage, StageConfig

if TYPE_CHECKING:  # pragma: no cover
    from memkit.retrieval.pipeline import Row, StepContext

MAX_TOKENS = 1 << 20


@dataclass
class QueryConfig(StageConfig):
    tokens: int | None = None  # the chunk-sized query's tokens; None = chunk_size
    question_tokens: int = 0  # a second query of the last N tokens alone; 0 = off (question step default: 32)

    def __post_init__(self) -> None:
        check_positive("query.tokens", self.tokens, allow_none=True, maximum=MAX_TOKENS)
        check_positive("query.question_tokens", self.question_tokens, allow_zero=True, maximum=MAX_TOKENS)


class QueryStage(Stage):
    name, phase, order, config_class, required = "query", "query", 10, QueryConfig, True
    config: QueryConfig

    def run(self, rows: list[Row], ctx: StepContext) -> None:
        todo = [r for r in rows if r.queries is None]  # rows whose caller gave no query vectors
        if not todo:
            return
        if ctx.retriever_input == "keys":
            self._keys(todo, ctx)
        else:
            self._text(todo, ctx)

    def _windows(self, r: Row, ctx: StepContext) -> list[np.ndarray]:
        """Token id windows of one row: the chunk-sized one, then the question's (when on)."""
        toks = r.request.tokens
        if toks is None or not len(toks):
            return []
        n, n_q = self.config.tokens or ctx.chunk_size, self.config.question_tokens
        return [toks[-n:]] + ([toks[-n_q:]] if n_q else [])

    def _text(self, rows: list[Row], ctx: StepContext) -> None:
        if ctx.decode is None:
            from memkit.errors import InvalidInputError

            raise InvalidInputError("text queries need token ids decoded: pass decode=tokenizer.decode to "
                                    "MemoryManager.retrieve_step (or give each RowRequest its queries)")
        texts, owners = [], []
        for r in rows:
            wins = self._windows(r, ctx)
            texts += [ctx.decode([int(t) for t in w]) for w in wins]
            owners.append(len(wins))
        if not texts:
            return
        emb = ctx.manager.embed(texts=texts)  # (sum of queries, E)
        at = 0
        for r, q in zip(rows, owners):
            if q:
                r.queries = emb[at:at + q]  # (Q, E)
            at += q

    def _keys(self, rows: list[Row], ctx: StepContext) -> None:
        import torch

        for r in rows:
            wins = self._windows(r, ctx) if ctx.step == "question" and ctx.reader is not None else []
            if not wins:  # between blocks: the in-context queries of the recent tokens
                if r.request.recent_query is not None:
                    r.queries = np.asarray(r.request.recent_query, np.float32).reshape(1, -1)
                continue
            ids = torch.as_tensor(np.asarray(wins[0], np.int64))[None]  # (1, n): the question and what precedes it
            assert ctx.reader is not None
            q = ctx.reader.queries(ids)[0].float()  # (H, n, D)
            vecs = [q.mean(1)] + ([q[:, -len(wins[1]):].mean(1)] if len(wins) > 1 else [])  # each (H, D)
            unit = torch.nn.functional.normalize(torch.stack([v.reshape(-1) for v in vecs]), dim=-1)  # (Q, H*D)
            r.queries = unit.cpu().numpy()
