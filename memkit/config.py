"""Dataclass configs for memkit: BankConfig, KVStoreConfig, MemoryConfig.

Config is data: each default carries its reason inline, ``__post_init__`` validates, and every
config round-trips through ``to_dict``/``from_dict`` and JSON/YAML files (``save``/``load``).
Behaviour lives elsewhere (backends are registered in :mod:`memkit.bank`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from memkit.errors import ConfigError, UnknownParameterError

__all__ = ["BankConfig", "KVStoreConfig", "MemoryConfig", "load_config"]

Metric = Literal["ip", "cosine", "l2"]
METRICS = ("ip", "cosine", "l2")
KV_DTYPES = ("fp32", "fp16", "bf16", "int8")
STYLES = ("memlong", "longmem")
POSITION_SCHEMES = ("contiguous", "zero", "original")
POLICIES = ("fifo", "lru", "recency_frequency")

C = TypeVar("C", bound="_ConfigBase")


class _ConfigBase:
    """Shared dict/JSON/YAML round trip for the config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, _ConfigBase) else _plain(value)
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise UnknownParameterError(
                f"{cls.__name__} has no field(s) {unknown}; valid fields are {sorted(names)}"
            )
        kwargs = dict(data)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            sub = _SUBCONFIGS.get((cls.__name__, f.name))
            if sub is not None and isinstance(kwargs.get(f.name), dict):
                kwargs[f.name] = sub.from_dict(kwargs[f.name])
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON (``.json``) or YAML (``.yaml``/``.yml``)."""
        path = Path(path)
        data = self.to_dict()
        if path.suffix in (".yaml", ".yml"):
            yaml = _yaml()
            path.write_text(yaml.safe_dump(data, sort_keys=False))
        else:
            path.write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        """Read a config written by :meth:`save` (JSON or YAML; never executes code)."""
        return cls.from_dict(_read_mapping(path))

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def _yaml() -> Any:
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - pyyaml is a core dependency
        from memkit.errors import MissingDependencyError

        raise MissingDependencyError("YAML configs need PyYAML: pip install pyyaml") from exc
    return yaml


def _read_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass a path to a .yaml or .json file")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            data = _yaml().safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
        raise ConfigError(f"could not parse config file {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at top level")
    return data


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {list(choices)}")


def is_cosine_setting(value: Any) -> bool:
    """A max-similarity setting: None (off), "auto", or a cosine in (-1, 1]."""
    if value is None or value == "auto":
        return True
    return not isinstance(value, bool) and isinstance(value, (int, float)) and -1.0 < value <= 1.0


def _check_positive(name: str, value: Any, *, allow_zero: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ConfigError(f"{name} must be an integer {bound}, got {value!r}")


@dataclass
class BankConfig(_ConfigBase):
    """Which vector store holds the chunk embeddings, and how it is set up."""

    backend: str = "faiss-flat"  # exact search: memory banks are small enough that exact is cheap
    dim: int | None = None  # filled in by the memory manager from the retriever when left None
    metric: str = "ip"  # inner product; retrievers emit normalised vectors, so ip == cosine
    params: dict[str, Any] = field(default_factory=dict)  # backend-specific (ef_search, nlist, path...)

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or not self.backend:
            raise ConfigError("BankConfig.backend must be a non-empty backend name or URI, e.g. 'faiss-flat'")
        _check_choice("BankConfig.metric", self.metric, METRICS)
        _check_positive("BankConfig.dim", self.dim, allow_none=True)
        if not isinstance(self.params, dict):
            raise ConfigError("BankConfig.params must be a dict of backend parameters")


@dataclass
class KVStoreConfig(_ConfigBase):
    """Byte budgets per tier of the K/V page store, and how pages are stored."""

    device: str | None = None  # compute device; None = the model's device
    device_bytes: int = 2 << 30  # 2 GiB of pages on the accelerator leaves room for weights on 24 GB
    host_bytes: int = 16 << 30  # host RAM tier (pinned when CUDA is present)
    disk_dir: str | None = None  # None = no disk tier; pages beyond host_bytes are then an error
    disk_bytes: int = 1 << 40  # memory-mapped spill files; effectively bounded by the disk
    dtype: str = "fp16"  # halves page bytes vs fp32 at ~1e-3 relative error (see kvstore docs)
    int8_scale: str = "channel"  # "page" or "channel": per-channel scales keep int8 error lower
    prefetch: bool = True  # start copies for the next block while the current one computes

    def __post_init__(self) -> None:
        _check_choice("KVStoreConfig.dtype", self.dtype, KV_DTYPES)
        _check_choice("KVStoreConfig.int8_scale", self.int8_scale, ("page", "channel"))
        for name in ("device_bytes", "host_bytes", "disk_bytes"):
            _check_positive(f"KVStoreConfig.{name}", getattr(self, name), allow_zero=True)


LayerSpec = str | list[int] | None


@dataclass
class MemoryConfig(_ConfigBase):
    """Everything :func:`memkit.wrap` needs. Defaults are the best training-free setup measured here."""

    style: str = "memlong"  # retrieval causal attention (MemLong); "longmem" = gated joint attention
    backend: str = "faiss-flat"  # shorthand for bank.backend; ignored when bank.backend is set explicitly
    bank: BankConfig = field(default_factory=BankConfig)
    kvstore: KVStoreConfig = field(default_factory=KVStoreConfig)
    chunk_size: int = 128  # MemLong's chunk; a 5-digit passkey plus its sentence fits in one chunk
    top_k: int = 12  # chunks retrieved per block; 0 = window-only. Tokens 4k-8k of Richard III (block 256): 8 chunks
    # closed 54% of the perplexity gap from window-only to full attention, 12 closed 67%, 16 72%; more chunks cost speed; before
    # near-duplicates were collapsed (max_chunk_similarity) 12 diluted a 16k passkey that 8 found
    window: int = 512  # local window of recent tokens attended exactly
    block_size: int = 256  # tokens per forward = tokens per retrieval: 256 closed more of the Richard III gap than 512
    # (fresher retrieval) at the same speed; 128 was worse (a block's first tokens see less recent text)
    sink_tokens: int = 128  # first tokens always attended (as InfLLM's 128 initial tokens): 4 keep perplexity
    # calibrated (without any it doubles), 128 also keep a prompt's opening instruction visible; with 4 the
    # passkey failed at 4k, with 128 it passed (integrations measurements). Must be <= chunk_size.
    memory_layers: LayerSpec = "all"  # layers whose K/V are stored: all layers closed 46% of the ppl gap on Richard III
    # vs 29% for the upper half (top_k 8, block 512), and found the 16k depth-0.5 passkey the upper half missed
    retrieval_layers: LayerSpec = None  # layers attending memory; None = the memory layers
    max_chunk_similarity: float | str | None = "auto"  # skip a retrieved chunk whose embedding has cosine >= this
    # with a better one already chosen (the next candidate takes the slot): repeated text fills one slot, not k.
    # "auto" = 0.9 for text retrievers (MiniLM here: distinct Shakespeare chunks <= 0.73, shifted repeats of a
    # filler >= 0.96) and off for "keys" (mean keys of distinct chunks reach 0.997: no threshold separates them)
    position_scheme: str = "contiguous"  # memory placed just before the window: keeps distances < 8k
    retriever: str = "auto"  # "text" (MiniLM of chunk text), "keys" (mean of keys), "auto" = text if a tokenizer exists
    retriever_layer: int | None = None  # layer whose keys the "keys" retriever averages; None = middle
    policy: str = "recency_frequency"  # MemLong's dynamic update, run for real
    capacity_tokens: int | None = None  # None = unbounded (bounded by the K/V store budgets)
    protect_recent: float = 0.5  # recency_frequency: newest fraction never evicted
    gate_init: float = -8.0  # longmem: gate logit; sigmoid(-8)=3e-4, so untrained memory changes ~nothing
    longmem_positions: str = "none"  # longmem: "none" = memory keys un-rotated (LongMem); "scheme" = position_scheme
    sidenet: bool = False  # longmem: add the trainable residual SideNet
    longmem_layer: int | None = None  # longmem: memory-augmented layer; None = about 2/3 of depth
    longmem_chunk: int = 4  # longmem: tokens per memory chunk (the paper's value)
    longmem_tokens: int = 64  # longmem: memory tokens retrieved per query token
    progress: bool = True  # tqdm progress bars on long inputs

    def __post_init__(self) -> None:
        if isinstance(self.bank, dict):
            self.bank = BankConfig.from_dict(self.bank)
        if isinstance(self.kvstore, dict):
            self.kvstore = KVStoreConfig.from_dict(self.kvstore)
        _check_choice("MemoryConfig.style", self.style, STYLES)
        _check_choice("MemoryConfig.position_scheme", self.position_scheme, POSITION_SCHEMES)
        _check_choice("MemoryConfig.policy", self.policy, POLICIES)
        _check_choice("MemoryConfig.retriever", self.retriever, ("auto", "text", "keys"))
        _check_choice("MemoryConfig.longmem_positions", self.longmem_positions, ("none", "scheme"))
        for name in ("chunk_size", "window", "block_size", "longmem_chunk", "longmem_tokens"):
            _check_positive(f"MemoryConfig.{name}", getattr(self, name))
        _check_positive("MemoryConfig.top_k", self.top_k, allow_zero=True)
        _check_positive("MemoryConfig.sink_tokens", self.sink_tokens, allow_zero=True)
        _check_positive("MemoryConfig.capacity_tokens", self.capacity_tokens, allow_none=True)
        if not is_cosine_setting(self.max_chunk_similarity):
            raise ConfigError(f"MemoryConfig.max_chunk_similarity must be a cosine in (-1, 1], 'auto' or None "
                              f"(keep near-duplicate chunks), got {self.max_chunk_similarity!r}")
        if not 0.0 <= float(self.protect_recent) < 1.0:
            raise ConfigError(f"MemoryConfig.protect_recent must be in [0, 1), got {self.protect_recent}")
        for name in ("memory_layers", "retrieval_layers"):
            value = getattr(self, name)
            ok = value is None or value in ("all", "upper_half", "lower_half", "middle") or (
                isinstance(value, (list, tuple)) and all(isinstance(i, int) for i in value)
            )
            if not ok:
                raise ConfigError(
                    f"MemoryConfig.{name}={value!r}: use 'all', 'upper_half', 'lower_half', 'middle' "
                    "or a list of layer indices"
                )
            if isinstance(value, tuple):
                setattr(self, name, list(value))
        # `backend` is the shorthand users type; keep bank.backend in sync with it.
        if self.bank.backend == BankConfig.backend and self.backend != BankConfig.backend:
            self.bank = dataclasses.replace(self.bank, backend=self.backend)
        elif self.bank.backend != BankConfig.backend:
            self.backend = self.bank.backend


_SUBCONFIGS: dict[tuple[str, str], type[_ConfigBase]] = {
    ("MemoryConfig", "bank"): BankConfig,
    ("MemoryConfig", "kvstore"): KVStoreConfig,
}


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


def load_config(source: str | Path | dict[str, Any] | MemoryConfig | None = None, **overrides: Any) -> MemoryConfig:
    """Build a MemoryConfig from a config object, dict, YAML/JSON path or keywords."""
    if source is None:
        base: dict[str, Any] = {}
    elif isinstance(source, MemoryConfig):
        base = source.to_dict()
    elif isinstance(source, dict):
        base = dict(source)
    elif isinstance(source, (str, Path)):
        base = _read_mapping(source)
    else:
        raise ConfigError(
            f"config must be a MemoryConfig, dict or path to a YAML/JSON file, got {type(source).__name__}"
        )
    base.update(overrides)
    return MemoryConfig.from_dict(base)
