"""A retrieval pipeline: the stages one step runs, the rows it reads for, and what they hand each other.

MemLong (Liu et al. 2024) retrieves the top-k chunks before each block; memkit's question step adds a question
query, a BM25 ranking, neighbours, a choice of how many chunks to read and a re-read. Each of these is a registered
:class:`~memkit.retrieval.stage.Stage`; a :class:`Pipeline` is the ordered list a step runs (``retrieval.block`` or
``retrieval.question`` of :class:`~memkit.retrieval.config.RetrievalConfig`). The memory manager runs it once per
step (:meth:`memkit.memory.MemoryManager.retrieve_step`): the ``query`` phase, then the ``rank`` phase under its
lock, then it fetches the chosen chunks' pages and records the trace, then the ``read`` phase.

Per row (a batch row of the step) a :class:`Row` carries the request (:class:`RowRequest`: namespace, the tokens
its query may read, the sinks to skip, what the call has read) and what the stages add: query vectors, the
candidate table (:class:`Candidates`: ids best first with every signal's score), the chosen chunks with why each was
chosen, the selection's reasons (reported by ``memory.selection()``) and, after the read phase, K/V read afresh.
The pipeline never calls the model runtime: a re-read or a probe query goes through the :class:`Reader` it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from memkit.errors import ConfigError
from memkit.retrieval.stage import PHASES, STAGES, Stage, StageConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from memkit.memory import MemoryManager
    from memkit.namespace import Namespace, Retrieved

__all__ = ["Pipeline", "Row", "RowRequest", "Candidates", "StepContext", "Reader", "Reread"]


class Reader(Protocol):
    """What a pipeline may ask of the model: read token ids afresh (a probe forward; nothing is stored)."""

    def read(self, ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """ids (1, N) -> per layer position-free keys and values (1, Hkv, N, D)."""

    def queries(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (1, N) -> position-free queries (1, Hkv, N, D) at the style's query layer."""

    def attention(self, ids: torch.Tensor, last: int) -> tuple[torch.Tensor, float]:
        """ids (1, N) -> ((N,) the attention the last ``last`` tokens give each token (mean over them, the heads
        and the layers that see the whole sequence; sums to 1), the probability of the most likely next token)."""


@dataclass
class RowRequest:
    """What one batch row of a step asks for."""

    namespace: str
    tokens: np.ndarray | None = None  # (t,) int64 ids the query may read, oldest first (window [+ question block])
    exclude: tuple[int, int] | None = None  # stream positions [lo, hi) attended anyway (the call's sinks)
    recent_query: np.ndarray | None = None  # (E,) keys retriever between blocks: mean in-context query, unit norm
    queries: np.ndarray | None = None  # (Q, E) given by the caller (retrieve_batch): the query stage keeps them
    words: np.ndarray | None = None  # (t,) lexical query given by the caller (retrieve_batch)
    call_tokens: np.ndarray | None = None  # (n,) the real tokens this call has read so far (generate), for reread
    call_base: int = 0  # stream position of the call's first token
    sinks: int = 0  # sink tokens the call holds
    window: np.ndarray | None = None  # (w,) token ids in the call's window (reread reads them too)


@dataclass
class Candidates:
    """Candidate chunks of one row, best first, with the score reported for each and every signal's score."""

    ids: np.ndarray  # (n,) int64
    score: np.ndarray  # (n,) float32: the best embedding score (what the trace reports)
    signals: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n,) float64, higher = closer

    def keep(self, index: Any) -> Candidates:
        """The candidates at ``index`` (a mask or positions), every signal kept in step."""
        return Candidates(self.ids[index], self.score[index], {k: v[index] for k, v in self.signals.items()})

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class Reread:
    """K/V of [sinks | chunks | window] read afresh for one row: per layer (1, Hkv, N, D)."""

    keys: dict[int, Any]
    values: dict[int, Any]
    sinks: int  # tokens before the first chunk
    lengths: list[int]  # tokens of each chunk, in the order of the row's retrieved chunks (as the style reads them)
    window: int  # window tokens at the end
    skip: int = 0  # the window's oldest tokens the question does not read (``reread.recent``); the style hides them


@dataclass
class Row:
    """One row flowing through the stages."""

    request: RowRequest
    ns: Namespace | None = None  # None: the namespace holds nothing (the row retrieves nothing)
    queries: np.ndarray | None = None  # (Q, E) query vectors; query 0 is the chunk-sized one
    rankings: tuple[np.ndarray, np.ndarray] | None = None  # each query's ranking: scores (Q, n), ids (Q, n), -1 pads
    cand: Candidates | None = None
    pool: Candidates | None = None  # the candidates before near-duplicates were skipped (select reads its evidence)
    known: dict[int, float] = field(default_factory=dict)  # every candidate seen -> its reported score
    target: int = 0  # chunks the selection wants
    budget: int = 0  # chunks the step may read at most
    chosen: list[int] = field(default_factory=list)  # ids, in order of merit
    why: dict[int, str] = field(default_factory=dict)  # id -> "rank" | "head" | "neighbour" | "fill"
    selection: dict[str, Any] = field(default_factory=dict)  # how many were chosen and why (memory.selection())
    result: Retrieved | None = None  # the chosen chunks with their pages, in time order (reread may reorder them)
    reread: Reread | None = None

    @property
    def live(self) -> bool:
        return self.ns is not None and self.queries is not None


@dataclass
class StepContext:
    """What every stage of one step may use."""

    manager: MemoryManager
    step: str
    k: int  # the step's chunk budget (top_k, or the caller's k)
    chunk_size: int
    sink_tokens: int
    retriever_input: str  # "text" or "keys": what the bank's vectors embed
    decode: Callable[[list[int]], str] | None = None  # token ids -> text (text retriever)
    reader: Reader | None = None


class Pipeline:
    """The stages of one step, in phase and order; see the module docstring."""

    def __init__(self, stages: list[Stage], step: str) -> None:
        self.step = step
        self.stages = sorted(stages, key=lambda s: (PHASES.index(s.phase), s.order))

    @classmethod
    def build(cls, step: str, configs: dict[str, StageConfig | None]) -> Pipeline:
        """A pipeline of the stages named in ``configs`` (None = off)."""
        stages = []
        for name, config in configs.items():
            if config is None:
                continue
            kind = STAGES.get(name)
            if step not in kind.steps:
                raise ConfigError(f"retrieval stage {name!r} runs only in {list(kind.steps)}, not in the {step} step")
            stages.append(kind(config, step=step))
        return cls(stages, step)

    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def run(self, phase: str, rows: list[Row], ctx: StepContext) -> None:
        """Run the stages of ``phase`` over ``rows``."""
        for stage in self.stages:
            if stage.phase == phase:
                stage.run(rows, ctx)
