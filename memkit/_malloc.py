"""Give freed heap memory back to the operating system (glibc ``malloc_trim``).

Reading a long input allocates and frees hundreds of MiB of activations per block while K/V pages
(about 3 MiB each for SmolLM2) accumulate between them. glibc keeps the freed blocks in its arenas,
so resident memory grew ~1.6x faster than the pages themselves (measured on SmolLM2, 2k -> 12k tokens:
RSS +328 MiB vs pages +225 MiB; after ``malloc_trim(0)`` +275 MiB, the pages plus their vectors and
texts). memkit calls :func:`trim` every few blocks and at the end of each call, so peak memory follows
what is live. On other C libraries (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

__all__ = ["trim"]

_libc: Any = None
_loaded = False


def _load() -> Any:
    global _libc, _loaded
    if not _loaded:
        _loaded = True
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                fn = getattr(lib, "malloc_trim", None)
                if fn is not None:
                    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
                    _libc = fn
            except OSError:  # pragma: no cover - no glibc
                _libc = None
    return _libc


def trim() -> bool:
    """Release free heap pages to the OS; True if glibc did (returns False where unsupported)."""
    fn = _load()
    return bool(fn(0)) if fn is not None else False
