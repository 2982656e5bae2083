"""memkit on a real Milvus server: the ``milvus`` package's standalone server (the binary a cluster's nodes run,
etcd embedded), started once per session by the ``milvus_server`` fixture (tests/conftest.py) on free loopback
ports with authorization on. Not milvus-lite: segments, server-side flush and index builds, other processes.

* the whole BankConformance suite through ``uri=`` (and the ``milvus://`` URI with credentials);
* an HNSW index, built by the server on a sealed segment, with its recall@10 on real MiniLM vectors;
* faults: the server killed mid-ingest and restarted on the same base directory, a frozen server (timeouts), a
  second process on the same collection, bad credentials and database names, a collection dropped underneath,
  dim/metric mismatches;
* a wrapped tiny model stopped mid-ingest, and (slow) SmolLM2 reading a 16k-token passkey prompt through the
  server with the same trace as faiss-flat, and its memory saved and loaded.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import memkit
from memkit.errors import BackendUnavailableError, ConfigError, MemkitError, ReadOnlyError
from memkit.testing import BankConformance
from memkit.testing.conformance import brute_force

pytest.importorskip("pymilvus")
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def fresh(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def server_up(server: Any, *, wait: float = 120.0) -> None:
    """Start the session server again if a fault test left it down, and wait until it serves strong reads."""
    from pymilvus import MilvusClient

    if not server.running:
        server.start()
    t0 = time.monotonic()
    while True:
        try:
            client = MilvusClient(uri=server.uri, token=server.token, timeout=5)
            client.list_collections(timeout=5)
            client.close()
            return
        except Exception:
            if time.monotonic() - t0 > wait:
                raise
            time.sleep(0.5)


def wait_for(fn: Any, *, limit: float = 90.0) -> Any:
    """``fn()`` once the server answers it (after a restart it serves strong reads only after a few seconds)."""
    t0 = time.monotonic()
    while True:
        try:
            return fn()
        except BackendUnavailableError:
            if time.monotonic() - t0 > limit:
                raise
            time.sleep(1.0)


def child(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture
def server(milvus_server: Any) -> Any:
    server_up(milvus_server)
    yield milvus_server
    # Banks a test left to the garbage collector release their owner records here, at a known time. Left to a
    # random collection (seen: at the end of the session, once the server was gone), their finalizers' failing
    # client calls ran inside the AST construction of a module pytest rewrote and imported late, and CPython
    # 3.11.7 raised its spurious "AST constructor recursion depth mismatch" SystemError (CPython gh-106905).
    gc.collect()


@pytest.fixture
def params(server: Any) -> Any:
    """Bank parameters for a new collection on the session server; every collection made is dropped after."""
    from pymilvus import MilvusClient

    admin = MilvusClient(uri=server.uri, token=server.token, timeout=30)
    before = set(admin.list_collections())

    def make(**extra: Any) -> dict[str, Any]:
        return {"uri": server.uri, "token": server.token, "collection": fresh(), **extra}

    yield make
    try:
        server_up(server)
        for name in set(admin.list_collections()) - before:
            admin.drop_collection(name)
    finally:
        admin.close()


# ---------------------------------------------------------------------- the conformance suite on the server
class TestMilvusServerConformance(BankConformance):
    backend = "milvus"
    library = "pymilvus"
    extra = "milvus"

    @pytest.fixture(autouse=True)
    def _server(self, params: Any) -> None:
        self._params = params

    def bank_params(self, path: Path) -> dict[str, Any]:
        return self._params()


def test_uri_with_credentials_reaches_the_server(server: Any, params: Any) -> None:
    name = params()["collection"]
    b = memkit.create_bank(f"milvus://{server.token}@127.0.0.1:{server.port}/{name}", dim=8)
    try:
        assert not b.local and b.collection == name
        assert b.add(np.eye(8, dtype=np.float32)).tolist() == list(range(8))
        assert b.search(np.eye(8, dtype=np.float32)[:2], 1).ids[:, 0].tolist() == [0, 1]
        assert "Milvus" not in repr(b.params()) and server.token not in str(b._where)
    finally:
        b.close()


# ---------------------------------------------------------------------- a server index
def test_hnsw_index_built_by_the_server_and_its_recall(server: Any, params: Any, real_vectors: np.ndarray) -> None:
    """HNSW (M=16, efConstruction=128) on 20,000 real MiniLM vectors, searched once the server sealed the segment
    and built the index on all of it. Recall@10 against brute force at several ``ef`` (each a read_only bank with
    its own search_params on the same index); measured 0.978 at ef=64, 0.995 at ef=128, 0.9995 at ef=256. (Searched
    before the indexed segment reached the query node, the same data gave 0.931 at every ef: Milvus's interim
    IVF index on growing data, nprobe 16 of 128.)"""
    base, queries = real_vectors[:20_000], real_vectors[20_000:20_200]
    p = params()
    b = memkit.create_bank("milvus", dim=384, metric="ip", index_type="HNSW", index_params={"M": 16, "efConstruction": 128},
                           search_params={"ef": 128}, **p)
    _, ref = brute_force(base, np.arange(len(base)), queries, 10, "ip")
    recall = {}
    try:
        b.add(base)
        b.flush()  # seals the growing segment: the server builds HNSW on it
        t0 = time.monotonic()
        while (progress := b.index_progress())[0] < len(base):
            # ~30-60 s alone; 240 s was exceeded with five jobs on the 2 cores (0 of 20000 indexed): a guard, not a timing
            assert time.monotonic() - t0 < 900, f"index still building: {progress}"
            time.sleep(1)
        for ef in (64, 128, 256):
            r = memkit.create_bank("milvus", dim=384, metric="ip", index_type="HNSW", search_params={"ef": ef},
                                   read_only=True, **p)
            try:
                _, got = r.search(queries, 10)
            finally:
                r.close()
            recall[ef] = float(np.mean([len(set(g) & set(x)) / 10 for g, x in zip(got, ref)]))
        print(f"server HNSW recall@10 on {len(base):,} MiniLM vectors (200 queries): {recall}")
        assert recall[128] >= 0.95 and recall[256] >= recall[64], recall
        assert b.params()["index_type"] == "HNSW" and b.index_progress() == (len(base), len(base))
    finally:
        b.close()


# ---------------------------------------------------------------------- faults
def test_server_killed_mid_ingest_then_restarted(server: Any, params: Any) -> None:
    """SIGKILL during a stream of adds: the add in flight fails within the timeout with a MemkitError that names
    the server and what to do; after a restart on the same base directory the bank holds every acknowledged
    vector (every add that returned) and nothing of the failed add, retrieval resumes, and a reopened bank agrees."""
    rng = np.random.default_rng(0)
    p = params(timeout=5.0)
    b = memkit.create_bank("milvus", dim=32, metric="l2", **p)
    acked: list[np.ndarray] = []
    vectors: dict[int, np.ndarray] = {}
    failure: list[tuple[BaseException, float]] = []
    stop = threading.Event()

    def ingest() -> None:
        while not stop.is_set():
            v = rng.standard_normal((200, 32)).astype(np.float32)
            t0 = time.monotonic()
            try:
                ids = b.add(v)
            except MemkitError as exc:
                failure.append((exc, time.monotonic() - t0))
                return
            acked.append(ids)
            vectors.update(zip(ids.tolist(), v))

    t = threading.Thread(target=ingest)
    t.start()
    try:
        while len(acked) < 5:
            time.sleep(0.02)
        server.stop(kill=True)
        t.join(timeout=60)
        assert not t.is_alive(), "an add hung after the server died"
    finally:
        stop.set()
        t.join()
    assert failure, "the ingest never noticed the server was gone"
    exc, took = failure[0]
    assert isinstance(exc, BackendUnavailableError) and took < 30, (exc, took)
    msg = str(exc)
    assert f"127.0.0.1:{server.port}" in msg and "running and reachable" in msg and "None of this add" in msg
    with pytest.raises(BackendUnavailableError, match="reachable"):
        b.search(np.ones((1, 32), np.float32), 3)
    server_up(server)
    want = np.sort(np.concatenate(acked))
    assert np.array_equal(wait_for(b.ids), want), "acknowledged vectors lost, or unacknowledged ones kept"
    probe = want[::97]
    _, got = b.search(np.stack([vectors[int(i)] for i in probe]), 1)
    assert got[:, 0].tolist() == probe.tolist(), "retrieval did not resume"
    more = b.add(rng.standard_normal((3, 32)).astype(np.float32))
    assert more.tolist() == list(range(int(want.max()) + 1, int(want.max()) + 4)), "ids of the failed add reused"
    b.close()
    again = memkit.create_bank("milvus", dim=32, metric="l2", **p)
    try:
        assert len(again) == len(want) + 3
        np.testing.assert_allclose(again.get(probe), np.stack([vectors[int(i)] for i in probe]), rtol=1e-6)
    finally:
        again.close()


def test_frozen_server_times_out_and_a_wrapped_memory_claims_only_what_was_stored(server: Any, params: Any) -> None:
    """A server that stops answering (SIGSTOP) makes calls fail after the timeout, not hang. A wrapped model
    ingesting then fails with that error, and its memory keeps only chunks the bank acknowledged; once the server
    answers again every chunk the memory holds is in the bank and nothing else is."""
    torch = pytest.importorskip("torch")
    from memkit.testing.tiny_models import one_thread, tiny_model

    p = params(timeout=3.0)
    wrapped = memkit.wrap(tiny_model("llama"), bank={"backend": "milvus", "params": p}, window=32, chunk_size=8,
                          block_size=16, top_k=3, sink_tokens=2, progress=False)
    ids = torch.randint(3, 256, (1, 96), generator=torch.Generator().manual_seed(0))
    mem = wrapped.memory
    frozen = False
    try:
        with one_thread(), torch.no_grad():
            wrapped(ids)
            bank = mem.manager._ns["default"].bank
            assert not bank.local and bank.collection.startswith(p["collection"] + "-default-")  # one per namespace
            before = mem.num_chunks()
            assert before > 3 and len(bank) == before
            os.kill(server.proc.pid, signal.SIGSTOP)
            frozen = True
            t0 = time.monotonic()
            with pytest.raises(MemkitError, match=f"127.0.0.1:{server.port}") as info:
                wrapped(torch.randint(3, 256, (1, 96), generator=torch.Generator().manual_seed(1)))
            took = time.monotonic() - t0
            assert took < 30, f"a frozen server held the model for {took:.0f}s (timeout 3s)"
            assert "did not answer within 3s" in str(info.value)
            os.kill(server.proc.pid, signal.SIGCONT)
            frozen = False
            claimed = {int(t) for ns in mem.manager._ns.values() for t in ns.spans}
            assert len(claimed) == mem.num_chunks()
            stored = set(wait_for(bank.ids).tolist())
            assert stored == claimed, f"bank {sorted(stored - claimed)} vs memory {sorted(claimed - stored)}"
            out = wrapped(ids[:, :40])  # retrieval works again
            assert torch.isfinite(out.logits).all()
    finally:
        if frozen:
            os.kill(server.proc.pid, signal.SIGCONT)
        memkit.unwrap(wrapped)


OPEN_AND_HOLD = """
import sys, time, numpy as np, memkit
uri, token, coll, mode = sys.argv[1:5]
try:
    b = memkit.create_bank("milvus", dim=8, uri=uri, token=token, collection=coll, read_only=mode == "read")
