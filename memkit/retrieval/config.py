"""The ``retrieval:`` block of a memkit config: which stages each step runs, each with its own settings.

::

    retrieval:
      block:                      # every block of a long input (MemLong's retrieval before each block)
        query: {}
        candidates: {}
        dedup: {}
        select: {}
        neighbours: {}
      question:                   # generate's step that reads the end of the prompt (the question)
        query: {question_tokens: 32}
        candidates: {}
        fusion: {}
        dedup: {}
        select: {adaptive: true}
        neighbours: {of_best: 1}
        reread: {}

A step given in a config is merged with its defaults stage by stage: ``question: {fusion: {lexical_tokens: 24}}``
changes one setting, ``question: {reread: false}`` turns a stage off, and a stage registered by a user
(:func:`memkit.retrieval.register_stage`) or a built-in stage that is off by default (``focus``) is turned on by
naming it. Unknown stages and settings raise a
:class:`~memkit.errors.ConfigError` that lists the valid ones; a step without a stage it cannot read without
(``query``, ``candidates``, ``select``) is refused. The rationale of every default is in docs/configuration.md.

memkit 0.2's top-level keys still load, with a FutureWarning naming their new place (:data:`LEGACY_KEYS`).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

from memkit.configbase import ConfigBase
from memkit.errors import ConfigError, UnknownParameterError
from memkit.retrieval.stage import STAGES, STEPS, StageConfig

__all__ = ["RetrievalConfig", "DEFAULT_STEPS", "LEGACY_KEYS", "migrate_legacy_retrieval"]

# The stages each step runs by default, with the settings that differ from the stage config's own defaults.
DEFAULT_STEPS: dict[str, dict[str, dict[str, Any]]] = {
    "block": {"query": {}, "candidates": {}, "dedup": {}, "select": {}, "neighbours": {}},
    "question": {"query": {"question_tokens": 32}, "candidates": {}, "fusion": {}, "dedup": {},
                 "select": {"adaptive": True}, "neighbours": {"of_best": 1}, "reread": {}},
}

# memkit 0.2's top-level keys -> where they live now: [(step, stage, setting)], setting None = the stage on/off.
LEGACY_KEYS: dict[str, list[tuple[str, str, str | None]]] = {
    "max_chunk_similarity": [("block", "dedup", "max_similarity"), ("question", "dedup", "max_similarity")],
    "fill_neighbors": [("block", "neighbours", "fill"), ("question", "neighbours", "fill")],
    "question_tokens": [("question", "query", "question_tokens")],
    "question_neighbors": [("question", "neighbours", "of_best")],
    "question_top_k": [("question", "select", "k")],
    "question_lexical": [("question", "fusion", "lexical_tokens")],
    "question_reread": [("question", "reread", None)],
}


def _stage_config(step: str, name: str, value: Any) -> StageConfig | None:
    """One stage's entry of a step: a mapping of settings (merged over the step's defaults), a config object,
    or ``false``/None (off); ``true`` = on with the defaults."""
    if value is None or value is False:
        return None
    try:
        kind = STAGES.get(name)
    except ConfigError:
        raise ConfigError(f"retrieval.{step}: unknown stage {name!r}; valid stages are {STAGES.names()}") from None
    cls = kind.config_class
    if isinstance(value, cls):
        return value
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"retrieval.{step}.{name} must be a mapping of its settings, true or false; got {value!r}")
    settings = {**DEFAULT_STEPS.get(step, {}).get(name, {}), **value}
    valid = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise UnknownParameterError(f"retrieval.{step}.{name} has no setting(s) {unknown}; valid settings are {valid}")
    try:
        return cls(**settings)
    except ConfigError as exc:
        raise ConfigError(f"retrieval.{step}.{name}: {exc}") from exc


@dataclasses.dataclass
class RetrievalConfig(ConfigBase):
    """The stages of the block step and of the question step, each {stage name: its config, or None = off}."""

    block: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(DEFAULT_STEPS["block"]))
    question: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(DEFAULT_STEPS["question"]))

    def __post_init__(self) -> None:
        for step in STEPS:
            given = getattr(self, step)
            if given is None:
                given = {}
            if not isinstance(given, dict):
                raise ConfigError(f"retrieval.{step} must be a mapping of stage names to their settings, got "
                                  f"{type(given).__name__}")
            merged: dict[str, Any] = {name: {} for name in DEFAULT_STEPS[step]}
            merged.update(given)
            stages = {name: _stage_config(step, name, value) for name, value in merged.items()}
            for name in DEFAULT_STEPS[step]:
                kind = STAGES.get(name)
                if kind.required and stages.get(name) is None:
                    raise ConfigError(f"retrieval.{step} turns off the {name!r} stage: that step would read no "
                                      f"memory. Keep it on (remove `{name}: false`), or set top_k: 0 for no memory")
            for name in stages:
                if stages[name] is not None and step not in STAGES.get(name).steps:
                    raise ConfigError(f"retrieval stage {name!r} runs only in the {list(STAGES.get(name).steps)} "
                                      f"step(s), not in {step!r}")
            setattr(self, step, stages)

    def stages(self, step: str) -> dict[str, StageConfig | None]:
        """{stage name: its config, or None when off} of ``step`` ("block" or "question")."""
        if step not in STEPS:
            raise ConfigError(f"retrieval step must be one of {list(STEPS)}, got {step!r}")
        return dict(getattr(self, step))

    def stage(self, step: str, name: str) -> StageConfig | None:
        """One stage's config of ``step`` (None when the stage is off or not in that step)."""
        return self.stages(step).get(name)

    def with_stage(self, step: str, name: str, **settings: Any) -> RetrievalConfig:
        """A copy with settings of one stage of one step changed (the stage turned on if it was off)."""
        current = self.stage(step, name)
        base = current.to_dict() if current is not None else {}
        data = self.to_dict()
        data[step][name] = {**base, **settings}
        return RetrievalConfig.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return {step: {name: (cfg.to_dict() if cfg is not None else False) for name, cfg in getattr(self, step).items()}
                for step in STEPS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetrievalConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"retrieval must be a mapping with 'block' and/or 'question', got {type(data).__name__}")
        unknown = sorted(set(data) - set(STEPS))
        if unknown:
            raise UnknownParameterError(f"retrieval has no step(s) {unknown}; valid steps are {list(STEPS)}")
        return cls(**{k: copy.deepcopy(v) for k, v in data.items()})


