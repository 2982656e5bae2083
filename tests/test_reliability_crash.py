"""Crash safety: SIGKILL at random moments while (a) ingesting into the ``disk`` backend and saving
snapshots of it, and (b) repeatedly saving a MemoryManager directory. Every reopen must succeed, every
acknowledged id must be there with its vector (and its K/V pages), nothing half-written may be visible.

``tests/test_bank_disk.py`` already kills a child during add/remove/replace of a live disk bank; here the
child also writes large batches (so kills land inside ``pwrite``/``fdatasync``) and atomic ``bank.save``
snapshots, and the MemoryManager test kills ``mm.save`` (bank + K/V store + metadata + manifest swap).
Children log what they are about to do and what returned to an ``O_APPEND`` file; the parent replays
that log after each kill. Counts are printed as ``RELIABILITY {...}`` lines (run with ``-s``).
``MEMKIT_RELIABILITY_SCALE=5`` runs five times as many kills.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import memkit
from memkit.testing.reliability import ROOT, det_vectors, report, scale

pytest.importorskip("sqlite_utils")

DIM = 16

DISK_CHILD = r"""
import os, sys
import numpy as np
import memkit
from memkit.testing.reliability import det_vectors

live, snap, seed, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
say = lambda *a: os.write(fd, (" ".join(map(str, a)) + "\n").encode())
bank = memkit.create_bank("disk://" + live, dim=@DIM@, metric="l2", block_rows=512)
rng = np.random.default_rng(seed)
start = int(bank.ids().max()) + 1 if len(bank) else 0
say("O")
while True:
    n = int(rng.choice([1, 10, 300, 2000]))
    say("I", start, start + n)
    bank.add(det_vectors(np.arange(start, start + n), @DIM@), ids=np.arange(start, start + n))
    say("A", start, start + n)
    start += n
    r = rng.random()
    if r < 0.25:
        victims = rng.choice(start, size=min(start, 20), replace=False).tolist()
        say("Q", *victims)
        bank.remove(victims)
        say("R", *victims)
    elif r < 0.55:
        say("S")
        bank.save(snap)
        say("D")
""".replace("@DIM@", str(DIM))


def _read_log(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]  # a line cut by the kill
    return [ln.split() for ln in lines if ln.strip()]


def _check_bank_contents(bank: memkit.BaseBank, ids: set[int], must_check: set[int] = frozenset()) -> None:
    """The bank holds exactly ``ids``; the vectors of ``must_check`` and of a sample of 3,000 are exact."""
    got = bank.ids()
    assert set(got.tolist()) == ids, (
        f"ids differ: missing {sorted(ids - set(got.tolist()))[:5]}, extra {sorted(set(got.tolist()) - ids)[:5]}")
    if len(got):
        rng = np.random.default_rng(len(got))
        probe = np.union1d(rng.choice(got, size=min(3000, len(got)), replace=False),
                           np.array(sorted(must_check & ids), np.int64))
        np.testing.assert_array_equal(bank.get(probe), det_vectors(probe, DIM))


def test_kill9_disk_ingest_and_snapshots(tmp_path: Path) -> None:
    live, snap, log = tmp_path / "live", tmp_path / "snap", tmp_path / "log"
    rng = np.random.default_rng(7)
    state: set[int] = set()  # what the live bank holds after the last verification
    snap_state: set[int] | None = None  # what the last acknowledged snapshot holds
    kills = lost = acked_ops = snapshot_loads = 0
    rounds = scale(20)
    t0 = time.monotonic()
    for rnd in range(rounds):
        log.unlink(missing_ok=True)
        child = subprocess.Popen([sys.executable, "-c", DISK_CHILD, str(live), str(snap), str(rnd), str(log)],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        if rnd % 5 != 4:  # most kills after the child is up; every fifth while it opens and recovers
            while not (log.exists() and log.read_bytes().startswith(b"O")) and time.monotonic() < deadline:
                if child.poll() is not None:
                    pytest.fail(child.stderr.read().decode()[-3000:])  # type: ignore[union-attr]
                time.sleep(0.01)
        time.sleep(float(rng.uniform(0.0, 1.2)))
        os.kill(child.pid, signal.SIGKILL)
        err = child.communicate()[1].decode()
        assert child.returncode == -signal.SIGKILL, err[-3000:]
        kills += 1

        # replay the log: acknowledged operations are certain, the one in flight is all-or-nothing
        expect, pending, snap_pending = set(state), None, None
        for tag, *nums in _read_log(log):
            vals = [int(x) for x in nums]
            if tag == "I":
                pending = ("add", set(range(vals[0], vals[1])))
            elif tag == "Q":
                pending = ("remove", set(vals))
            elif tag == "A":
                expect |= set(range(vals[0], vals[1]))
                pending, acked_ops = None, acked_ops + 1
            elif tag == "R":
                expect -= set(vals)
                pending, acked_ops = None, acked_ops + 1
            elif tag == "S":
                snap_pending = set(expect)
            elif tag == "D":
                snap_state, snap_pending, acked_ops = snap_pending, None, acked_ops + 1
        options = [expect]
        if pending is not None:
            options.append(expect | pending[1] if pending[0] == "add" else expect - pending[1])

        bank = memkit.create_bank(f"disk://{live}", dim=DIM, metric="l2", block_rows=512)  # reopen must work
        try:
            present = set(bank.ids().tolist())
            if present not in options:
                lost += len(expect - present)
                pytest.fail(f"round {rnd}: live bank is neither the acknowledged state nor that plus the "
                            f"interrupted call (missing {sorted(expect - present)[:5]}, "
                            f"extra {sorted(present - options[-1])[:5]})")
            recent = (present ^ state) | (pending[1] if pending is not None else set())
            _check_bank_contents(bank, present, recent)  # everything written in this round is checked
            state = present
        finally:
            bank.close()

        if snap_state is not None or snap_pending is not None:
            assert snap.is_dir(), f"round {rnd}: a snapshot was saved but its directory is gone"
            loaded = memkit.load_bank(snap)  # must load: the old or the new snapshot, never a mix
            try:
                got = set(loaded.ids().tolist())
                allowed = [s for s in (snap_state, snap_pending) if s is not None]
                assert got in allowed, f"round {rnd}: the snapshot matches no save that was started"
                _check_bank_contents(loaded, got)
                snap_state = got
                snapshot_loads += 1
            finally:
                loaded.close()
        visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
        assert set(visible) <= {"live", "snap", "log"}, visible
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".snap.")]
    elapsed = time.monotonic() - t0
    report("crash_disk_ingest_and_snapshots", kills=kills, ids_lost=lost, acknowledged_calls=acked_ops,
           ids_in_bank=len(state), snapshot_loads=snapshot_loads, hidden_leftovers=len(leftovers),
           seconds=round(elapsed, 1))
    assert acked_ops > kills and snapshot_loads > kills // 3, "too few acknowledged writes to mean anything"
    assert lost == 0
    assert len(leftovers) <= 2, f"crashed saves are not cleaned up: {leftovers}"


# ---------------------------------------------------------------------- MemoryManager.save under SIGKILL
L, H, C, D, E = 2, 2, 8, 8, DIM

MM_SETUP = r"""
import os, sys, json
import numpy as np
import torch
from memkit.config import MemoryConfig
from memkit.memory import MemoryManager
from memkit.testing.reliability import det_vectors
import memkit.backends.faiss_bank, memkit.backends.disk_bank  # imported before fork

