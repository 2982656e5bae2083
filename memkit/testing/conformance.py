"""The conformance suite every MemoryBank backend passes (in the style of fsspec's tests/abstract).

A backend's test module subclasses :class:`BankConformance` and sets ``backend`` (registry
name) and ``library`` (the import its pip extra provides); ``bank_params`` adds per-test
parameters such as a directory. Exact backends must equal numpy brute force; approximate
ones must reach recall@10 >= 0.95 on 20,000 real MiniLM embeddings of real text with defaults.
"""

from __future__ import annotations

import importlib
import sys
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

import memkit
from memkit import bank as bank_module
from memkit.errors import (
    CorruptFileError,
    DimensionMismatchError,
    InvalidInputError,
    MemkitError,
    MissingDependencyError,
    SaveTargetError,
    UnknownBackendError,
    UnknownParameterError,
)

__all__ = ["BankConformance", "brute_force"]


def brute_force(base: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Reference top-k in numpy: (scores, ids), higher = closer."""
    base = base.astype(np.float64)
    q = queries.astype(np.float64)
    if metric == "cosine":
        base = base / np.linalg.norm(base, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    if metric == "l2":
        scores = -((q[:, None, :] - base[None, :, :]) ** 2).sum(-1)
    else:
        scores = q @ base.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), ids[order]


class BankConformance:
    """Subclass with ``backend = "<name>"`` and ``library = "<module>"``."""

    backend: ClassVar[str] = ""
    library: ClassVar[str] = ""
    extra: ClassVar[str] = ""
    recall_n: ClassVar[int] = 20_000
    concurrency_rounds: ClassVar[int] = 30

    # ------------------------------------------------------------------ fixtures
    @pytest.fixture
    def make(self, tmp_path: Path):
        made: list[Any] = []
        counter = iter(range(10_000))

        def factory(dim: int = 16, metric: str = "ip", **params: Any) -> memkit.BaseBank:
            merged = {**self.bank_params(tmp_path / f"bank{next(counter)}"), **params}
            b = memkit.create_bank(self.backend, dim=dim, metric=metric, **merged)
            made.append(b)
            return b

        yield factory
        for b in made:
            b.close()

    def bank_params(self, path: Path) -> dict[str, Any]:
        """Per-bank parameters (e.g. a directory for on-disk backends)."""
        return {}

    @staticmethod
    def rng(seed: int = 0) -> np.random.Generator:
        return np.random.default_rng(seed)

    def exact(self) -> bool:
        return memkit.bank.get_backend_class(self.backend).exact

    # ------------------------------------------------------------------ search quality
    @pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
    def test_matches_brute_force(self, make, metric: str) -> None:
        rng = self.rng(1)
        base = rng.standard_normal((500, 16)).astype(np.float32)
        queries = rng.standard_normal((20, 16)).astype(np.float32)
        b = make(16, metric)
        ids = b.add(base)
        scores, got = b.search(queries, 10)
        ref_scores, ref_ids = brute_force(base, ids, queries, 10, metric)
        assert scores.shape == (20, 10) and got.shape == (20, 10)
        assert scores.dtype == np.float32 and got.dtype == np.int64
        assert (np.diff(scores, axis=1) <= 1e-4).all(), "scores must be sorted, higher = closer"
        if self.exact():
            np.testing.assert_array_equal(got, ref_ids)
            np.testing.assert_allclose(scores, ref_scores, rtol=1e-3, atol=1e-3)
        else:
            recall = np.mean([len(set(g) & set(r)) / 10 for g, r in zip(got, ref_ids)])
            assert recall >= 0.9, f"recall@10 on 500 random vectors is {recall:.3f}"

    def test_recall_on_real_embeddings(self, make, real_vectors) -> None:
        base, queries = real_vectors[: self.recall_n], real_vectors[self.recall_n : self.recall_n + 200]
        b = make(base.shape[1], "ip")
        b.add(base)
        _, got = b.search(queries, 10)
        _, ref = brute_force(base, np.arange(len(base)), queries, 10, "ip")
        recall = float(np.mean([len(set(g) & set(r)) / 10 for g, r in zip(got, ref)]))
        floor = 0.999 if self.exact() else 0.95
        assert recall >= floor, f"{self.backend}: recall@10 = {recall:.4f} on {len(base)} real vectors"

    # ------------------------------------------------------------------ round trips
    def test_add_returns_ids_and_len(self, make) -> None:
        b = make()
        assert len(b) == 0
        ids = b.add(self.rng().standard_normal((5, 16)))
        assert ids.dtype == np.int64 and ids.tolist() == [0, 1, 2, 3, 4]
        more = b.add(self.rng(2).standard_normal((3, 16)))
        assert more.tolist() == [5, 6, 7] and len(b) == 8
        assert b.ids().tolist() == list(range(8))

    def test_explicit_ids_and_replace(self, make) -> None:
        b = make()
        v = self.rng().standard_normal((3, 16)).astype(np.float32)
        assert b.add(v, ids=[10, 20, 30]).tolist() == [10, 20, 30]
        new = self.rng(5).standard_normal((1, 16)).astype(np.float32)
        b.add(new, ids=[20])
        assert len(b) == 3
        _, got = b.search(new, 1)
        assert got[0, 0] == 20
        np.testing.assert_allclose(b.get([20]), new, rtol=1e-5, atol=1e-5)
        auto = b.add(v[:1])
        assert auto[0] == 31, "auto ids continue after the largest explicit id"

    def test_remove(self, make) -> None:
        b = make()
        v = self.rng().standard_normal((50, 16)).astype(np.float32)
        ids = b.add(v)
        assert b.remove(ids[:10]) == 10
        assert b.remove([0, 1, 999]) == 0
        assert len(b) == 40
        _, got = b.search(v[:10], 40)
        assert not set(got.ravel().tolist()) & set(range(10))
        assert set(b.ids().tolist()) == set(range(10, 50))
        again = b.add(v[:2], ids=[0, 1])
        assert again.tolist() == [0, 1] and len(b) == 42
        _, got = b.search(v[:1], 1)
        assert got[0, 0] == 0

    def test_k_larger_than_bank_and_empty(self, make) -> None:
        b = make()
        scores, ids = b.search(self.rng().standard_normal((2, 16)), 5)
        assert ids.shape == (2, 5) and (ids == -1).all() and np.isneginf(scores).all()
        b.add(self.rng().standard_normal((3, 16)))
        scores, ids = b.search(self.rng(3).standard_normal((2, 16)), 7)
        assert ids.shape == (2, 7)
        assert (ids[:, :3] >= 0).all() and (ids[:, 3:] == -1).all()
        assert np.isneginf(scores[:, 3:]).all() and np.isfinite(scores[:, :3]).all()
        empty_q = b.search(np.empty((0, 16), np.float32), 3)
        assert empty_q.ids.shape == (0, 3)

    def test_save_load_round_trip(self, make, tmp_path: Path) -> None:
        b = make(16, "cosine")
        v = self.rng().standard_normal((200, 16)).astype(np.float32)
        b.add(v, ids=np.arange(1000, 1200))
        b.remove([1000, 1001])
        q = self.rng(9).standard_normal((10, 16)).astype(np.float32)
        before = b.search(q, 5)
        b.save(tmp_path / "saved")
        b2 = memkit.load_bank(tmp_path / "saved")
        try:
            assert type(b2) is type(b) and b2.dim == 16 and b2.metric == "cosine"
            assert len(b2) == 198 and b2.ids().tolist() == list(range(1002, 1200))
            assert b2.params() == b.params()
            after = b2.search(q, 5)
            np.testing.assert_array_equal(after.ids, before.ids)
            np.testing.assert_allclose(after.scores, before.scores, rtol=1e-4, atol=1e-4)
            assert b2.add(v[:1]).tolist() == [1200], "auto ids continue after load"
        finally:
            b2.close()
        b.save(tmp_path / "saved")  # saving over an existing save replaces it
        memkit.load_bank(tmp_path / "saved").close()

    def test_reset(self, make) -> None:
        b = make()
        b.add(self.rng().standard_normal((20, 16)))
        b.reset()
        assert len(b) == 0
        assert b.add(self.rng().standard_normal((2, 16))).tolist() == [0, 1]

    def test_torch_inputs(self, make) -> None:
        torch = pytest.importorskip("torch")
        b = make(8, "ip")
        base = torch.randn(16, 30, generator=torch.Generator().manual_seed(0))[:, ::3][:, :8]  # non-contiguous
        assert not base.is_contiguous()
        ids = b.add(base.to(torch.bfloat16))
        assert len(ids) == 16
        _, got = b.search(base[:4].to(torch.float16), 1)
        assert got[:, 0].tolist() == ids[:4].tolist() or not self.exact()
        b.add(base.double()[:2], ids=torch.tensor([100, 101]))
        assert 100 in b and 101 in b

    def test_concurrent_search_add_remove(self, make) -> None:
        b = make(16, "ip")
        rng = self.rng(4)
        b.add(rng.standard_normal((200, 16)))
        errors: list[BaseException] = []
        removed: list[int] = []
        added: list[int] = []
        stop = threading.Event()

        def searcher() -> None:
            q = np.random.default_rng(threading.get_ident() % 1000).standard_normal((4, 16))
            try:
                while not stop.is_set():
                    s, i = b.search(q, 10)
                    assert s.shape == (4, 10) and i.shape == (4, 10)
                    assert ((i == -1) == np.isneginf(s)).all(), "torn result: id/score padding disagree"
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        def writer(offset: int) -> None:
            try:
                wrng = np.random.default_rng(offset)
                for r in range(self.concurrency_rounds):
                    new = b.add(wrng.standard_normal((5, 16)), ids=np.arange(5) + 10_000 * offset + 10 * r)
                    added.extend(new.tolist())
                    victim = int(new[0])
                    assert b.remove([victim]) == 1
                    removed.append(victim)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=searcher) for _ in range(3)]
        writers = [threading.Thread(target=writer, args=(i + 1,)) for i in range(2)]
        for t in threads + writers:
            t.start()
        for t in writers:
            t.join()
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        expected = set(range(200)) | (set(added) - set(removed))
        assert set(b.ids().tolist()) == expected and len(b) == len(expected), "ids lost or duplicated"

    # ------------------------------------------------------------------ bad input
    def _snapshot(self, b: memkit.BaseBank) -> tuple[list[int], np.ndarray]:
        ids = b.ids()
        return ids.tolist(), b.get(ids)

    @pytest.mark.parametrize(
        "bad, error",
        [
            (np.ones((2, 5), np.float32), DimensionMismatchError),
            (np.full((2, 16), np.nan, np.float32), InvalidInputError),
            (np.full((2, 16), np.inf, np.float32), InvalidInputError),
            (np.ones((2, 16), np.int64), InvalidInputError),
            (np.array([[object()] * 16] * 2, dtype=object), InvalidInputError),
            (np.ones(16, np.float32), InvalidInputError),
            ("not an array", InvalidInputError),
        ],
        ids=["wrong-dim", "nan", "inf", "int", "object", "1d", "string"],
    )
    def test_bad_vectors_leave_bank_unchanged(self, make, bad: Any, error: type) -> None:
        b = make()
        b.add(self.rng().standard_normal((10, 16)))
        before = self._snapshot(b)
        with pytest.raises(error) as info:
            b.add(bad)
        assert isinstance(info.value, MemkitError) and len(str(info.value)) > 20
        with pytest.raises(MemkitError):
            b.search(bad, 3)
        after = self._snapshot(b)
        assert after[0] == before[0]
        np.testing.assert_array_equal(after[1], before[1])

    @pytest.mark.parametrize("k", [0, -1, 2.5, None, True])
    def test_bad_k(self, make, k: Any) -> None:
        b = make()
        b.add(self.rng().standard_normal((3, 16)))
        with pytest.raises(InvalidInputError, match="k must be"):
            b.search(self.rng().standard_normal((1, 16)), k)

    def test_bad_ids(self, make) -> None:
        b = make()
        with pytest.raises(InvalidInputError):
            b.add(self.rng().standard_normal((2, 16)), ids=[1])
        with pytest.raises(InvalidInputError):
            b.add(self.rng().standard_normal((2, 16)), ids=[1, 1])
        with pytest.raises(InvalidInputError):
            b.add(self.rng().standard_normal((2, 16)), ids=[-3, 4])
        with pytest.raises(InvalidInputError):
            b.remove(np.array([1.5]))
        assert len(b) == 0

    def test_unknown_parameter(self, tmp_path: Path) -> None:
        with pytest.raises(UnknownParameterError, match="does not accept"):
            memkit.create_bank(self.backend, dim=8, no_such_knob=3, **self.bank_params(tmp_path / "b"))

    def test_unknown_backend(self) -> None:
        with pytest.raises(UnknownBackendError, match="known backend names"):
            memkit.create_bank(self.backend + "-nope", dim=8)

    def test_missing_library_names_extra(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cls = bank_module.get_backend_class(self.backend)
        monkeypatch.setitem(sys.modules, self.library, None)  # makes `import <library>` fail
        monkeypatch.delitem(sys.modules, cls.__module__)
        bank_module.BACKENDS.forget(self.backend)
        with pytest.raises(MissingDependencyError, match=rf"memkit\[{self.extra or self.library}\]"):
            memkit.create_bank(self.backend, dim=8)
        monkeypatch.undo()
        importlib.import_module(cls.__module__)

    # ------------------------------------------------------------------ files
    def _saved(self, make, tmp_path: Path) -> Path:
        b = make(16, "ip")
        b.add(self.rng().standard_normal((50, 16)))
        b.save(tmp_path / "s")
        return tmp_path / "s"

    def test_load_missing(self, tmp_path: Path) -> None:
        with pytest.raises(CorruptFileError, match="does not exist"):
            memkit.load_bank(tmp_path / "nothing-here")
        (tmp_path / "empty").mkdir()
        with pytest.raises(CorruptFileError, match="manifest"):
            memkit.load_bank(tmp_path / "empty")

    def test_load_truncated_and_bitflipped(self, make, tmp_path: Path) -> None:
        path = self._saved(make, tmp_path)
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and p.name != bank_module.MANIFEST]
        assert files, "a saved bank has data files"
        for target in files:
            original = target.read_bytes()
            if not original:
                continue
            target.write_bytes(original[: len(original) // 2])
            with pytest.raises(CorruptFileError):
                memkit.load_bank(path)
            flipped = bytearray(original)
            flipped[len(flipped) // 2] ^= 0x40
            target.write_bytes(bytes(flipped))
            with pytest.raises(CorruptFileError):
                memkit.load_bank(path)
            target.unlink()
            with pytest.raises(CorruptFileError, match="missing"):
                memkit.load_bank(path)
            target.write_bytes(original)
        memkit.load_bank(path).close()

    def test_save_never_replaces_what_memkit_did_not_write(self, make, tmp_path: Path) -> None:
        bank = make(dim=8)
        bank.add(np.eye(8, dtype=np.float32))
        tmp_path = tmp_path / "area"  # the backend may keep its own files in tmp_path
        project = tmp_path / "project"
        (project / "src").mkdir(parents=True)
        (project / "src" / "main.py").write_text("x")
        lone = tmp_path / "notes.txt"
        lone.write_text("keep me")
        (tmp_path / "link").symlink_to(project)
        for target in (project, project / "src", lone, tmp_path / "link", lone / "sub"):
            with pytest.raises(SaveTargetError):
                bank.save(target)
        assert (project / "src" / "main.py").read_text() == "x" and lone.read_text() == "keep me"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "notes.txt", "project"]  # nothing hidden
        for bad in (None, "", ".", 5):
            with pytest.raises(MemkitError):
                bank.save(bad)
        with pytest.raises(MemkitError):
            memkit.load_bank(None)  # type: ignore[arg-type]
        (tmp_path / "empty").mkdir()
        bank.save(tmp_path / "empty")  # an empty directory is fine
        bank.save(tmp_path / "empty")  # and so is a previous memkit save, replaced atomically
        (tmp_path / "empty" / "mine.txt").write_text("user file")
        with pytest.raises(SaveTargetError, match="did not write"):
            bank.save(tmp_path / "empty")  # a save with a user's file in it
        assert (tmp_path / "empty" / "mine.txt").read_text() == "user file"
        bank.close()

    def test_load_bad_manifest(self, make, tmp_path: Path) -> None:
        path = self._saved(make, tmp_path)
        manifest = path / bank_module.MANIFEST
        good = manifest.read_text()
        version = f'"version": {bank_module.FORMAT_VERSION}'
        assert version in good and '"metric": "ip"' in good
        for text in ("{not json", '{"format": "other"}', good.replace(version, '"version": 99'),
                     good.replace(f'"backend": "{self.backend}"', '"backend": "nope"'),
                     good.replace('"metric": "ip"', '"metric": "l2"')):  # an edit the seal catches
            manifest.write_text(text)
            with pytest.raises(MemkitError):
                memkit.load_bank(path)
        manifest.write_text(good)
        memkit.load_bank(path).close()
