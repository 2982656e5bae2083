"""milvus (embedded milvus-lite, temporary and on a path) against the shared conformance suite, plus what is
particular to it: URI parsing, reopening, the server bookkeeping paths, no leaked servers or threads, hostile
save directories, and a wrapped tiny model that retrieves through it.

Server mode is the same client code with ``uri=`` instead of ``path=``; its URI parsing and the bookkeeping it
uses (count, membership and ids asked from the server) are also tested here against milvus-lite's gRPC server,
and everything else against a real Milvus server in tests/test_milvus_server.py.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import memkit
from memkit import bank as bank_module
from memkit.errors import BackendUnavailableError, ConfigError, InvalidInputError, MissingDependencyError
from memkit.testing import BankConformance
from memkit.testing.conformance import brute_force

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]


class TestMilvusTemporary(BankConformance):
    """Embedded, in a private temporary database (the default)."""

    backend = "milvus"
    library = "pymilvus"
    extra = "milvus"


class TestMilvusPath(BankConformance):
    """Embedded, persisted in a milvus-lite database file."""

    backend = "milvus"
    library = "pymilvus"
    extra = "milvus"

    def bank_params(self, path: Path) -> dict[str, Any]:
        return {"path": str(path / "mem.db")}

    def test_recall_on_real_embeddings(self, make, real_vectors) -> None:
        pytest.skip("same search code as TestMilvusTemporary; a second 20k-vector build adds only time")


# ---------------------------------------------------------------------- URIs and parameters
def test_uri_parsing() -> None:
    assert bank_module.parse_uri("milvus://host:19530/notes") == (
        "milvus", {"uri": "http://host:19530", "collection": "notes"})
    assert bank_module.parse_uri("milvus://user:pw@10.0.0.5:19530/notes/") == (
        "milvus", {"uri": "http://user:pw@10.0.0.5:19530", "collection": "notes"})
    assert bank_module.parse_uri("milvus:///data/mem.db") == ("milvus", {"path": "/data/mem.db"})
    assert bank_module.parse_uri("milvus://") == ("milvus", {})
    for bad in ("milvus://host:19530", "milvus://host:19530/", "milvus://host:19530/db/coll", "milvus://mem.db",
                "milvus://./mem.db/x", "milvus:///"):
        with pytest.raises(ConfigError, match=r"milvus:///data/mem\.db"):
            bank_module.parse_uri(bad)


def test_server_uri_reaches_the_client_and_fails_cleanly() -> None:
    with pytest.raises(BackendUnavailableError, match="reachable") as info:  # nothing listens on port 1
        memkit.create_bank("milvus://user:secret@127.0.0.1:1/notes", dim=4)
    assert "secret" not in str(info.value), "credentials must not appear in error messages"


@pytest.mark.parametrize("params, match", [
    ({"path": "/tmp/x.db", "uri": "http://localhost:19530"}, "not both"),
    ({"uri": "localhost:19530"}, "http://host:19530"),
    ({"uri": "/tmp/local.db"}, "path="),
    ({"token": "t"}, "server"),
    ({"db_name": "d"}, "server"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": True}, "batch_size"),
    ({"timeout": -1}, "timeout"),
    ({"index_type": "NOPE"}, "index_type"),
    ({"index_type": "IVF_PQ"}, "milvus-lite cannot build"),
    ({"index_params": {"M": 16}}, "may only set nothing"),
    ({"index_type": "HNSW", "index_params": {"M": 10**6}}, r"\[2, 2048\]"),
    ({"index_type": "HNSW", "index_params": {"efConstruction": "64"}}, "integer"),
    ({"index_type": "HNSW", "search_params": {"nprobe": 8}}, "may only set"),
    ({"index_type": "IVF_FLAT", "search_params": {"nprobe": 0}}, "nprobe"),
    ({"collection": ""}, "non-empty"),
    ({"collection": "x" * 300}, "255"),
])
def test_bad_config(params: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        memkit.create_bank("milvus", dim=4, **params)


def test_dim_limit() -> None:
    with pytest.raises(ConfigError, match="32768"):
        memkit.create_bank("milvus", dim=40_000)


def test_collection_names_are_mapped_to_milvus_alphabet(tmp_path: Path) -> None:
    b = memkit.create_bank("milvus", dim=4, path=str(tmp_path / "m.db"), collection="notes-alice.2")
    c = memkit.create_bank("milvus", dim=4, path=str(tmp_path / "m.db"), collection="7days")
    try:
        assert b._coll == "notes_alice_2" and b.params()["collection"] == "notes-alice.2"
        assert c._coll == "_7days"
        assert sorted(b.client.list_collections()) == ["_7days", "notes_alice_2"]
    finally:
        b.close()
        c.close()


def test_missing_milvus_lite_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "milvus_lite.server_manager", None)
    with pytest.raises(MissingDependencyError, match=r"memkit\[milvus\]"):
        memkit.create_bank("milvus", dim=4)


def test_top_k_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from memkit.backends import milvus_bank

    b = memkit.create_bank("milvus", dim=4)
    try:
        b.add(np.random.default_rng(0).standard_normal((10, 4)))
        monkeypatch.setattr(milvus_bank, "MAX_TOPK", 5)  # Milvus's real limit is 16,384
        with pytest.raises(InvalidInputError, match="ask for fewer"):
            b.search(np.ones((1, 4)), 6)
        assert b.search(np.ones((1, 4)), 5).ids.shape == (1, 5)
    finally:
        b.close()


# ---------------------------------------------------------------------- exactness, ANN, reopening
def test_flat_is_exact_through_flushed_and_unflushed_rows() -> None:
    """Exact under every metric, with removals, re-adds, and rows both flushed and still in milvus-lite's MemTable."""
    rng = np.random.default_rng(7)
    base = rng.standard_normal((3000, 24)).astype(np.float32)
    q = rng.standard_normal((40, 24)).astype(np.float32)
    for metric in ("ip", "l2", "cosine"):
        b = memkit.create_bank("milvus", dim=24, metric=metric)
        try:
            ids = b.add(base[:2000])
            b.search(q[:1], 1)  # flushes the first 2000 into a segment
            b.add(base[2000:], ids=np.arange(2000, 3000))  # stays in the MemTable until the next search
            b.remove(ids[::3])
            b.add(base[[0, 3, 6]], ids=[0, 3, 6])  # re-added after removal
            keep = np.union1d(np.setdiff1d(np.arange(3000), ids[::3]), [0, 3, 6])
            scores, got = b.search(q, 50)
            ref_s, ref_i = brute_force(base[keep], keep, q, 50, metric)
            np.testing.assert_array_equal(got, ref_i)
            np.testing.assert_allclose(scores, ref_s, rtol=1e-4, atol=1e-4)
        finally:
            b.close()