L, H, C, D, E = @DIMS@

def pages(ids):
    x = det_vectors(np.repeat(ids, L * 2 * H * C), D, version=3).reshape(len(ids), L, 2, H, C, D)
    return torch.from_numpy(x[:, :, 0].copy()), torch.from_numpy(x[:, :, 1].copy())

def config(backend):
    return MemoryConfig(chunk_size=C, top_k=4, capacity_tokens=60 * C, policy="lru",
                        bank={"backend": backend}, kvstore={"dtype": "fp32", "host_bytes": 1 << 24})

def work(path, backend, seed, log):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    say = lambda *a: os.write(fd, (" ".join(map(str, a)) + "\n").encode())
    torch.set_num_threads(1)
    if os.path.isdir(path):
        mm = MemoryManager.load(path)
    else:
        mm = MemoryManager(config(backend), num_layers=L, kv_heads=H, head_dim=D, embed_dim=E)
    say("O")
    rng = np.random.default_rng(seed)
    while True:
        for ns in ("alice", "bob"):
            n = int(rng.integers(1, 12))
            start = mm._next_id
            ids = np.arange(start, start + n)
            k, v = pages(ids)
            got = mm.add_chunks(k, v, det_vectors(ids, E), np.stack([ids * C, ids * C + C], 1), namespace=ns)
            assert got.tolist() == ids.tolist()
            mm.retrieve(det_vectors(ids[:1], E)[0], namespace=ns)
        snapshot = {ns: sorted(mm.chunk_ids(ns).tolist()) for ns in ("alice", "bob")}
        say("S", json.dumps(snapshot, separators=(",", ":")))
        mm.save(path)
        say("D")

print("ready", flush=True)
for line in sys.stdin:
    path, backend, seed, log = line.split()
    pid = os.fork()
    if pid == 0:
        try:
            work(path, backend, int(seed), log)
        finally:
            os._exit(3)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(status, flush=True)
