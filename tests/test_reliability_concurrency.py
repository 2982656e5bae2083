"""Concurrency and isolation: many threads searching while others add, remove and save.

For every backend: 4 searcher threads, 2 writers (each adds batches of its own ids and removes some of
them) and a saver. Every search result must be consistent with *some* order of the operations: each
returned id was being added or stored before the search ended and was not removed (acknowledged) before
it started, and its score is the score of that id's own vector (no torn id/vector pairs). At the end the
bank holds exactly the added-minus-removed ids (none lost, none duplicated) and the last save loads.

For the MemoryManager: one writer per namespace, cross-namespace retrievers using the *same* embeddings
in every namespace (so a leak would be the nearest neighbour), removals, and concurrent saves. No
retrieval may return another namespace's chunk, pages must be the chunk's own, capacity_tokens and the
K/V byte budgets are never exceeded, and a saved memory loads only into a matching config.
(``memkit.testing.conformance`` has the basic per-backend concurrency smoke test; this is the strict one.)
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import memkit
from memkit.testing.reliability import BACKENDS, EXACT, backend_available, backend_params, det_vectors, report

DIM = 16


@pytest.mark.parametrize("backend", [b for b, _ in BACKENDS])
def test_searches_consistent_with_concurrent_writes(backend: str, tmp_path: Path) -> None:
    if not backend_available(backend):
        pytest.skip(f"{backend} is not installed")
    rounds = 12 if backend == "qdrant" else 30
    bank = memkit.create_bank(backend, dim=DIM, metric="ip", **backend_params(backend, tmp_path / "live"))
    base_ids = np.arange(300)
    bank.add(det_vectors(base_ids, DIM), ids=base_ids)
    added_at: dict[int, int] = {int(i): 0 for i in base_ids}  # id -> ns before add() was called
    removed_at: dict[int, int] = {}  # id -> ns after remove() returned
    book = threading.Lock()
    errors: list[BaseException] = []
    checked = [0, 0]  # searches, result ids
    stop = threading.Event()

    def searcher(seed: int) -> None:
        q = np.random.default_rng(seed).standard_normal((3, DIM)).astype(np.float32)
        try:
            while not stop.is_set():
                t0 = time.monotonic_ns()
                scores, ids = bank.search(q, 10)
                t1 = time.monotonic_ns()
                valid = ids >= 0
                assert ((ids == -1) == np.isneginf(scores)).all(), "torn result: ids and padding disagree"
                got = np.unique(ids[valid])
                vecs = det_vectors(ids[valid], DIM)
                np.testing.assert_allclose(scores[valid], np.einsum("ij,ij->i", np.repeat(q, valid.sum(1), 0), vecs),
                                           rtol=2e-3, atol=2e-3, err_msg="a score is not its id's own vector")
                with book:
                    for i in got.tolist():
                        assert i in added_at and added_at[i] < t1, f"id {i} returned before anyone added it"
                        assert removed_at.get(i, t0 + 1) > t0, f"id {i} returned after its removal finished"
                checked[0] += 1
                checked[1] += int(valid.sum())
        except BaseException as exc:
            errors.append(exc)

    def writer(w: int) -> None:
        try:
            for r in range(rounds):
                ids = np.arange(5) + 10_000 * (w + 1) + 10 * r
                with book:
                    for i in ids.tolist():
                        added_at[i] = time.monotonic_ns()
                bank.add(det_vectors(ids, DIM), ids=ids)
                victims = ids[:2].tolist() + ([int(ids[0]) - 8] if r else [])  # two new, one older id
                n = bank.remove(victims)
                t = time.monotonic_ns()
                with book:
                    known = [v for v in victims if v not in removed_at]
                    for v in victims:
                        removed_at.setdefault(v, t)
                assert n == len(known), f"remove reported {n}, expected {len(known)}"
        except BaseException as exc:
            errors.append(exc)

    def saver() -> None:
        try:
            while not stop.is_set():
                bank.save(tmp_path / "snap")
                time.sleep(0.05)
        except BaseException as exc:
            errors.append(exc)

    searchers = [threading.Thread(target=searcher, args=(s,)) for s in range(4)]
    writers = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    extra = [threading.Thread(target=saver)]
    for t in searchers + writers + extra:
        t.start()
    for t in writers:
        t.join()
    deadline = time.monotonic() + 30  # on a busy machine let slow backends finish a few checked searches
    while checked[0] < 3 and not errors and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for t in searchers + extra:
        t.join()
    try:
        assert not errors, repr(errors[0])
        expected = set(added_at) - set(removed_at)
        got = bank.ids().tolist()
        assert len(got) == len(set(got)) == len(bank) and set(got) == expected, "ids lost or duplicated"
        np.testing.assert_allclose(bank.get(got), det_vectors(got, DIM), rtol=1e-2 if backend == "usearch" else 1e-6,
                                   atol=1e-2 if backend == "usearch" else 1e-6)
        snap = memkit.load_bank(tmp_path / "snap")  # a save taken mid-stream is a consistent state
        snap_ids = snap.ids().tolist()
        assert set(snap_ids) <= set(added_at) and len(snap_ids) == len(snap)
        np.testing.assert_allclose(snap.get(snap_ids), det_vectors(snap_ids, DIM), rtol=1e-2, atol=1e-2)
        snap.close()
    finally:
        bank.close()
    report(f"concurrency_bank[{backend}]", searches=checked[0], result_ids_checked=checked[1],
           writes=2 * rounds * 2, exact=backend in EXACT)
    assert checked[0] >= 3  # searches verified while writers ran (slow backends on 2 busy cores manage few)


# ---------------------------------------------------------------------- MemoryManager: namespaces under load
L, H, C, D, E = 2, 2, 4, 8, DIM


def _pages(ids: np.ndarray) -> torch.Tensor:
    x = det_vectors(np.repeat(ids, L * 2 * H * C), D, version=5).reshape(len(ids), L, 2, H, C, D)
    return torch.from_numpy(x)


def _make_mm(**over):
    from memkit.config import MemoryConfig
    from memkit.memory import MemoryManager

    page = L * 2 * H * C * D * 4
    cfg = MemoryConfig(chunk_size=C, top_k=6, capacity_tokens=40 * C, policy="lru",
                       kvstore={"dtype": "fp32", "device_bytes": 16 * page, "host_bytes": 300 * page})
    dims = {"num_layers": L, "kv_heads": H, "head_dim": D, "embed_dim": E, **over}
    return MemoryManager(cfg, **dims)


def test_memory_manager_namespaces_isolated_under_concurrency(tmp_path: Path) -> None:
    mm = _make_mm()
    names = [f"user{i}" for i in range(5)]
    owner: dict[int, str] = {}
    book = threading.Lock()
    errors: list[BaseException] = []
    stats = {"retrievals": 0, "returned": 0, "saves": 0}
    stop = threading.Event()
    shared = det_vectors(np.arange(8), E)  # every namespace stores the same embeddings

    def writer(name: str) -> None:
        try:
            for r in range(60):
                pos = np.arange(4) + 4 * r
                emb = shared[pos % 8] + 1e-3 * det_vectors(pos, E)
                spans = np.stack([pos * C, pos * C + C], 1)
                ids = mm.add_chunks(_pages(pos)[:, :, 0], _pages(pos)[:, :, 1], emb, spans, namespace=name,
                                    texts=[f"{name}:{p}" for p in pos.tolist()])
                with book:
                    owner.update({int(i): name for i in ids})
                assert mm.num_tokens(name) <= 40 * C, "capacity_tokens exceeded"
                if r % 3 == 2:
                    mm.remove_chunks(mm.chunk_ids(name)[:2], namespace=name)
                    with book:
                        foreign = [i for i, o in owner.items() if o != name][:5]
                    assert mm.remove_chunks(foreign, namespace=name) == 0, "removed another namespace's chunk"
        except BaseException as exc:
            errors.append(exc)

    def retriever(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                batch_names = [names[i] for i in rng.integers(0, len(names), 3)]
                out = mm.retrieve_batch(shared[rng.integers(0, 8, 3)], batch_names, k=6)
                for r, name in zip(out, batch_names):
                    assert r.namespace == name
                    for j, text in enumerate(r.texts):
                        assert text is not None and text.startswith(name + ":"), f"{name} got {text}"
                        p = int(text.split(":")[1])
                        torch.testing.assert_close(r.keys[j], _pages(np.array([p]))[0, :, 0], rtol=0, atol=0)
                    with book:
                        assert all(owner.get(int(i), name) == name for i in r.ids.tolist()), "cross-namespace leak"
                    stats["returned"] += len(r)
                stats["retrievals"] += 3
        except BaseException as exc:
            errors.append(exc)

    def saver() -> None:
        try:
            while not stop.is_set():
                mm.save(tmp_path / "mem")
                stats["saves"] += 1
                time.sleep(0.05)
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(n,)) for n in names]
    others = [threading.Thread(target=retriever, args=(s,)) for s in range(3)] + [threading.Thread(target=saver)]
    for t in writers + others:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in others:
        t.join()
    assert not errors, repr(errors[0])
    every = [int(i) for n in names for i in mm.chunk_ids(n).tolist()]
    assert len(every) == len(set(every)) == len(mm.store), "chunk ids duplicated or pages orphaned"
    assert all(owner[i] == n for n in names for i in mm.chunk_ids(n).tolist())
    for t in mm.store.stats()["tiers"].values():
        assert t["peak_bytes"] <= t["budget_bytes"], "a K/V tier exceeded its byte budget"
    loaded = type(mm).load(tmp_path / "mem")  # a save taken under load is consistent
    for n in loaded.namespaces():
        assert all(owner[int(i)] == n for i in loaded.chunk_ids(n).tolist())
    report("concurrency_memory_manager", namespaces=len(names), retrievals=stats["retrievals"],
           chunks_returned_checked=stats["returned"], saves=stats["saves"], chunks_at_end=len(every))
    assert stats["retrievals"] > 10 and stats["saves"] >= 1


@pytest.mark.parametrize("change", [{"embed_dim": E * 2}, {"num_layers": L + 1}, {"kv_heads": 1}, {"head_dim": D // 2}])
def test_saved_memory_loads_only_into_matching_config(tmp_path: Path, change: dict) -> None:
    mm = _make_mm()
    pos = np.arange(6)
    mm.add_chunks(_pages(pos)[:, :, 0], _pages(pos)[:, :, 1], det_vectors(pos, E), np.stack([pos * C, pos * C + C], 1))
    mm.save(tmp_path / "mem")
    other = _make_mm(**change)
    keep = other.add_chunks(*(torch.zeros(1, other.num_layers, other.kv_heads, C, other.head_dim),) * 2,
                            np.ones((1, other.embed_dim), np.float32), [[0, C]], namespace="mine")
    with pytest.raises(memkit.IncompatibleMemoryError, match=next(iter(change))):
        other.load(tmp_path / "mem")
    assert other.chunk_ids("mine").tolist() == keep.tolist() and other.namespaces() == ["mine"]
    if other.page_shape != mm.page_shape:  # the K/V store alone refuses pages of another shape too
        from memkit.kvstore import KVStore

        mm.store.save(tmp_path / "pages-only")
        with pytest.raises(memkit.IncompatibleMemoryError):
            KVStore(other.config.kvstore, page_shape=other.page_shape).load(tmp_path / "pages-only")
