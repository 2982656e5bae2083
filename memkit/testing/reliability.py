"""Helpers for the reliability tests (``tests/test_reliability_*.py``): backends, reference data, subprocesses.

Nothing here is mocked: banks are real backends on real files, children are real processes killed
with real signals. What this module adds is bookkeeping shared by several test files:

* :data:`BACKENDS` / :func:`backend_params` / :func:`backend_available` — every registered backend and
  the parameters a test needs to create one (a directory for ``disk``).
* :func:`det_vectors` — vectors that are a pure function of their ids, so a parent process can check
  what a killed child wrote without any message from it.
* :func:`run_python` — run code in a fresh interpreter and report how it ended (a segfault or abort
  shows up as a negative return code instead of taking the test runner down).
* :func:`report` — print one ``RELIABILITY {json}`` line per measured figure (counts, RAM) and append
  it to ``$MEMKIT_RELIABILITY_LOG`` when set, for ``docs/guarantees.md``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BACKENDS", "EXACT", "backend_params", "backend_available", "det_vectors", "run_python", "report",
           "scale"]

# (registry name, module its extra provides)
BACKENDS: tuple[tuple[str, str], ...] = (
    ("faiss-flat", "faiss"), ("faiss-hnsw", "faiss"), ("faiss-ivf", "faiss"), ("hnswlib", "hnswlib"),
    ("usearch", "usearch"), ("disk", "sqlite_utils"), ("qdrant", "qdrant_client"), ("milvus", "pymilvus"),
)
EXACT = frozenset({"faiss-flat", "disk", "qdrant", "milvus"})
ROOT = Path(__file__).resolve().parents[2]


def backend_available(name: str) -> bool:
    """True when the backend's library is installed and its module imports."""
    library = dict(BACKENDS)[name]
    if importlib.util.find_spec(library) is None:
        return False
    from memkit.bank import get_backend_class

    try:
        get_backend_class(name)
    except Exception:
        return False
    return True


def backend_params(name: str, directory: Path | None = None) -> dict[str, Any]:
    """Parameters a test passes to ``create_bank`` besides dim/metric (small, fast settings)."""
    if name == "disk":
        return {"path": str(directory)} if directory is not None else {}
    if name == "faiss-ivf":
        return {"train_size": 64}  # trains during the tests, so both the flat and the IVF phase run
    if name == "hnswlib":
        return {"initial_capacity": 16}  # grows during the tests
    return {}


_A = np.random.default_rng(12345).uniform(0.1, 3.0, 1024).astype(np.float64)
_B = np.random.default_rng(54321).uniform(0.0, 6.3, 1024).astype(np.float64)


def det_vectors(ids: Any, dim: int, version: int = 1) -> np.ndarray:
    """(n, dim) float32 vectors that depend only on (id, version): the same bits in every process."""
    ids = np.asarray(ids, np.float64).reshape(-1, 1)
    x = np.sin(ids * _A[None, :dim] * (1.0 + 0.37 * version) + _B[None, :dim])
    return np.ascontiguousarray(x, np.float32)


def run_python(code: str, *args: str, timeout: float = 120, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (cwd = repository root) and return how it ended."""
    full_env = {**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def scale(default: int, env: str = "MEMKIT_RELIABILITY_SCALE") -> int:
    """``default`` times the integer in ``$MEMKIT_RELIABILITY_SCALE`` (1 when unset): longer runs on demand."""
    try:
        factor = max(1, int(os.environ.get(env, "1")))
    except ValueError:
        factor = 1
    return default * factor


def report(name: str, **figures: Any) -> None:
    """Print a ``RELIABILITY {...}`` line (visible with ``pytest -s``) and log it when asked."""
    line = json.dumps({"test": name, **figures}, sort_keys=True)
    print(f"RELIABILITY {line}")
    log = os.environ.get("MEMKIT_RELIABILITY_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(line + "\n")