def test_hnsw_index_is_exposed_and_approximate() -> None:
    rng = np.random.default_rng(3)
    base = rng.standard_normal((2000, 16)).astype(np.float32)
    q = rng.standard_normal((50, 16)).astype(np.float32)
    b = memkit.create_bank("milvus", dim=16, index_type="hnsw", index_params={"M": 16, "efConstruction": 64},
                           search_params={"ef": 64})
    try:
        assert b.params()["index_type"] == "HNSW" and b.params()["search_params"] == {"ef": 64}
        b.add(base)
        _, got = b.search(q, 10)
        _, ref = brute_force(base, np.arange(2000), q, 10, "ip")
        assert np.mean([len(set(g) & set(r)) / 10 for g, r in zip(got, ref)]) >= 0.9
    finally:
        b.close()


def test_reopen_mismatch_and_one_bank_per_collection(tmp_path: Path) -> None:
    d = tmp_path / "m.db"
    v = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    b = memkit.create_bank(f"milvus://{d}", dim=8, metric="cosine")
    assert b.local and b._db == str(d)
    b.add(v)
    with pytest.raises(ConfigError, match="already open in this process"):
        memkit.create_bank("milvus", dim=8, metric="cosine", path=str(d))
    b.close()
    b.close()  # idempotent
    with pytest.raises(memkit.MemkitError, match="closed"):
        len(b)
    with pytest.raises(ConfigError, match="metric='cosine'"):
        memkit.create_bank("milvus", dim=8, metric="ip", path=str(d))
    with pytest.raises(ConfigError, match="dim=8"):
        memkit.create_bank("milvus", dim=4, metric="cosine", path=str(d))
    with pytest.raises(ConfigError, match="index_type='FLAT'"):
        memkit.create_bank("milvus", dim=8, metric="cosine", path=str(d), index_type="HNSW")
    b2 = memkit.create_bank("milvus", dim=8, metric="cosine", path=str(d))
    try:
        assert len(b2) == 20 and b2.ids().tolist() == list(range(20))
        assert b2.add(v[:1]).tolist() == [20], "auto ids continue after reopen"
        _, got = b2.search(v[1:4], 1)
        assert got[:, 0].tolist() == [1, 2, 3]
    finally:
        b2.close()
    # a directory instead of a *.db file gets a milvus.db inside
    b3 = memkit.create_bank("milvus", dim=8, path=str(tmp_path / "dir"))
    b3.close()
    assert (tmp_path / "dir" / "milvus.db").is_dir()


