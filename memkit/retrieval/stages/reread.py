"""Stage ``reread``: the question reads its chunks and window as the plain model reads that short prompt.

Stored K/V were written while their block attended its own window and retrieved chunks; a small model misses a
needle it reads when the same tokens come without that context (shuffled-filler passkeys at 8k with the needle's
3 chunks attended: 0/5 with the stored K/V, 5/5 read afresh), and misses it too when only the chunks are read
afresh and the window keeps the K/V of its own reading (a KJV passkey at 16k). So the question step reads
[sinks | chunks | window] afresh through the pipeline's reader (one probe forward at positions 0..N-1, nothing
stored) and hands the K/V back; the style puts them where the stored ones were.

A chunk's tokens come from this call or, for a chunk an earlier call stored (ingest, then a question), from the
token ids memory keeps with it. The sinks in front are this call's when every chunk is this call's, else the
stream's own first ``sink_tokens`` tokens as memory holds them (none if that chunk is gone), cut before the first
chunk. A row with a chunk whose tokens are unknown (stored without ids) keeps the stored K/V.

``recent`` bounds the tokens after the chunks of a lookup (a question for which ``select`` chose fewer chunks than its
budget: a head stood apart, or few distinct candidates were found): it reads its own step and the window's latest
tokens, at most ``recent`` in all, and the style hides the window's older tokens from the question and the answer steps
of its block (they stay the window's, and reach memory as before). A question that reads its whole budget (no head:
an aggregate over the text, RULER's fwe) reads its whole window. A small reader loses a fact it reads a few hundred
tokens before the question (Liu et al. 2023, "Lost in the Middle", arXiv 2307.03172): the plain 135M model misses a
meadow passkey more than ~600 tokens before the question; docs/configuration.md says how the default was set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from memkit.configbase import check_bool, check_positive
from memkit.errors import ConfigError
from memkit.namespace import Retrieved
from memkit.retrieval.pipeline import Reread
from memkit.retrieval.stage import Stage, StageConfig

if TYPE_CHECKING:  # pragma: no cover
    from memkit.retrieval.pipeline import Row, RowRequest, StepContext


ORDERS = ("time", "best_last")


@dataclass
class RereadConfig(StageConfig):
    window: bool = True  # read the window afresh too (not only the chunks)
    order: str = "time"  # the chunks in time order, or "best_last": by merit, the best next to the question
    recent: int = 512  # a lookup (select chose < its budget) reads at most this many recent tokens (window + step); 0: all

    def __post_init__(self) -> None:
        check_bool("reread.window", self.window)
        check_positive("reread.recent", self.recent, allow_zero=True, maximum=1 << 20)
        if self.order not in ORDERS:
            raise ConfigError(f"reread.order must be one of {list(ORDERS)}, got {self.order!r}")


class RereadStage(Stage):
    name, phase, order, config_class, steps = "reread", "read", 70, RereadConfig, ("question",)
    config: RereadConfig

    def run(self, rows: list[Row], ctx: StepContext) -> None:
        if ctx.reader is None:
            return
        for r in rows:
            res = r.result
            if res is None or len(res) == 0:
                continue
            if self.config.order == "best_last":
                r.result = res = best_last(res, r.chosen)
            skip = skipped(r.request, self.config.recent) if lookup(r) else 0
            tail = None
            if self.config.window and r.request.window is not None:
                tail = np.asarray(r.request.window[skip:], np.int64)  # (w - skip,) the window's tokens read
            ids = probe_tokens(r.request, res.spans.tolist(), res.token_ids, ctx, window=self.config.window, tail=tail)
            if ids is None:
                continue
            sinks, pieces, window = ids
            full = probe_ids(sinks, pieces, window)
            keys, values = ctx.reader.read(full)
            r.reread = Reread(keys, values, int(sinks.shape[0]), [int(p.shape[0]) for p in pieces],
                              int(window.shape[0]), skip)


def lookup(row: Row) -> bool:
    """The question is a lookup: ``select`` chose fewer chunks than its budget (a head stood apart, or fewer distinct
    candidates than the budget were found), before neighbours and free slots were added."""
    return sum(w in ("head", "rank") for w in row.why.values()) < row.budget


def skipped(req: RowRequest, recent: int) -> int:
    """How many of the window's oldest tokens a question reading at most ``recent`` recent tokens (0: all) skips: the
    question's own step (``req.tokens`` = window then step) is always read, the window's latest fill the rest."""
    if recent <= 0 or req.window is None or req.tokens is None:
        return 0
    w = len(req.window)
    step = max(0, len(req.tokens) - w)
    return max(0, w - max(0, recent - step))


def best_last(res: Retrieved, merit: list[int]) -> Retrieved:
    """``res`` with its chunks reordered by merit (``merit``: ids, best first), the best last: the question then reads
    the best chunk right before the window, where a small reader uses what it reads most (Liu et al. 2023, "Lost in
    the Middle", arXiv 2307.03172; attention sorting, arXiv 2310.01427, puts the most attended document last)."""
    rank = {c: i for i, c in enumerate(merit)}
    ids = res.ids.tolist()
    order = sorted(range(len(ids)), key=lambda i: (-rank.get(ids[i], len(rank)), i))
    at = torch.as_tensor(order, dtype=torch.long)
    return Retrieved(res.ids[at], res.scores[at], res.spans[at], res.keys[at.to(res.keys.device)],
                     res.values[at.to(res.values.device)], res.namespace,
                     [res.texts[i] for i in order] if res.texts else [],
                     [res.token_ids[i] for i in order] if res.token_ids else [])


def probe_ids(sinks: np.ndarray, pieces: list[np.ndarray], tail: np.ndarray) -> torch.Tensor:
    """The (1, N) int64 ids a probe reads: [sinks | pieces... | tail]."""
    return torch.from_numpy(np.concatenate([sinks, *pieces, tail]).astype(np.int64))[None]


def probe_tokens(req: RowRequest, spans: list[list[int]] | list[tuple[int, int]], known: list[np.ndarray | None],
                 ctx: StepContext, *, window: bool = True, tail: np.ndarray | None = None
                 ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray] | None:
    """The token ids a probe reads for a row: (sinks, one array per chunk of ``spans`` (in reading order, (k', 2)
    stream positions) with ``known`` its stored token ids or None, the tail: ``tail`` if given, else the call's window, or
    nothing when ``window`` is False), or None when a chunk's tokens are unknown. Used by ``reread`` and
    ``focus``."""
    call, base = req.call_tokens, req.call_base
    pieces: list[np.ndarray] = []
    for i, (a, b) in enumerate(spans):
        ids = known[i] if i < len(known) else None
        if call is not None and a >= base and b - base <= call.shape[0]:
            pieces.append(np.asarray(call[a - base:b - base], np.int64))
        elif ids is not None:
            pieces.append(np.asarray(ids, np.int64))
        else:
            return None
    if not spans:
        return None
    first = min(int(a) for a, _ in spans)  # the earliest chunk (chunks may be read in another order)
    if call is not None and first >= base:
        sinks = np.asarray(call[:req.sinks], np.int64)  # this call's sinks
    else:
        n = min(ctx.sink_tokens, first)
        got = ctx.manager.tokens_of(0, n, namespace=req.namespace) if n > 0 else None
        sinks = got.numpy() if got is not None else np.zeros(0, np.int64)
    if tail is None:
        tail = req.window if window and req.window is not None else np.zeros(0, np.int64)
    return sinks, pieces, np.asarray(tail, np.int64)
