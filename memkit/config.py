"""Dataclass configs for memkit: BankConfig, KVStoreConfig, MemoryConfig (with its style's block).

Config is data: each default's reason is in docs/configuration.md (the one place; a short note stays inline),
``__post_init__`` validates every field where it is given, and every config round-trips through
``to_dict``/``from_dict`` and JSON/YAML files (``save``/``load``).
Behaviour is registered elsewhere: backends in :data:`memkit.bank.BACKENDS`, policies in
:data:`memkit.policy.POLICIES`, retrievers in :data:`memkit.retrievers.RETRIEVERS`, styles in
:data:`memkit.styles.STYLES` (each style brings its own config block, e.g. :class:`~memkit.styles.MemLongConfig`).

Keys that moved into a style's block in memkit 0.2 (``memory_layers``, ``gate_init``, ``longmem_layer``...)
are still accepted at top level by ``from_dict``/``load_config``/``wrap(**overrides)``, with a FutureWarning
that names the new place. ``backend: usearch`` is shorthand for ``bank: {backend: usearch}``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from memkit.configbase import (
    ConfigBase,
    check_bool,
    check_choice,
    check_number,
    check_positive,
    is_cosine_setting,
    read_mapping,
)
from memkit.errors import ConfigError, InvalidInputError
from memkit.paths import check_dir_target, user_path
from memkit.retrieval.config import LEGACY_KEYS as LEGACY_RETRIEVAL
from memkit.retrieval.config import RetrievalConfig, migrate_legacy_retrieval
from memkit.styles import STYLES, LayerSpec, LongMemConfig, MemLongConfig, StyleConfig, style_config_class
from memkit.units import parse_bytes

__all__ = ["BankConfig", "KVStoreConfig", "MemoryConfig", "MemLongConfig", "LongMemConfig", "load_config",
           "resolve_layers", "is_cosine_setting"]

METRICS = ("ip", "cosine", "l2")
KV_DTYPES = ("fp32", "fp16", "bf16", "int8")
POSITION_SCHEMES = ("contiguous", "zero", "original")
MAX_TOP_K = 1024  # chunks per block; 1,024 x 128 tokens is far past any model's trained positions
MAX_TOKENS = 1 << 20  # window, block, chunk and sink sizes
LEGACY_RETRIEVAL_KEYS = tuple(LEGACY_RETRIEVAL)  # memkit 0.2's top-level retrieval keys, in InitVar order


class _Moved:
    """What a memkit 0.2 retrieval key reads as on a MemoryConfig: where it lives now. It is also the "not given"
    default of that keyword (dataclasses.replace hands it back unchanged), and refuses to stand in for a value."""

    def __init__(self, key: str) -> None:
        step, stage, setting = LEGACY_RETRIEVAL[key][-1]
        self.key, self.place = key, f"retrieval.{step}.{stage}" + (f".{setting}" if setting else "")

    def __repr__(self) -> str:
        return f"<MemoryConfig.{self.key} moved to {self.place}>"

    def __bool__(self) -> bool:
        raise ConfigError(f"MemoryConfig.{self.key} moved to {self.place}; read it there "
                          f"(config.retrieval.stage(step, stage)), see docs/configuration.md")


_MOVED = {key: _Moved(key) for key in LEGACY_RETRIEVAL_KEYS}
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|hpu|npu|meta)(:\d+)?")

# Old top-level keys -> (style, key in that style's block)
LEGACY_KEYS: dict[str, tuple[str, str]] = {
    "memory_layers": ("memlong", "memory_layers"), "retrieval_layers": ("memlong", "retrieval_layers"),
    "retriever_layer": ("memlong", "retriever_layer"), "gate_init": ("longmem", "gate_init"),
    "longmem_positions": ("longmem", "positions"), "sidenet": ("longmem", "sidenet"),
    "longmem_layer": ("longmem", "layer"), "longmem_chunk": ("longmem", "chunk"),
    "longmem_tokens": ("longmem", "tokens"),
}


@dataclass
class BankConfig(ConfigBase):
    """Which vector store holds the chunk embeddings, and how it is set up."""

    backend: str = "faiss-flat"  # exact search: memory banks are small enough that exact is cheap
    dim: int | None = None  # filled in by the memory manager from the retriever when left None
    metric: str = "ip"  # inner product; retrievers emit normalised vectors, so ip == cosine
    params: dict[str, Any] = field(default_factory=dict)  # backend-specific (ef_search, nlist, path...)

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or not self.backend:
            raise ConfigError("BankConfig.backend must be a non-empty backend name or URI, e.g. 'faiss-flat'")
        check_choice("BankConfig.metric", self.metric, METRICS)
        check_positive("BankConfig.dim", self.dim, allow_none=True)
        if not isinstance(self.params, dict) or not all(isinstance(k, str) for k in self.params):
            raise ConfigError("BankConfig.params must be a dict of backend parameters (string keys)")


@dataclass
class KVStoreConfig(ConfigBase):
    """Byte budgets per tier of the K/V page store, and how pages are stored."""

    device: str | None = None  # compute device; None = the model's device
    device_bytes: int = 2 << 30  # 2 GiB of pages on the accelerator leaves room for weights on 24 GB
    host_bytes: int = 16 << 30  # host RAM tier (pinned when CUDA is present)
    disk_dir: str | None = None  # None = no disk tier; pages beyond host_bytes are then an error
    disk_bytes: int = 1 << 40  # spill files on disk; effectively bounded by the disk
    dtype: str = "fp16"  # halves page bytes vs fp32 (4.0e-4 relative error on real K/V; docs/configuration.md)
    int8_scale: str = "channel"  # "page" or "channel": per-channel scales keep int8 error lower
    prefetch: bool = True  # start copies for the next block while the current one computes

    def __post_init__(self) -> None:
        for name in ("device_bytes", "host_bytes", "disk_bytes"):  # "2GB" reads like in `memkit plan`
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, parse_bytes(value))
                except InvalidInputError as exc:
                    raise ConfigError(f"KVStoreConfig.{name}: {exc}") from exc
        check_choice("KVStoreConfig.dtype", self.dtype, KV_DTYPES)
        check_choice("KVStoreConfig.int8_scale", self.int8_scale, ("page", "channel"))
        for name in ("device_bytes", "host_bytes", "disk_bytes"):
            check_positive(f"KVStoreConfig.{name}", getattr(self, name), allow_zero=True)
        check_bool("KVStoreConfig.prefetch", self.prefetch)
        if self.device is not None and (not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device)):
            raise ConfigError(f"KVStoreConfig.device={self.device!r} is not a torch device; use None (the model's "
                              "device), 'cpu', 'cuda' or 'cuda:N'")
        if self.disk_dir is not None:
            if not isinstance(self.disk_dir, (str, os.PathLike)) or not str(self.disk_dir).strip():
                raise ConfigError(f"KVStoreConfig.disk_dir must be a directory path or None, got {self.disk_dir!r}")
            self.disk_dir = os.fspath(self.disk_dir)
            check_dir_target(user_path(self.disk_dir, "KVStoreConfig.disk_dir", error=ConfigError),
                             f"KVStoreConfig.disk_dir={self.disk_dir!r}")
        if self.device_bytes == 0 and self.host_bytes == 0 and (self.disk_dir is None or self.disk_bytes == 0):
            raise ConfigError("KVStoreConfig: device_bytes, host_bytes and the disk tier are all 0, so no K/V page "
                              "could be stored; give host_bytes (e.g. '1GB') or a disk_dir with disk_bytes")

    def disk_path(self) -> Path | None:
        """``disk_dir`` with ``~`` and ``$VARIABLES`` expanded (:mod:`memkit.paths`); None without a disk tier."""
        if self.disk_dir is None:
            return None
        return user_path(self.disk_dir, "KVStoreConfig.disk_dir", error=ConfigError)


@dataclass
class MemoryConfig(ConfigBase):
    """Everything :func:`memkit.wrap` needs. Defaults are the best training-free setup measured here."""

    nested: ClassVar[dict[str, type[ConfigBase]]] = {"bank": BankConfig, "kvstore": KVStoreConfig,
                                                     "retrieval": RetrievalConfig}

    style: str = "memlong"  # registered style: "memlong" (retrieval causal attention) or "longmem" (gated joint)
    style_config: StyleConfig | None = None  # the style's block (MemLongConfig, LongMemConfig); None = defaults
    bank: BankConfig = field(default_factory=BankConfig)
    kvstore: KVStoreConfig = field(default_factory=KVStoreConfig)
    # Each default's reason, with the measurement behind it, is in docs/configuration.md (one place); short notes here.
    chunk_size: int = 128  # tokens per memory chunk (MemLong's)
    top_k: int = 12  # chunks a block reads (the question step: at most this many); 0 = window-only
    window: int = 512  # recent tokens attended exactly
    block_size: int = 256  # tokens per forward = per retrieval
    sink_tokens: int = 128  # first tokens always attended (attention sinks); <= chunk_size
    position_scheme: str = "contiguous"  # memory placed just before the window: distances stay < 8k
    retriever: str = "auto"  # registered retriever: "text" (MiniLM), "keys" (mean of keys); "auto" = text with a tokenizer
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)  # the block and question steps' stages
    policy: str = "recency_frequency"  # MemLong's dynamic update, run for real
    capacity_tokens: int | None = None  # None = unbounded (bounded by the K/V store budgets); else >= chunk_size
    protect_recent: float = 0.5  # recency_frequency: newest fraction never evicted
    flush_window: bool = True  # store what is still in the window at the end of a call (a chat turn is remembered)
    progress: bool = True  # tqdm progress bars on long inputs
    backend: InitVar[str | None] = None  # shorthand for bank.backend (not a field of its own)
    # memkit 0.2's retrieval keys: accepted with a FutureWarning and moved into `retrieval` (LEGACY_KEYS)
    max_chunk_similarity: InitVar[Any] = _MOVED["max_chunk_similarity"]
    fill_neighbors: InitVar[Any] = _MOVED["fill_neighbors"]
    question_tokens: InitVar[Any] = _MOVED["question_tokens"]
    question_neighbors: InitVar[Any] = _MOVED["question_neighbors"]
    question_top_k: InitVar[Any] = _MOVED["question_top_k"]
    question_lexical: InitVar[Any] = _MOVED["question_lexical"]
    question_reread: InitVar[Any] = _MOVED["question_reread"]

    def __post_init__(self, backend: str | None, *legacy: Any) -> None:
        given = {k: v for k, v in zip(LEGACY_RETRIEVAL_KEYS, legacy) if not isinstance(v, _Moved)}
        if given:  # the old keys win over the block's values (both given to the constructor: the newer spelling)
            moved = migrate_legacy_retrieval(given, stacklevel=5)["retrieval"]
            current = self.retrieval.to_dict() if isinstance(self.retrieval, RetrievalConfig) else self.retrieval
            self.retrieval = RetrievalConfig.from_dict(merge_retrieval(current if isinstance(current, dict) else {},
                                                                       moved))
        if isinstance(self.retrieval, dict):
            self.retrieval = RetrievalConfig.from_dict(self.retrieval)
        if not isinstance(self.retrieval, RetrievalConfig):
            raise ConfigError("MemoryConfig.retrieval must be a RetrievalConfig or a mapping {block: ..., question: "
                              "...} of stages")
        if isinstance(self.bank, dict):
            self.bank = BankConfig.from_dict(self.bank)
        if isinstance(self.kvstore, dict):
            self.kvstore = KVStoreConfig.from_dict(self.kvstore)
        if not isinstance(self.bank, BankConfig) or not isinstance(self.kvstore, KVStoreConfig):
            raise ConfigError("MemoryConfig.bank and .kvstore must be BankConfig / KVStoreConfig objects or dicts")
        if backend is not None:
            if not isinstance(backend, str) or not backend:
                raise ConfigError(f"backend must be a backend name or URI such as 'faiss-flat', got {backend!r}")
            if self.bank.backend not in (BankConfig.backend, backend):
                raise ConfigError(f"backend={backend!r} and bank.backend={self.bank.backend!r} disagree; give one")
            self.bank = dataclasses.replace(self.bank, backend=backend)
        if not isinstance(self.style, str) or self.style not in STYLES:
            raise ConfigError(f"MemoryConfig.style={self.style!r} is not a registered style; choose one of "
                              f"{STYLES.names()}")
        block_cls = style_config_class(self.style)
        if self.style_config is None:
            self.style_config = block_cls()
        elif isinstance(self.style_config, dict):
            self.style_config = block_cls.from_dict(self.style_config)
        if not isinstance(self.style_config, block_cls):
            raise ConfigError(f"style={self.style!r} takes a {block_cls.__name__} block, got "
                              f"{type(self.style_config).__name__}")
        self._validate_numbers()
        self._validate_names()

    def _validate_numbers(self) -> None:
        for name in ("chunk_size", "window", "block_size"):
            check_positive(f"MemoryConfig.{name}", getattr(self, name), maximum=MAX_TOKENS)
        check_positive("MemoryConfig.top_k", self.top_k, allow_zero=True, maximum=MAX_TOP_K)
        check_positive("MemoryConfig.sink_tokens", self.sink_tokens, allow_zero=True, maximum=MAX_TOKENS)
        check_positive("MemoryConfig.capacity_tokens", self.capacity_tokens, allow_none=True)
        if self.capacity_tokens is not None and self.capacity_tokens < self.chunk_size:
            raise ConfigError(f"MemoryConfig.capacity_tokens={self.capacity_tokens} is below one chunk "
                              f"({self.chunk_size} tokens): memory would always be empty. Use None (unbounded) or at "
                              "least chunk_size")
        check_number("MemoryConfig.protect_recent", self.protect_recent, low=0.0, high=1.0, high_open=True)
        check_bool("MemoryConfig.flush_window", self.flush_window)
        check_bool("MemoryConfig.progress", self.progress)

    def _validate_names(self) -> None:
        from memkit.policy import POLICIES
        from memkit.retrievers import RETRIEVERS

        check_choice("MemoryConfig.position_scheme", self.position_scheme, POSITION_SCHEMES)
        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            raise ConfigError(f"MemoryConfig.policy={self.policy!r} is not valid; choose one of {POLICIES.names()}")
        if not isinstance(self.retriever, str) or (self.retriever != "auto" and self.retriever not in RETRIEVERS):
            raise ConfigError(f"MemoryConfig.retriever={self.retriever!r} is not valid; choose 'auto' or one of "
                              f"{RETRIEVERS.names()}")

    # ------------------------------------------------------------------ round trip
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"style": self.style}
        assert self.style_config is not None
        out[self.style] = self.style_config.to_dict()
        for f in dataclasses.fields(self):
            if f.name in ("style", "style_config"):
                continue
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, ConfigBase) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"MemoryConfig.from_dict expects a dict, got {type(data).__name__}")
        data = migrate_legacy_retrieval(_migrate_legacy(dict(data)))
        style = data.get("style", "memlong")
        if not isinstance(style, str) or style not in STYLES:
            raise ConfigError(f"style={style!r} is not a registered style; choose one of {STYLES.names()}")
        blocks = [n for n in STYLES.names() if n in data]
        stray = [n for n in blocks if n != style]
        if stray:
            raise ConfigError(f"the config has a {stray[0]!r} block but style={style!r}; set style: {stray[0]} or "
                              f"remove the block")
        block = data.pop(style, None)
        if block is not None and not isinstance(block, (dict, StyleConfig)):
            raise ConfigError(f"the {style!r} block must be a mapping of its settings, got {type(block).__name__}")
        if isinstance(block, dict):
            block = style_config_class(style).from_dict(block)
        if block is not None:
            data["style_config"] = block
        names = {f.name for f in dataclasses.fields(cls)} | {"backend"}
        unknown = sorted(set(data) - names)
        if unknown:
            from memkit.errors import UnknownParameterError

            raise UnknownParameterError(f"MemoryConfig has no field(s) {unknown}; valid fields are "
                                        f"{sorted(names - {'style_config'})} and the style block {style!r}")
        for name, sub in cls.nested.items():
            if isinstance(data.get(name), dict):
                data[name] = sub.from_dict(data[name])
        return cls(**data)

    def replace(self, **changes: Any) -> MemoryConfig:
        """A copy with fields changed; a new ``style`` without ``style_config`` gets that style's default block."""
        if "style" in changes and changes["style"] != self.style and "style_config" not in changes:
            changes["style_config"] = None
        return dataclasses.replace(self, **changes)

    def with_style(self, style: str, **settings: Any) -> MemoryConfig:
        """A copy using ``style``, its block built from ``settings`` (over this config's block if the style is the
        same), e.g. ``cfg.with_style("longmem", sidenet=True)``."""
        base = self.style_block().to_dict() if style == self.style else {}
        return self.replace(style=style, style_config=style_config_class(style).from_dict({**base, **settings}))

    def style_block(self) -> Any:
        """The style's config block (a :class:`~memkit.styles.StyleConfig`)."""
        assert self.style_config is not None
        return self.style_config