def test_other_process_holding_the_database_is_a_config_error(tmp_path: Path) -> None:
    d = tmp_path / "held.db"
    code = ("import sys, time, memkit; b = memkit.create_bank('milvus', dim=4, path=sys.argv[1]); "
            "print('ready', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(d)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        with pytest.raises(ConfigError, match="locks a database per process"):
            memkit.create_bank("milvus", dim=4, path=str(d))
    finally:
        child.kill()
        child.wait()
    memkit.create_bank("milvus", dim=4, path=str(d)).close()  # free again once that process is gone


def test_server_bookkeeping_paths_against_milvus_lite(tmp_path: Path) -> None:
    """With ``local`` off, count/membership/ids are asked from the server (the server-mode code) and agree."""
    rng = np.random.default_rng(5)
    v = rng.standard_normal((300, 8)).astype(np.float32)
    b = memkit.create_bank("milvus", dim=8, metric="l2")
    try:
        b.local = False
        assert len(b) == 0 and b.add(v, ids=np.arange(100, 400)).tolist() == list(range(100, 400))
        assert len(b) == 300 and 150 in b and 99 not in b
        assert b.remove([100, 101, 5]) == 2 and len(b) == 298
        assert b.ids().tolist() == list(range(102, 400))
        _, got = b.search(v[10:12], 1)
        assert got[:, 0].tolist() == [110, 111]
        b.save(tmp_path / "s")
        b.local = True
    finally:
        b.close()
    b2 = memkit.load_bank(tmp_path / "s")
    try:
        assert b2.ids().tolist() == list(range(102, 400))
        np.testing.assert_array_equal(b2.get([110]), v[10:11])
    finally:
        b2.close()


def test_snapshot_is_plain_npy_and_restores(tmp_path: Path) -> None:
    from memkit.backends.milvus_bank import MilvusBank

    rng = np.random.default_rng(1)
    v = rng.standard_normal((300, 16)).astype(np.float32)
    b = memkit.create_bank("milvus", dim=16, metric="l2", path=str(tmp_path / "live.db"))
    b.add(v, ids=np.arange(5, 305))
    b.save(tmp_path / "snap")
    b.close()
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == ["ids.npy", "manifest.json", "milvus.json",
                                                                     "vectors.npy"]
    ids = np.load(tmp_path / "snap" / "ids.npy", allow_pickle=False)
    vecs = np.load(tmp_path / "snap" / "vectors.npy", allow_pickle=False)
    np.testing.assert_array_equal(ids, np.arange(5, 305))
    np.testing.assert_array_equal(vecs, v)
    manifest = json.loads((tmp_path / "snap" / "manifest.json").read_text())
    assert not set(manifest["params"]) & {"path", "uri", "token", "db_name"}, "a save never names a location"
    restored = MilvusBank.restore(tmp_path / "snap", path=str(tmp_path / "restored.db"))
    try:
        assert len(restored) == 300 and restored.add(v[:1]).tolist() == [305]
    finally:
        restored.close()
    with pytest.raises(ConfigError, match="not empty"):
        MilvusBank.restore(tmp_path / "snap", path=str(tmp_path / "restored.db"))


# ---------------------------------------------------------------------- threads, processes, lifetime
def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_no_child_processes_and_no_leaked_servers_or_threads(tmp_path: Path) -> None:
    """milvus-lite 3 runs in this process: no child appears; close() and garbage collection stop the servers
    memkit started and remove temporary databases, so threads do not grow with the number of banks."""
    psutil = pytest.importorskip("psutil")
    from milvus_lite.server_manager import server_manager_instance as sm

    me = psutil.Process()
    memkit.create_bank("milvus", dim=4).close()  # warm up gRPC's process-wide threads once
    children, threads, servers = len(me.children(recursive=True)), _os_threads(), len(sm._servers)
    dbs = []
    for i in range(6):
        b = memkit.create_bank("milvus", dim=4, **({"path": str(tmp_path / f"b{i}.db")} if i % 2 else {}))
        b.add(np.ones((3, 4), np.float32))
        b.search(np.ones((1, 4), np.float32), 2)
        assert len(me.children(recursive=True)) == children, "milvus-lite started a child process"
        dbs.append(b._db)
        if i < 3:
            b.close()
        else:
            del b  # garbage collection closes it too
            gc.collect()
    for _ in range(50):  # gRPC workers wind down asynchronously after server.stop()
        if _os_threads() <= threads:
            break
        time.sleep(0.1)
    assert len(sm._servers) == servers and not any(db in sm._servers for db in dbs)
    assert _os_threads() <= threads, f"threads grew from {threads} to {_os_threads()}"
    assert not any(Path(db).parent.exists() for db, i in zip(dbs, range(6)) if i % 2 == 0), "temp dirs left"
    assert len(me.children(recursive=True)) == children


def test_a_server_memkit_did_not_start_is_left_running(tmp_path: Path) -> None:
    from milvus_lite.server_manager import server_manager_instance as sm
    from pymilvus import MilvusClient

    db = str(tmp_path / "shared.db")
    user = MilvusClient(db)  # the user's own client started this milvus-lite server
    try:
        b = memkit.create_bank("milvus", dim=4, path=db)
        b.close()
        assert os.path.abspath(db) in sm._servers
        assert user.list_collections() == ["memkit"]
    finally:
        user.close()
        sm.release_server(db)


def test_concurrent_searches_right_after_writes() -> None:
    """Many readers find the bank dirty at once: one flush, no errors, every result complete."""
    b = memkit.create_bank("milvus", dim=8)
    rng = np.random.default_rng(2)
    errors: list[BaseException] = []
    try:
        for r in range(5):
            b.add(rng.standard_normal((50, 8)))
            barrier = threading.Barrier(4)

            def reader(barrier: threading.Barrier = barrier) -> None:
                try:
                    barrier.wait()
                    _, ids = b.search(np.ones((2, 8), np.float32), 10)
                    assert (ids >= 0).all()
                except BaseException as exc:  # pragma: no cover - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=reader) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not b._dirty and len(b) == 50 * (r + 1)
        assert not errors, errors[0]
    finally:
        b.close()


# ---------------------------------------------------------------------- hostile save directories
def test_hostile_save_directories(tmp_path: Path) -> None:
    """memkit.testing.hostile's cases (truncated, crafted, pickled, linked, hostile manifests and parameters),
    in a child process: each load raises a MemkitError or loads a valid save; nothing crashes or runs code."""
    marker = tmp_path / "PWNED"
    proc = subprocess.run([sys.executable, "-m", "memkit.testing.hostile", "bank", "milvus", str(tmp_path / "w"),
                           str(marker)], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    results = [r for r in rows if "case" in r]
    assert proc.returncode == 0 and any(r.get("done") for r in rows), proc.stderr[-3000:]
    assert not marker.exists(), "a pickle payload was executed while loading"
    bad = [f"{r['case']}: {r['outcome']}" for r in results if r["outcome"].startswith("BAD")]
    accepted = [r["case"] for r in results if r["must_fail"] and r["outcome"] == "loaded"]
    assert not bad, bad[:10]
    assert not accepted, accepted[:10]
    assert len(results) > 80


# ---------------------------------------------------------------------- inside a wrapped model
def test_wrapped_tiny_model_retrieves_through_milvus(tmp_path: Path) -> None:
    """backend="milvus" inside memkit.wrap: the same chunks and logits as faiss-flat (both exact), and the
    memory saves and loads."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("faiss")
    from memkit.testing.tiny_models import one_thread, tiny_model

    cfg = dict(window=32, chunk_size=8, block_size=16, top_k=3, sink_tokens=2, progress=False)
    ids = torch.randint(3, 256, (1, 160), generator=torch.Generator().manual_seed(0))
    out, traces = {}, {}
    with one_thread(), torch.no_grad():
        for backend in ("faiss-flat", "milvus"):
            wrapped = memkit.wrap(tiny_model("llama"), backend=backend, **cfg)
            out[backend] = wrapped(ids).logits
            traces[backend] = [(t["id"], t["span"]) for t in wrapped.memory.trace()]
            assert wrapped.memory.num_chunks() > 5
            if backend == "milvus":
                wrapped.memory.save(tmp_path / "mem")
                n = wrapped.memory.num_chunks()
                wrapped.memory.reset()
                wrapped.memory.load(tmp_path / "mem")
                assert wrapped.memory.num_chunks() == n
                again = wrapped(ids[:, -16:]).logits
                assert torch.isfinite(again).all()
            memkit.unwrap(wrapped)
    assert traces["milvus"] == traces["faiss-flat"] and traces["milvus"]
    torch.testing.assert_close(out["milvus"], out["faiss-flat"])


def test_banks_left_open_at_exit_do_not_hang_the_interpreter(tmp_path: Path) -> None:
    """At exit milvus-lite's server can no longer answer (concurrent.futures is shut down): open banks must be
    released without client calls, which would hang in pymilvus's retries for minutes, and temp dirs removed."""
    code = ("import sys, numpy as np, memkit\n"
            "a = memkit.create_bank('milvus', dim=4); b = memkit.create_bank('milvus', dim=4, path=sys.argv[1])\n"
            "for x in (a, b): x.add(np.ones((3, 4), np.float32)); x.search(np.ones((1, 4), np.float32), 2)\n"
            "print(a._db, flush=True)\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "kept.db")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and time.perf_counter() - t0 < 60, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr, proc.stderr[-2000:]
    assert not Path(proc.stdout.strip()).parent.exists(), "the temporary database was left behind"
    reopened = memkit.create_bank("milvus", dim=4, path=str(tmp_path / "kept.db"))
    try:
        assert len(reopened) == 3, "milvus-lite flushed the kept database at exit"
    finally:
        reopened.close()
