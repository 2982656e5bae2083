"""Typed errors for memkit.

Every bad input raises a subclass of :class:`MemkitError`. Each message says what was wrong
and what to do about it; catching ``MemkitError`` is enough to handle any of them.
Subclasses also derive from the matching builtin (``ValueError``, ``ImportError``,
``KeyError``...) so code written against plain Python exceptions keeps working.
"""

from __future__ import annotations

__all__ = [
    "MemkitError",
    "ConfigError",
    "UnknownBackendError",
    "UnknownParameterError",
    "MissingDependencyError",
    "InvalidInputError",
    "DimensionMismatchError",
    "CorruptFileError",
    "ReadOnlyError",
    "IncompatibleMemoryError",
    "CapacityError",
    "UnsupportedModelError",
    "IncompatibleLibraryError",
    "SaveTargetError",
    "BackendUnavailableError",
]


class MemkitError(Exception):
    """Base class of every error memkit raises on purpose."""


class ConfigError(MemkitError, ValueError):
    """A configuration value is invalid (wrong type, out of range, unknown name)."""


class UnknownBackendError(ConfigError, KeyError):
    """No backend is registered under the requested name or URI scheme."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnknownParameterError(ConfigError, TypeError):
    """A backend or config was given a parameter it does not accept."""


class MissingDependencyError(MemkitError, ImportError):
    """An optional library is not installed; the message names the pip extra."""


class InvalidInputError(MemkitError, ValueError):
    """Vectors, ids, k or another argument is malformed (dtype, shape, NaN, ...)."""


class DimensionMismatchError(InvalidInputError):
    """Vectors have a different dimension than the bank or memory expects."""


class CorruptFileError(MemkitError, OSError):
    """A saved file is missing, truncated, corrupted or of an unknown version."""


class ReadOnlyError(MemkitError, PermissionError):
    """A write was attempted on a read-only bank (e.g. a memory-mapped view)."""


class IncompatibleMemoryError(MemkitError, ValueError):
    """A saved memory does not match the model or config it is loaded into."""


class CapacityError(MemkitError, ValueError):
    """A request cannot fit in the configured capacity or byte budget."""


class UnsupportedModelError(MemkitError, TypeError):
    """The model lacks what memkit needs to wrap it (e.g. an AttentionInterface hook)."""


class IncompatibleLibraryError(MemkitError, RuntimeError):
    """transformers or peft did not behave as memkit relies on (the message names the version and the range)."""


class SaveTargetError(MemkitError, OSError):
    """A save would replace something memkit did not write (a file, a link, a foreign directory), or its
    target cannot be written; nothing was changed."""


class BackendUnavailableError(MemkitError, ConnectionError):
    """A bank's server is down, unreachable or did not answer within the timeout. The message names the server
    and says what to do; what the bank acknowledged before is still on the server."""
