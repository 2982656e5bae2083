"""faiss-flat, faiss-hnsw and faiss-ivf against the shared conformance suite."""

from __future__ import annotations

import numpy as np
import pytest

import memkit
from memkit.testing import BankConformance

pytest.importorskip("faiss")


class TestFaissFlat(BankConformance):
    backend = "faiss-flat"
    library = "faiss"


class TestFaissHNSW(BankConformance):
    backend = "faiss-hnsw"
    library = "faiss"
    extra = "faiss"


class TestFaissIVF(BankConformance):
    backend = "faiss-ivf"
    library = "faiss"


def test_ivf_trains_itself_and_stays_searchable() -> None:
    rng = np.random.default_rng(0)
    bank = memkit.create_bank("faiss-ivf", dim=8, metric="l2", train_size=400)
    data = rng.standard_normal((1000, 8)).astype(np.float32)
    bank.add(data[:300])
    assert not bank.trained
    bank.add(data[300:])
    assert bank.trained and len(bank) == 1000
    _, ids = bank.search(data[:5], 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert bank.remove([0]) == 1
    _, ids = bank.search(data[:1], 1)
    assert ids[0, 0] != 0


def test_hnsw_rebuilds_after_many_removals() -> None:
    rng = np.random.default_rng(0)
    bank = memkit.create_bank("faiss-hnsw", dim=8, metric="l2", rebuild_fraction=0.2)
    data = rng.standard_normal((100, 8)).astype(np.float32)
    bank.add(data)
    bank.remove(np.arange(10))
    assert len(bank._tombstones) == 10
    bank.remove(np.arange(10, 20))
    assert len(bank._tombstones) == 0 and bank.index.ntotal == 80
    _, ids = bank.search(data[20:25], 1)
    assert ids[:, 0].tolist() == [20, 21, 22, 23, 24]
