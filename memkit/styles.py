"""Memory styles: how attention reads memory, each a registered strategy with its own config block.

A style is registered with its config class and the strategy that runs it inside a wrapped model::

    register_style("memlong", MemLongConfig, "memkit.integrations.memlong:MemLongStyle")

``MemoryConfig(style="longmem")`` then carries a :class:`LongMemConfig` under ``config.style_config``, written
to YAML/JSON as a block named after the style::

    style: longmem
    longmem: {layer: 20, sidenet: true}

The strategy class (torch, transformers) is imported only when a model is wrapped, so the config round trip
stays light. Built in:

* ``memlong`` — MemLong (Liu et al. 2024): retrieved chunk K/V join the local window under one causal softmax
  in the retrieval layers (:class:`MemLongConfig`: which layers store and read memory).
* ``longmem`` — LongMem (Wang et al. 2023): one memory layer, token-to-chunk retrieval, a separate softmax over
  memory mixed in by a learned per-head gate, optional residual SideNet (:class:`LongMemConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from memkit.configbase import ConfigBase, check_bool, check_choice, check_number, check_positive
from memkit.errors import ConfigError
from memkit.registry import Registry

__all__ = ["StyleConfig", "MemLongConfig", "LongMemConfig", "STYLES", "register_style", "style_config_class",
           "LayerSpec", "check_layer_spec", "LAYER_NAMES"]

LayerSpec = str | list[int] | None
LAYER_NAMES = ("all", "upper_half", "lower_half", "middle")


def check_layer_spec(name: str, value: Any, *, allow_none: bool) -> Any:
    """'all', 'upper_half', 'lower_half', 'middle', a list of layer indices (or None when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, str) and value in LAYER_NAMES:
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(i, int) and not isinstance(i, bool)
                                                          for i in value):
        return list(value)
    raise ConfigError(f"{name}={value!r}: use {', '.join(repr(n) for n in LAYER_NAMES)} or a non-empty list of "
                      "layer indices" + (" (or None)" if allow_none else ""))


class StyleConfig(ConfigBase):
    """Base of a style's config block (a dataclass). ``style`` is the registry name it belongs to."""

    style: ClassVar[str] = ""


@dataclass
class MemLongConfig(StyleConfig):
    """``style: memlong`` — which layers store memory and which attend it."""

    style: ClassVar[str] = "memlong"
    memory_layers: LayerSpec = "all"  # layers whose K/V are stored; why all: docs/configuration.md
    retrieval_layers: LayerSpec = None  # layers attending memory; None = the memory layers
    retriever_layer: int | None = None  # layer whose keys the "keys" retriever averages; None = middle

    def __post_init__(self) -> None:
        self.memory_layers = check_layer_spec("memlong.memory_layers", self.memory_layers, allow_none=False)
        self.retrieval_layers = check_layer_spec("memlong.retrieval_layers", self.retrieval_layers, allow_none=True)
        if self.retriever_layer is not None and (isinstance(self.retriever_layer, bool)
                                                 or not isinstance(self.retriever_layer, int)):
            raise ConfigError(f"memlong.retriever_layer must be a layer index or None, got {self.retriever_layer!r}")


@dataclass
class LongMemConfig(StyleConfig):
    """``style: longmem`` — LongMem's memory layer, token-to-chunk retrieval, gate and SideNet."""

    style: ClassVar[str] = "longmem"
    layer: int | None = None  # memory-augmented layer; None = about 2/3 of depth (the paper: 17 of 24)
    chunk: int = 4  # tokens per memory chunk (the paper's value)
    tokens: int = 64  # memory tokens retrieved per query token (the paper's 64 = 16 chunks of 4)
    gate_init: float = -8.0  # gate logit; sigmoid(-8) = 3e-4, so untrained memory changes ~nothing
    positions: str = "none"  # "none" = memory keys un-rotated (LongMem); "scheme" = the config's position_scheme
    sidenet: bool = False  # add the trainable residual SideNet

    def __post_init__(self) -> None:
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ConfigError(f"longmem.layer must be a layer index or None, got {self.layer!r}")
        check_positive("longmem.chunk", self.chunk, maximum=4096)
        check_positive("longmem.tokens", self.tokens, maximum=1 << 16)
        check_number("longmem.gate_init", self.gate_init, low=-50.0, high=50.0)
        check_choice("longmem.positions", self.positions, ("none", "scheme"))
        check_bool("longmem.sidenet", self.sidenet)


def _is_style_config(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, StyleConfig)


# name -> the strategy class ("module:Class", imported when a model is wrapped); meta["config"] = its config class
STYLES: Registry[Any] = Registry("style", hint="or register one with memkit.styles.register_style")


def register_style(name: str, config: type[StyleConfig], strategy: Any) -> None:
    """Register a style: its config block class and its strategy (a class or a lazy ``"module:Class"`` path)."""
    if not _is_style_config(config):
        raise ConfigError(f"register_style needs a StyleConfig dataclass for {name!r}, got {config!r}")
    config.style = name
    STYLES.register(name, strategy, config=config)


def style_config_class(name: str) -> type[StyleConfig]:
    """The config block class of a registered style."""
    cls: type[StyleConfig] = STYLES.meta(name)["config"]
    return cls


register_style("memlong", MemLongConfig, "memkit.integrations.memlong:MemLongStyle")
register_style("longmem", LongMemConfig, "memkit.integrations.longmem:LongMemStyle")
