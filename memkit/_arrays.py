"""Input normalisation shared by banks and the memory manager.

Turns numpy arrays and torch tensors (any float dtype, any device, non-contiguous) into
C-contiguous float32 / int64 numpy arrays, raising a typed error that says what to fix.
torch is never imported here: tensors are recognised by duck typing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from memkit.errors import DimensionMismatchError, InvalidInputError


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        t = x.detach().cpu()
        if t.is_floating_point() and str(t.dtype) in ("torch.bfloat16", "torch.float16"):
            t = t.float()
        return t.numpy()
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except Exception as exc:
        raise InvalidInputError(f"could not read input as an array ({exc}); pass a numpy array or torch tensor") from exc


def as_vectors(x: Any, dim: int | None, *, name: str = "vectors") -> np.ndarray:
    """(n, dim) float array-like -> C-contiguous float32 numpy array, validated."""
    if type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 2 and x.flags.c_contiguous:
        # Fast path for the common input (already float32, 2-d, contiguous): same checks, fewer calls.
        if dim is not None and x.shape[1] != dim:
            raise DimensionMismatchError(
                f"{name} have dimension {x.shape[1]} but the bank was created with dim={dim}; "
                "embed with the same retriever, or create a bank with the matching dim"
            )
        if not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).any(axis=1).sum())
            raise InvalidInputError(f"{name} contain NaN or inf in {bad} row(s); clean or drop those rows first")
        return x
    arr = _to_numpy(x)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.floating):
        raise InvalidInputError(
            f"{name} must be a floating-point array, got dtype {arr.dtype}; convert with .astype('float32')"
        )
    if arr.ndim != 2:
        hint = " (for one vector use v[None, :])" if arr.ndim == 1 else ""
        raise InvalidInputError(f"{name} must be 2-d with shape (n, dim), got shape {arr.shape}{hint}")
    if dim is not None and arr.shape[1] != dim:
        raise DimensionMismatchError(
            f"{name} have dimension {arr.shape[1]} but the bank was created with dim={dim}; "
            "embed with the same retriever, or create a bank with the matching dim"
        )
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).any(axis=1).sum())
        raise InvalidInputError(f"{name} contain NaN or inf in {bad} row(s); clean or drop those rows first")
    return out


def as_ids(x: Any, n: int | None = None, *, name: str = "ids") -> np.ndarray:
    """1-d integer array-like -> int64 numpy array of non-negative ids."""
    arr = _to_numpy(x)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise InvalidInputError(f"{name} must be integers, got dtype {arr.dtype}; pass an int64 array")
    if arr.ndim != 1:
        raise InvalidInputError(f"{name} must be 1-d, got shape {arr.shape}")
    out = np.ascontiguousarray(arr, dtype=np.int64)
    if n is not None and out.shape[0] != n:
        raise InvalidInputError(f"got {out.shape[0]} {name} for {n} vectors; pass exactly one id per vector")
    if out.size and (out < 0).any():
        raise InvalidInputError(f"{name} must be >= 0 (-1 marks padding in search results)")
    if out.size and out.max() >= 2**62:
        raise InvalidInputError(f"{name} must be < 2**62")
    if len(np.unique(out)) != len(out):
        raise InvalidInputError(f"{name} contain duplicates; each id may appear once per call")
    return out


MAX_K = 1 << 16  # 65,536 results per query: far above any retrieval use, small enough that (m, k) pads fit


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) <= 0:
        raise InvalidInputError(f"k must be a positive integer, got {k!r}")
    if int(k) > MAX_K:
        raise InvalidInputError(f"k={int(k):,} is above memkit's limit of {MAX_K:,} results per query (the result "
                                "is padded to k columns); ask for fewer, or page through the bank with bank.ids()")
    return int(k)