def migrate_legacy_retrieval(data: dict[str, Any], *, stacklevel: int = 4) -> dict[str, Any]:
    """Move memkit 0.2's top-level retrieval keys of a config dict into its ``retrieval`` block (a FutureWarning
    names each new place). A key given both ways is refused."""
    moved = [k for k in LEGACY_KEYS if k in data]
    if not moved:
        return data
    block = data.get("retrieval")
    if isinstance(block, RetrievalConfig):
        block = block.to_dict()
    block = copy.deepcopy(block) if isinstance(block, dict) else {}
    places = []
    for key in moved:
        value = data.pop(key)
        for step, stage, setting in LEGACY_KEYS[key]:
            entry = block.setdefault(step, {}).get(stage, {})
            if entry is None or isinstance(entry, bool):
                entry = {}
            if setting is None:  # the stage on or off
                block[step][stage] = entry if value else False
                places.append(f"{key} -> retrieval.{step}.{stage}: {'{}' if value else 'false'}")
                continue
            entry = dict(entry) if isinstance(entry, dict) else entry.to_dict()
            if setting in entry and entry[setting] != value:
                raise ConfigError(f"{key}={value!r} and retrieval.{step}.{stage}.{setting}={entry[setting]!r} "
                                  "disagree; give one (the retrieval block)")
            entry[setting] = value
            if key == "question_top_k" and value is not None:
                entry["adaptive"] = False  # an explicit count replaces the evidence-driven choice
            block[step][stage] = entry
            places.append(f"{key} -> retrieval.{step}.{stage}.{setting}")
    data["retrieval"] = block
    warnings.warn("memkit config keys moved into the retrieval block: " + "; ".join(places) + ". Write them there, "
                  "e.g. `retrieval: {question: {select: {k: 3}}}` (see docs/configuration.md)", FutureWarning,
                  stacklevel=stacklevel)
    return data