except memkit.MemkitError as exc:
    print("REFUSED", type(exc).__name__, str(exc).replace(chr(10), " "), flush=True)
    sys.exit(0)
if mode == "write":
    b.add(np.eye(8, dtype=np.float32), ids=np.arange(100, 108))
    print("OPEN", flush=True)
    time.sleep(120)
else:
    print("OPEN", b.search(np.eye(8, dtype=np.float32)[:3], 1).ids[:, 0].tolist(), flush=True)
    try:
        b.add(np.eye(8, dtype=np.float32))
    except memkit.ReadOnlyError:
        print("READONLY", flush=True)
"""


def test_a_second_writer_process_is_refused_and_readers_are_not(server: Any, params: Any) -> None:
    """One writing bank per collection (an owner record checked on open, taken atomically): a second process is
    refused with the owner named, also when two start at once; a read_only bank in another process searches
    beside the writer; a writer that died (SIGKILL) is replaced on the next open, and nothing it stored is lost."""
    p = params()
    coll = p["collection"]
    writer = memkit.create_bank("milvus", dim=8, **p)
    try:
        writer.add(np.eye(8, dtype=np.float32) * 2)
        second = child(OPEN_AND_HOLD, server.uri, server.token, coll, "write")
        reader = child(OPEN_AND_HOLD, server.uri, server.token, coll, "read")
        out2, err2 = second.communicate(timeout=120)
        out3, err3 = reader.communicate(timeout=120)
        assert out2.startswith("REFUSED ConfigError") and f"process {os.getpid()}" in out2, out2 + err2[-2000:]
        assert "read_only=True" in out2 and "take_over=True" in out2
        assert out3.splitlines() == ["OPEN [0, 1, 2]", "READONLY"], out3 + err3[-2000:]
        with pytest.raises(ConfigError, match="in this process"):
            memkit.create_bank("milvus", dim=8, **p)
        reader = memkit.create_bank("milvus", dim=8, read_only=True, **p)
        with pytest.raises(ReadOnlyError):
            reader.add(np.ones((1, 8), np.float32))
        reader.close()
    finally:
        writer.close()
    # two writers starting at once on a new collection: exactly one is let in
    race = params()["collection"]
    kids = [child(OPEN_AND_HOLD, server.uri, server.token, race, "write") for _ in range(2)]
    try:
        first = [k.stdout.readline().strip() for k in kids]  # type: ignore[union-attr]
        assert sorted(line.split()[0] for line in first) == ["OPEN", "REFUSED"], first
        winner = kids[[line.startswith("OPEN") for line in first].index(True)]
        winner.kill()  # dies holding the record: stale from now on
        winner.wait()
        taken = memkit.create_bank("milvus", dim=8, uri=server.uri, token=server.token, collection=race)
        try:
            assert taken.ids().tolist() == list(range(100, 108)), "what the dead writer acknowledged was lost"
            assert taken.add(np.ones((1, 8), np.float32)).tolist() == [108], "ids would collide with the dead writer's"
        finally:
            taken.close()
    finally:
        for k in kids:
            k.kill()
            k.communicate()


def test_take_over_replaces_a_live_owner_record(server: Any, params: Any) -> None:
    """take_over=True (for an owner known to be dead on another host) replaces the record; the old owner's close
    leaves the new record in place, so a third writer is still refused."""
    p = params()
    first = memkit.create_bank("milvus", dim=4, **p)
    first.add(np.eye(4, dtype=np.float32))
    second = memkit.create_bank("milvus", dim=4, take_over=True, **p)
    try:
        first.close()
        with pytest.raises(ConfigError, match="open for writing by another memkit bank"):
            memkit.create_bank("milvus", dim=4, **p)
        assert second.ids().tolist() == [0, 1, 2, 3] and second.add(np.ones((1, 4), np.float32)).tolist() == [4]
    finally:
        second.close()
    memkit.create_bank("milvus", dim=4, **p).close()  # free once its owner closed


def test_bad_credentials_and_database_name_are_config_errors_without_the_secret(
        server: Any, params: Any, capfd: pytest.CaptureFixture[str]) -> None:
    secret = "S3cret-" + uuid.uuid4().hex[:8]
    for kwargs in ({"uri": server.uri, "token": f"root:{secret}"},
                   {"uri": f"http://root:{secret}@127.0.0.1:{server.port}"}):
        with pytest.raises(ConfigError, match="refused the credentials") as info:
            memkit.create_bank("milvus", dim=4, collection=fresh(), timeout=10, **kwargs)
        text = f"{info.value} {info.value.__cause__!r} {info.value.__context__!r}"
        assert secret not in text
    with pytest.raises(ConfigError, match="refused the credentials"):
        memkit.create_bank(f"milvus://root:{secret}@127.0.0.1:{server.port}/{fresh()}", dim=4)
    with pytest.raises(ConfigError, match="refused the credentials"):
        memkit.create_bank("milvus", dim=4, uri=server.uri, collection=fresh(), timeout=10)  # no token at all
    with pytest.raises(ConfigError, match="database 'nowhere' does not exist"):
        memkit.create_bank("milvus", dim=4, db_name="nowhere", **params())
    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err, "the secret was printed"


def test_dropped_collection_and_mismatches_keep_what_is_stored(server: Any, params: Any) -> None:
    from pymilvus import MilvusClient

    p = params()
    v = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    b = memkit.create_bank("milvus", dim=8, metric="cosine", **p)
    b.add(v)
    b.close()
    for dim, metric, match in ((4, "cosine", "dim=8"), (8, "ip", "metric='cosine'"), (8, "l2", "metric_type=IP")):
        with pytest.raises(ConfigError, match=match):
            memkit.create_bank("milvus", dim=dim, metric=metric, **p)
    with pytest.raises(ConfigError, match="index_type='FLAT'"):
        memkit.create_bank("milvus", dim=8, metric="cosine", index_type="HNSW", **p)
    b = memkit.create_bank("milvus", dim=8, metric="cosine", **p)
    try:
        assert len(b) == 50, "a refused open changed the collection"
        admin = MilvusClient(uri=server.uri, token=server.token)
        admin.drop_collection(p["collection"])  # another client drops it underneath the bank
        admin.close()
        for call in (lambda: b.search(v[:1], 3), lambda: b.add(v[:1]), lambda: len(b)):
            with pytest.raises(ConfigError, match=r"collection is gone.*Open the bank again"):
                call()
    finally:
        b.close()
    reopened = memkit.create_bank("milvus", dim=8, metric="cosine", **p)
    assert len(reopened) == 0
    reopened.close()


def test_unreachable_server_fails_fast_with_the_fix() -> None:
    from memkit.testing.milvus_server import free_ports

    port = free_ports(1)[0]  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailableError, match=f"127.0.0.1:{port}.*running and reachable"):
        memkit.create_bank(f"milvus://127.0.0.1:{port}/x", dim=4)
    assert time.monotonic() - t0 < 30


# ---------------------------------------------------------------------- a real model through the server
@pytest.mark.slow
def test_smollm2_reads_16k_passkey_through_the_server(server: Any, params: Any, tmp_path: Path) -> None:
    """SmolLM2-135M wrapped with ``backend: milvus://127.0.0.1:PORT/name`` ingests a 16k-token passkey prompt
    (twice its 8k positions) and answers it, retrieving the same chunks as faiss-flat; its memory saves and loads."""
    import torch

    from memkit.evaluation.haystack import build_haystack
    from memkit.evaluation.passkey import answer
    from memkit.models import load_smollm2

    previous = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        model, tok = load_smollm2()
        hay = build_haystack(tok, 16 * 1024, 0.3, seed=2)
        name = params()["collection"]
        recs, traces = {}, {}
        for backend in ("faiss-flat", f"milvus://{server.token}@127.0.0.1:{server.port}/{name}"):
            wrapped = memkit.wrap(model, tokenizer=tok, backend=backend, progress=False)
            try:
                t0 = time.perf_counter()
                recs[backend[:6]] = rec = answer(wrapped, tok, hay)
                print(f"{backend[:6]}: {len(hay)} tokens in {time.perf_counter() - t0:.1f}s, answer {rec['answer']!r}")
                traces[backend[:6]] = [(t["id"], tuple(t["span"])) for t in wrapped.memory.trace()]
                if backend.startswith("milvus"):
                    bank = wrapped.memory.manager._ns["default"].bank
                    assert not bank.local and bank.collection == name  # the URI names it
                    n = wrapped.memory.num_chunks()  # repeated filler: identical chunks are stored once
                    assert len(bank) == n > 0
                    wrapped.memory.save(tmp_path / "mem")
                    wrapped.memory.reset()
                    wrapped.memory.load(tmp_path / "mem")
                    assert wrapped.memory.num_chunks() == n
            finally:
                memkit.unwrap(wrapped)
    finally:
        torch.set_grad_enabled(previous)
    assert recs["milvus"]["correct"] and recs["milvus"]["needle_retrieved"], recs["milvus"]
    assert traces["milvus"] == traces["faiss-"] and traces["milvus"]
