"""memkit: long-term memory for any Hugging Face decoder.

``import memkit`` is light: it imports no vector library, no transformers and touches no GPU.
Backends load on first use through the registry in :mod:`memkit.bank`.

    >>> import memkit
    >>> bank = memkit.create_bank("faiss-flat", dim=384)
    >>> model = memkit.wrap(hf_model)          # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memkit.bank import BaseBank, MemoryBank, SearchResult, available_backends, create_bank, load_bank, register_backend
from memkit.config import BankConfig, KVStoreConfig, MemoryConfig, load_config
from memkit.errors import (
    CapacityError,
    ConfigError,
    CorruptFileError,
    DimensionMismatchError,
    IncompatibleLibraryError,
    IncompatibleMemoryError,
    InvalidInputError,
    MemkitError,
    MissingDependencyError,
    ReadOnlyError,
    SaveTargetError,
    UnknownBackendError,
    UnknownParameterError,
    UnsupportedModelError,
)

__version__ = "0.2.0"

__all__ = [
    "BankConfig", "BaseBank", "CapacityError", "ConfigError", "CorruptFileError", "DimensionMismatchError",
    "IncompatibleLibraryError", "IncompatibleMemoryError", "InvalidInputError", "KVStoreConfig", "MemkitError", "MemoryBank",
    "MemoryConfig", "MissingDependencyError", "ReadOnlyError", "SaveTargetError", "SearchResult", "UnknownBackendError",
    "UnknownParameterError", "UnsupportedModelError", "available_backends", "create_bank", "load_bank",
    "load_config", "register_backend", "wrap", "unwrap", "plan", "from_pretrained", "train",
    "__version__",
]

# Heavy entry points resolve lazily so `import memkit` stays free of torch/transformers.
_LAZY = {
    "wrap": "memkit.integrations.wrap:wrap",
    "unwrap": "memkit.integrations.wrap:unwrap",
    "from_pretrained": "memkit.integrations.wrap:from_pretrained",
    "train": "memkit.integrations.training:train",
    "plan": "memkit.planner:plan",
    "MemoryManager": "memkit.memory:MemoryManager",
    "KVStore": "memkit.kvstore:KVStore",
}

if TYPE_CHECKING:  # pragma: no cover
    pass


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'memkit' has no attribute {name!r}")
    import importlib

    module_name, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value
