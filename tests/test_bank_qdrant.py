"""qdrant (embedded local mode, in memory and on a path) against the shared conformance suite.

A Qdrant server is not available on this machine (it is a separate Rust binary, not a pip
package). Server mode is the same code path with ``url=`` instead of ``path=`` (the client is
the only difference), plus ``SearchParams(exact=True)`` on each query.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import memkit
from memkit.testing import BankConformance

pytest.importorskip("qdrant_client")
pytestmark = [pytest.mark.filterwarnings("ignore:Local mode is not recommended:UserWarning"),
              pytest.mark.filterwarnings("ignore:Failed to obtain server version:UserWarning")]


class TestQdrantMemory(BankConformance):
    backend = "qdrant"
    library = "qdrant_client"
    extra = "qdrant"


class TestQdrantPath(BankConformance):
    """Local mode persisted in a directory (qdrant-client's own storage)."""

    backend = "qdrant"
    library = "qdrant_client"
    extra = "qdrant"

    def bank_params(self, path: Path) -> dict[str, Any]:
        return {"path": str(path)}

    def test_recall_on_real_embeddings(self, make, real_vectors) -> None:
        pytest.skip("same search code as TestQdrantMemory; persisting 20k points per test adds only time")


def test_local_mode_is_brute_force_exact() -> None:
    """The `exact = True` claim: local mode scores every point, so it equals numpy on ties-free data."""
    from memkit.testing.conformance import brute_force

    rng = np.random.default_rng(7)
    base = rng.standard_normal((3000, 24)).astype(np.float32)
    q = rng.standard_normal((40, 24)).astype(np.float32)
    for metric in ("ip", "l2", "cosine"):
        b = memkit.create_bank("qdrant", dim=24, metric=metric)
        try:
            ids = b.add(base)
            b.remove(ids[::3])
            keep = np.setdiff1d(ids, ids[::3])
            scores, got = b.search(q, 50)
            ref_s, ref_i = brute_force(base[keep], keep, q, 50, metric)
            np.testing.assert_array_equal(got, ref_i)
            np.testing.assert_allclose(scores, ref_s, rtol=1e-4, atol=1e-4)
        finally:
            b.close()


def test_uri_reopen_and_mismatch(tmp_path: Path) -> None:
    d = tmp_path / "q"
    v = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    b = memkit.create_bank(f"qdrant://{d}", dim=8, metric="cosine")
    assert b.local and b.path == str(d)
    b.add(v)
    b.close()
    b.close()  # idempotent
    with pytest.raises(memkit.MemkitError, match="closed"):
        len(b)
    with pytest.raises(memkit.errors.ConfigError, match="metric='cosine'"):
        memkit.create_bank(f"qdrant://{d}", dim=8, metric="ip")
    with pytest.raises(memkit.errors.ConfigError, match="dim=8"):
        memkit.create_bank(f"qdrant://{d}", dim=4, metric="cosine")
    b2 = memkit.create_bank(f"qdrant://{d}", dim=8, metric="cosine")
    try:
        assert len(b2) == 20
        assert b2.add(v[:1]).tolist() == [20], "auto ids continue after reopen"
        _, got = b2.search(v[1:4], 1)
        assert got[:, 0].tolist() == [1, 2, 3]
    finally:
        b2.close()


def test_bad_config() -> None:
    with pytest.raises(memkit.errors.ConfigError, match="not both"):
        memkit.create_bank("qdrant", dim=4, path="/tmp/x", url="http://localhost:6333")
    with pytest.raises(memkit.errors.ConfigError, match="batch_size"):
        memkit.create_bank("qdrant", dim=4, batch_size=0)
    with pytest.raises(memkit.errors.ConfigError, match="reachable"):  # nothing listens on this port
        memkit.create_bank("qdrant://127.0.0.1:1/coll", dim=4)


def test_snapshot_is_plain_npy_and_restores(tmp_path: Path) -> None:
    from memkit.backends.qdrant_bank import QdrantBank

    rng = np.random.default_rng(1)
    v = rng.standard_normal((300, 16)).astype(np.float32)
    b = memkit.create_bank("qdrant", dim=16, metric="l2")
    b.add(v, ids=np.arange(5, 305))
    b.save(tmp_path / "snap")
    b.close()
    ids = np.load(tmp_path / "snap" / "ids.npy", allow_pickle=False)
    vecs = np.load(tmp_path / "snap" / "vectors.npy", allow_pickle=False)
    order = np.argsort(ids)
    np.testing.assert_array_equal(ids[order], np.arange(5, 305))
    np.testing.assert_array_equal(vecs[order], v)
    restored = QdrantBank.restore(tmp_path / "snap", path=str(tmp_path / "local"))
    try:
        assert len(restored) == 300 and restored.add(v[:1]).tolist() == [305]
    finally:
        restored.close()
    with pytest.raises(memkit.errors.ConfigError, match="not empty"):
        QdrantBank.restore(tmp_path / "snap", path=str(tmp_path / "local"))
