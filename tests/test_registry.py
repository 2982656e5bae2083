"""The lazy, open backend registry: names, URIs, third-party registration, entry points."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import memkit
from memkit import bank as bank_module
from memkit.errors import ConfigError, UnknownBackendError

pytest.importorskip("faiss")


def test_available_backends_lists_all_eight() -> None:
    assert {"faiss-flat", "faiss-hnsw", "faiss-ivf", "hnswlib", "usearch", "disk", "qdrant", "milvus"} <= set(
        memkit.available_backends()
    )


def test_create_from_dict_and_config() -> None:
    b = memkit.create_bank({"backend": "faiss-hnsw", "dim": 8, "params": {"ef_search": 99}})
    assert b.name == "faiss-hnsw" and b.ef_search == 99
    b2 = memkit.create_bank(memkit.BankConfig(backend="faiss-flat", dim=4, metric="l2"))
    assert b2.metric == "l2" and b2.dim == 4
    with pytest.raises(ConfigError, match="needs dim"):
        memkit.create_bank("faiss-flat")


def test_uri_parsing() -> None:
    assert bank_module.parse_uri("disk:///data/mem") == ("disk", {"path": "/data/mem"})
    assert bank_module.parse_uri("qdrant://host:6333/coll") == (
        "qdrant", {"url": "http://host:6333", "collection": "coll"})
    assert bank_module.parse_uri("qdrant:///local/q") == ("qdrant", {"path": "/local/q"})
    with pytest.raises(UnknownBackendError):
        bank_module.parse_uri("ftp://x/y")


class _DictBank(memkit.BaseBank):
    """A complete third-party backend in ~30 lines (exact, numpy)."""

    name = "dict-test"

    def __init__(self, *, dim: int, metric: str = "ip") -> None:
        super().__init__(dim=dim, metric=metric)
        self.data: dict[int, np.ndarray] = {}

    def _add(self, vectors, ids): self.data.update(zip(ids.tolist(), vectors))
    def _remove(self, ids): return sum(self.data.pop(int(i), None) is not None for i in ids)
    def _contains(self, ids): return np.array([int(i) in self.data for i in ids], bool)
    def _count(self): return len(self.data)
    def _all_ids(self): return np.array(list(self.data), np.int64)
    def _get(self, ids): return np.stack([self.data[int(i)] for i in ids])
    def _reset(self): self.data.clear()

    def _search(self, q, k):
        ids = self._all_ids()
        mat = self._get(ids)
        s = -((q[:, None] - mat[None]) ** 2).sum(-1) if self.metric == "l2" else q @ mat.T
        order = np.argsort(-s, 1)[:, :k]
        return np.take_along_axis(s, order, 1), ids[order]

    def _save_files(self, directory: Path) -> None:
        ids = self._all_ids()
        np.save(directory / "ids.npy", ids)
        np.save(directory / "vecs.npy", self._get(ids) if len(ids) else np.empty((0, self.dim), np.float32))

    @classmethod
    def _load_files(cls, directory: Path, manifest: dict[str, Any], *, mmap: bool = False) -> memkit.BaseBank:
        b = cls(dim=manifest["dim"], metric=manifest["metric"])
        ids = np.load(directory / "ids.npy", allow_pickle=False)
        vecs = np.load(directory / "vecs.npy", allow_pickle=False)
        b.data = dict(zip(ids.tolist(), vecs))
        return b


def test_register_backend_class_and_round_trip(tmp_path: Path) -> None:
    memkit.register_backend("dict-test", _DictBank)
    b = memkit.create_bank("dict-test", dim=3)
    b.add(np.eye(3))
    b.save(tmp_path / "d")
    b2 = memkit.load_bank(tmp_path / "d")
    assert isinstance(b2, _DictBank) and b2.search(np.eye(3)[:1], 1).ids[0, 0] == 0


def test_register_lazy_path_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "thirdparty_bank_mod", sys.modules[__name__])
    memkit.register_backend("lazy-test", "thirdparty_bank_mod:_DictBank")
    assert memkit.create_bank("lazy-test", dim=2).name == "dict-test"
    with pytest.raises(ConfigError):
        memkit.register_backend("Upper", _DictBank)
    with pytest.raises(ConfigError):
        memkit.register_backend("x", object)  # type: ignore[arg-type]


def test_entry_point_group(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import EntryPoint

    ep = EntryPoint(name="ep-test", value="thirdparty_bank_mod:_DictBank", group=bank_module.ENTRY_POINT_GROUP)
    monkeypatch.setitem(sys.modules, "thirdparty_bank_mod", sys.modules[__name__])
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group=None: [ep] if group == ep.group else [])
    bank_module.BACKENDS.refresh()
    assert "ep-test" in memkit.available_backends()
    assert memkit.create_bank("ep-test", dim=2).name == "dict-test"