""".replace("@DIMS@", repr((L, H, C, D, E)))


def _mm_verify(path: Path, allowed: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    import torch

    from memkit.memory import MemoryManager

    mm = MemoryManager.load(path)  # must succeed
    try:
        got = {ns: sorted(mm.chunk_ids(ns).tolist()) for ns in mm.namespaces()}
        assert got in allowed, f"loaded memory {got} matches no save that was started"
        every = [i for ids in got.values() for i in ids]
        assert len(every) == len(set(every)) == len(mm.store), "a chunk id is in two namespaces or orphaned"
        for ns, ids in got.items():
            if not ids:
                continue
            arr = np.asarray(ids)
            x = det_vectors(np.repeat(arr, L * 2 * H * C), D, version=3).reshape(len(arr), L, 2, H, C, D)
            stored = mm.store.get(arr)  # (n, L, 2, H, C, D)
            torch.testing.assert_close(stored, torch.from_numpy(x), rtol=0, atol=0)
            bank = mm._ns[ns].bank
            np.testing.assert_allclose(bank.get(arr), det_vectors(arr, E), rtol=0, atol=0)
            r = mm.retrieve(det_vectors(arr[-1:], E)[0], k=3, namespace=ns)
            assert int(arr[-1]) in r.ids.tolist() and set(r.ids.tolist()) <= set(ids)
        return got
    finally:
        mm.reset()  # closes the banks (a loaded disk bank is a private temporary copy)


@pytest.mark.parametrize("backend", ["faiss-flat", "disk"])
def test_kill9_memory_manager_save(tmp_path: Path, backend: str) -> None:
    pytest.importorskip("faiss")
    path, log = tmp_path / "mem", tmp_path / "log"
    zygote = subprocess.Popen([sys.executable, "-c", MM_SETUP], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    rng = np.random.default_rng(11)
    kills = lost = saves_acked = loads = 0
    acked: dict[str, list[int]] | None = None
    t0 = time.monotonic()
    try:
        assert zygote.stdout.readline().strip() == "ready", zygote.stderr.read()  # type: ignore[union-attr]
        for rnd in range(scale(20)):
            log.unlink(missing_ok=True)
            zygote.stdin.write(f"{path} {backend} {rnd} {log}\n")  # type: ignore[union-attr]
            zygote.stdin.flush()  # type: ignore[union-attr]
            pid = int(zygote.stdout.readline())  # type: ignore[union-attr]
            if rnd % 5 != 4:
                deadline = time.monotonic() + 20
                while not (log.exists() and log.read_bytes().startswith(b"O")) and time.monotonic() < deadline:
                    time.sleep(0.005)
            time.sleep(float(rng.uniform(0.0, 1.0)))
            os.kill(pid, signal.SIGKILL)
            status = int(zygote.stdout.readline())  # type: ignore[union-attr]
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
                f"child ended by itself (status {status}): {log.read_text()[-500:] if log.exists() else ''}")
            kills += 1
            import json

            pending = None
            for tag, *rest in _read_log(log):
                if tag == "S":
                    pending = json.loads(rest[0])
                elif tag == "D":
                    acked, pending, saves_acked = pending, None, saves_acked + 1
            allowed = [s for s in (acked, pending) if s is not None]
            if acked is None and not path.exists():
                continue  # killed during the very first save: nothing was acknowledged, nothing is visible
            try:
                acked = _mm_verify(path, allowed)
                loads += 1
            except AssertionError:
                lost += 1
                raise
            visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
            assert set(visible) <= {"mem", "log"}, visible
    finally:
        zygote.stdin.close()  # type: ignore[union-attr]
        zygote.wait(timeout=30)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".mem.")]
    report(f"crash_memory_manager_save[{backend}]", kills=kills, saves_lost=lost, saves_acknowledged=saves_acked,
           reopens_checked=loads, chunks_in_last_save=sum(len(v) for v in (acked or {}).values()),
           hidden_leftovers=len(leftovers), seconds=round(time.monotonic() - t0, 1))
    assert saves_acked >= kills // 3 and loads >= kills // 2, "too few saves completed to mean anything"
    assert lost == 0
    assert len(leftovers) <= 2, f"crashed saves are not cleaned up: {leftovers}"


def test_crash_between_renames_is_recovered(tmp_path: Path) -> None:
    """Where the atomic directory exchange is unavailable, a save renames the old directory aside first;
    a crash right after that rename leaves only ``.name.old-<host>-<pid>-*``. Loading puts it back."""
    from memkit.files import owner_tag

    bank = memkit.create_bank("faiss-flat", dim=DIM)
    bank.add(det_vectors(np.arange(20), DIM))
    bank.save(tmp_path / "b")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = owner_tag().rsplit("-", 1)[0]
    aside = tmp_path / f".b.old-{host}-{dead}-1"
    os.replace(tmp_path / "b", aside)  # the state a kill between the two renames leaves
    (tmp_path / f".b.tmp-{host}-{dead}-xyz").mkdir()  # and a half-written new save
    loaded = memkit.load_bank(tmp_path / "b")
    assert loaded.ids().tolist() == list(range(20)) and not aside.exists()
    bank.save(tmp_path / "b")  # the next save removes the dead process's leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
