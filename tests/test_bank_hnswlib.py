"""hnswlib against the shared conformance suite, plus capacity growth and ef persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import memkit
from memkit.errors import ConfigError, CorruptFileError
from memkit.testing import BankConformance

pytest.importorskip("hnswlib")


class TestHnswlib(BankConformance):
    backend = "hnswlib"
    library = "hnswlib"
    extra = "hnswlib"


def _unit(rng: np.random.Generator, n: int, dim: int = 16) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_capacity_grows_past_initial_capacity() -> None:
    bank = memkit.create_bank("hnswlib", dim=16, initial_capacity=10)
    data = _unit(np.random.default_rng(0), 1000)
    for start in range(0, 1000, 7):  # many small adds cross the capacity several times
        bank.add(data[start:start + 7])
    assert len(bank) == 1000 and 1000 <= bank.capacity <= 2 * 1000
    _, ids = bank.search(data[:50], 1)
    assert (ids[:, 0] == np.arange(50)).mean() >= 0.95
    bank.add(_unit(np.random.default_rng(1), 5000))  # one add far past capacity
    assert len(bank) == 6000 and bank.capacity >= 6000


def test_deleted_slots_are_reused() -> None:
    bank = memkit.create_bank("hnswlib", dim=16, initial_capacity=100)
    rng = np.random.default_rng(0)
    for _ in range(60):  # add/evict churn at a constant size must not grow the index
        ids = bank.add(_unit(rng, 50))
        bank.remove(ids)
    assert len(bank) == 0 and bank.capacity == 100
    assert len(bank._deleted) <= 1024 + 100, "bookkeeping of removed labels must stay bounded"
    data = _unit(rng, 50)
    bank.add(data)
    _, got = bank.search(data, 1)
    assert (got[:, 0] == bank.ids()).mean() >= 0.95


def test_readding_removed_ids_after_slot_reuse() -> None:
    bank = memkit.create_bank("hnswlib", dim=16, metric="cosine")
    rng = np.random.default_rng(0)
    data = _unit(rng, 40)
    bank.add(data[:20])
    bank.remove(np.arange(10))
    bank.add(data[20:25])  # takes some of the deleted slots
    bank.add(data[:10], ids=np.arange(10))  # half revived in place, half brand new
    assert len(bank) == 25 and set(bank.ids().tolist()) == set(range(25))
    _, got = bank.search(data[:25], 1)
    assert got[:, 0].tolist() == list(range(25))
    np.testing.assert_allclose(bank.get(np.arange(10)), data[:10], atol=1e-6)


def test_ef_search_survives_save_load(tmp_path: Path) -> None:
    bank = memkit.create_bank("hnswlib", dim=16, ef_search=17, m=8, ef_construction=50)
    bank.add(_unit(np.random.default_rng(0), 300))
    bank.save(tmp_path / "b")
    loaded = memkit.load_bank(tmp_path / "b")
    assert loaded.ef_search == 17 and loaded.index.ef == 17
    assert loaded.params() == bank.params()
    assert memkit.load_bank(tmp_path / "b", mmap=True).read_only is False  # hnswlib cannot mmap


def test_search_pads_when_deletions_leave_fewer_than_k() -> None:
    bank = memkit.create_bank("hnswlib", dim=16, ef_search=1)
    data = _unit(np.random.default_rng(0), 30)
    bank.add(data)
    bank.remove(np.arange(27))
    scores, ids = bank.search(data[:4], 10)
    assert (np.sort(ids[:, :3], axis=1) == [27, 28, 29]).all() and (ids[:, 3:] == -1).all()
    assert np.isneginf(scores[:, 3:]).all() and bank.index.ef == 1


def test_l2_scores_are_negated_squared_distances() -> None:
    bank = memkit.create_bank("hnswlib", dim=16, metric="l2")
    data = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    bank.add(data)
    scores, ids = bank.search(data[:1] + 0.5, 3)
    expected = -((data[ids[0]] - (data[0] + 0.5)) ** 2).sum(1)
    np.testing.assert_allclose(scores[0], expected, rtol=1e-4)


@pytest.mark.parametrize("bad", [{"m": 1}, {"ef_search": 0}, {"growth": 1.0}, {"initial_capacity": 0}])
def test_bad_params(bad: dict) -> None:
    with pytest.raises(ConfigError):
        memkit.create_bank("hnswlib", dim=8, **bad)


def test_crafted_file_with_valid_checksums_is_refused(tmp_path: Path) -> None:
    """A file edited and re-checksummed (so only the structural checks stand) never reaches hnswlib."""
    from memkit.bank import read_manifest
    from memkit.files import MANIFEST, file_digests, write_json

    def _write_manifest(d: Path, manifest: dict) -> None:  # re-checksum every file, re-seal
        write_json(d / MANIFEST, dict(manifest, files=file_digests(d)))

    bank = memkit.create_bank("hnswlib", dim=16)
    bank.add(_unit(np.random.default_rng(0), 200))
    bank.save(tmp_path / "b")
    index_file = tmp_path / "b" / "index.hnsw"
    original = index_file.read_bytes()
    manifest = read_manifest(tmp_path / "b")
    manifest.pop("files")
    header, sdpe = 96, 16 * 4 + 8 + (2 * 16 * 4 + 4)
    cases = {
        "huge-count": original[:16] + (10**9).to_bytes(8, "little") + original[24:],
        "neighbour-out-of-range": original[: header + 4] + (10**6).to_bytes(4, "little") + original[header + 8:],
        "truncated": original[: header + sdpe * 3],
        "wrong-m": original[:72] + (99).to_bytes(8, "little") + original[80:],
    }
    for name, data in cases.items():
        index_file.write_bytes(data)
        _write_manifest(tmp_path / "b", manifest)
        with pytest.raises(CorruptFileError):
            memkit.load_bank(tmp_path / "b")
        assert name
    index_file.write_bytes(original)
    _write_manifest(tmp_path / "b", manifest)
    assert len(memkit.load_bank(tmp_path / "b")) == 200
