"""The unit of a retrieval pipeline: a registered stage with its own dataclass config.

A stage is one named step of :class:`~memkit.retrieval.pipeline.Pipeline` (query, candidates, fusion, dedup,
select, neighbours, reread). It is registered by name in :data:`STAGES` (the one registration mechanism of
:mod:`memkit.registry`) together with its config dataclass, and it runs in one of three phases:

* ``query`` — before memory is locked: form each row's query vectors (an embedding, or a probe read);
* ``rank``  — under the memory manager's lock: search, fuse, filter and choose chunks;
* ``read``  — after the chosen chunks' pages are fetched: read them afresh through the pipeline's reader.

Within a phase, stages run by their ``order``. A stage sees only the rows of one step
(:class:`~memkit.retrieval.pipeline.Row`) and the step's context; it never calls the model runtime (a re-read goes
through the narrow :class:`~memkit.retrieval.pipeline.Reader` the pipeline is given). Adding one::

    @register_stage
    class MyStage(Stage):
        name, phase, order, config_class = "mine", "rank", 45, MyConfig
        def run(self, rows, ctx): ...

and naming it in a config (``retrieval: {question: {mine: {...}}}``) is all it takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from memkit.configbase import ConfigBase
from memkit.errors import ConfigError
from memkit.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from memkit.retrieval.pipeline import Row, StepContext

__all__ = ["Stage", "StageConfig", "STAGES", "register_stage", "PHASES", "STEPS"]

PHASES = ("query", "rank", "read")
STEPS = ("block", "question")  # a block of a long input; generate's step that reads the end of its prompt


@dataclass
class StageConfig(ConfigBase):
    """Base of a stage's config (a dataclass validated in ``__post_init__``)."""


class Stage:
    """One pipeline stage; subclasses set the class attributes and implement :meth:`run`."""

    name: ClassVar[str] = ""
    phase: ClassVar[str] = "rank"
    order: ClassVar[int] = 50
    config_class: ClassVar[type[StageConfig]] = StageConfig
    steps: ClassVar[tuple[str, ...]] = STEPS  # the steps it may run in
    required: ClassVar[bool] = False  # a step without it reads nothing (the pipeline refuses such a config)

    def __init__(self, config: StageConfig, *, step: str) -> None:
        self.config, self.step = config, step

    def run(self, rows: list[Row], ctx: StepContext) -> None:
        raise NotImplementedError


def _is_stage(obj: Any) -> bool:
    return (isinstance(obj, type) and issubclass(obj, Stage) and bool(obj.name) and obj.phase in PHASES
            and isinstance(obj.config_class, type) and issubclass(obj.config_class, StageConfig))


STAGES: Registry[type[Stage]] = Registry("retrieval stage", check=_is_stage,
                                         hint="or register one with memkit.retrieval.register_stage")


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: register a :class:`Stage` subclass under its ``name``."""
    if not _is_stage(cls):
        raise ConfigError(f"register_stage needs a Stage subclass with a name, a phase in {PHASES} and a "
                          f"StageConfig config_class; got {cls!r}")
    STAGES.register(cls.name, cls)
    return cls


BUILT_IN = {"query": "QueryStage", "candidates": "CandidatesStage", "fusion": "FusionStage", "dedup": "DedupStage",
            "select": "SelectStage", "focus": "FocusStage", "neighbours": "NeighboursStage", "reread": "RereadStage"}
for _name, _cls in BUILT_IN.items():  # one file each, imported on first use
    STAGES.register(_name, f"memkit.retrieval.stages.{_name}:{_cls}")