def _migrate_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """Move memkit 0.1's flat style keys into their style's block, warning once with the new spelling."""
    moved = [k for k in data if k in LEGACY_KEYS]
    if not moved:
        return data
    style = data.get("style", "memlong")
    dropped = []
    for key in moved:
        owner, new = LEGACY_KEYS[key]
        value = data.pop(key)
        if owner != style:
            dropped.append(key)
            continue
        block = data.setdefault(owner, {})
        if isinstance(block, StyleConfig):
            block = data[owner] = block.to_dict()
        if isinstance(block, dict):
            block.setdefault(new, value)
    kept = [k for k in moved if k not in dropped]
    parts = []
    if kept:
        parts.append("moved into the style's block: " + ", ".join(f"{k} -> {LEGACY_KEYS[k][0]}.{LEGACY_KEYS[k][1]}"
                                                                  for k in kept))
    if dropped:
        parts.append(f"ignored (they belong to another style than {style!r}): {dropped}")
    warnings.warn("memkit config keys " + "; ".join(parts) + ". Write them in the style block, e.g. "
                  "`memlong: {memory_layers: all}` or `longmem: {gate_init: -8}`", FutureWarning, stacklevel=4)
    return data


def merge_retrieval(base: dict[str, Any] | RetrievalConfig, over: dict[str, Any]) -> dict[str, Any]:
    """A retrieval block ``over`` laid over ``base`` stage by stage: a stage's settings merge, ``false`` turns it off."""
    out = base.to_dict() if isinstance(base, RetrievalConfig) else {k: dict(v) if isinstance(v, dict) else v
                                                                   for k, v in base.items()}
    for step, stages in over.items():
        if not isinstance(stages, dict) or not isinstance(out.get(step), dict):
            out[step] = stages
            continue
        for name, value in stages.items():
            old = out[step].get(name)
            out[step][name] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def resolve_layers(spec: LayerSpec, num_layers: int) -> list[int]:
    """Turn a layer spec ('all', 'upper_half', [..]) into sorted layer indices for a model."""
    if spec is None or spec == "all":
        return list(range(num_layers))
    if spec == "upper_half":
        return list(range(num_layers // 2, num_layers))
    if spec == "lower_half":
        return list(range(num_layers // 2))
    if spec == "middle":
        return [num_layers // 2]
    layers = sorted({int(i) % num_layers if -num_layers <= int(i) < num_layers else -1 for i in spec})
    if -1 in layers or not layers:
        raise ConfigError(f"layer list {spec!r} must name layers in range [0, {num_layers}) for this model")
    return layers


def _refuse_two_backends(data: dict[str, Any], where: str) -> None:
    """``backend`` is shorthand for ``bank.backend``: one place may not give both with different values."""
    bank = data.get("bank")
    inner = bank.get("backend") if isinstance(bank, dict) else bank.backend if isinstance(bank, BankConfig) else None
    if data.get("backend") is not None and inner is not None and inner != data["backend"]:
        raise ConfigError(f"{where} set backend={data['backend']!r} and bank.backend={inner!r}; backend is shorthand "
                          "for bank.backend, so give one of them")


def load_config(source: str | Path | dict[str, Any] | MemoryConfig | None = None, **overrides: Any) -> MemoryConfig:
    """Build a MemoryConfig from a config object, dict, YAML/JSON path or keywords (keywords override)."""
    if source is None:
        base: dict[str, Any] = {}
    elif isinstance(source, MemoryConfig):
        base = source.to_dict()
    elif isinstance(source, dict):
        base = dict(source)
    elif isinstance(source, (str, Path)):
        base = read_mapping(source)
    else:
        raise ConfigError(
            f"config must be a MemoryConfig, dict or path to a YAML/JSON file, got {type(source).__name__}"
        )
    base = migrate_legacy_retrieval(base)
    overrides = migrate_legacy_retrieval(dict(overrides))
    _refuse_two_backends(base, "the config")
    _refuse_two_backends(overrides, "the keyword arguments")
    bank = overrides.get("bank")
    if isinstance(bank, BankConfig) or (isinstance(bank, dict) and "backend" in bank):
        base.pop("backend", None)  # a keyword bank.backend overrides the config's backend shorthand
    if "style" in overrides and overrides["style"] != base.get("style", "memlong"):
        base.pop(base.get("style", "memlong"), None)  # switching style: the old style's block does not apply
    for key, value in overrides.items():
        if key == "retrieval" and isinstance(value, dict) and isinstance(base.get(key), (dict, RetrievalConfig)):
            base[key] = merge_retrieval(base[key], value)  # a partial block overrides single stages' settings
        elif key in ("bank", "kvstore", *STYLES.names()) and isinstance(value, dict) and isinstance(
                base.get(key), dict):
            base[key] = {**base[key], **value}  # a partial block overrides single settings
        else:
            base[key] = value
    if "backend" in overrides and isinstance(base.get("bank"), dict):
        base["bank"] = {**base["bank"], "backend": overrides["backend"]}
        base.pop("backend")
    return MemoryConfig.from_dict(base)

