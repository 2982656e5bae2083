"""Crash hygiene of the K/V store's spill directories (``memkit.spill``): nothing of a killed reader stays on disk.

Real processes read a long input through a wrapped tiny model whose K/V store spills to ``disk_dir``
(``device_bytes: 0``, 8 pages of host memory). One is stopped with SIGTERM (no handler: memkit installs none), one
with SIGKILL, and one with SIGTERM after installing the documented handler (``sys.exit`` in it, so ``atexit`` runs
and removes its directory at once). The next run on the same ``disk_dir`` removes what the killed readers left,
and its own directory is removed at its normal exit without ``close()``. Directories the sweep cannot prove are
a gone process's own (a live process, another host, no or an edited owner record, a file of yours inside, a
link) are never touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from memkit.files import write_json
from memkit.owners import owner_record, process_start
from memkit.spill import FORMAT, OWNER_FILE, PREFIX, sweep
from memkit.testing.reliability import ROOT, report

# One interpreter imports torch and transformers once, then forks the readers (real processes, cheap to start).
LAUNCHER = r"""
import os, signal, sys
import torch
torch.set_num_threads(1)
import memkit
from memkit.testing.tiny_models import tiny_model

disk_dir, modes = sys.argv[1], sys.argv[2:]
CFG = dict(window=32, chunk_size=8, block_size=16, top_k=2, sink_tokens=2, progress=False)
memkit.unwrap(memkit.wrap(tiny_model("llama"), **CFG))  # import everything once, before forking

def read(mode):
    if mode == "handler":  # the documented opt-in: SIGTERM ends the interpreter normally, so atexit cleans up
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    page = 4 * 2 * 2 * 8 * 16 * 2  # (layers, k/v, kv heads, chunk, head dim) in fp16 for the tiny Llama
    model = memkit.wrap(tiny_model("llama"), **CFG, kvstore={"disk_dir": disk_dir, "device_bytes": 0,
                                                             "host_bytes": 8 * page})
    gen = torch.Generator().manual_seed(os.getpid())
    store = model.memory.manager.store
    for turn in range(2_000):  # a bound, should the test runner die before it sends the signal
        model.memory.ingest(torch.randint(3, 256, (1, 256), generator=gen), namespace=f"doc{turn}")
        if turn == 0:
            spill = [d for d in os.listdir(disk_dir) if d.startswith("memkit-kv-")
                     and os.path.exists(os.path.join(disk_dir, d, "owner.json"))
                     and str(os.getpid()) in open(os.path.join(disk_dir, d, "owner.json")).read()]
            assert store.stats()["tiers"]["disk"]["pages"] > 0 and len(spill) == 1, (store.stats(), spill)
            print("SPILLING", mode, os.getpid(), spill[0], flush=True)

children = {}
for mode in modes:
    pid = os.fork()
    if pid == 0:  # a killed reader never returns; SystemExit from the handler ends this interpreter normally
        read(mode)
        os._exit(3)
    children[pid] = mode
    print("PID", mode, pid, flush=True)
for _ in modes:
    pid, status = os.waitpid(-1, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    print("EXIT", children[pid], code, flush=True)
"""


def _spill_dirs(disk_dir: Path) -> set[str]:
    return {p.name for p in disk_dir.iterdir() if p.name.startswith(PREFIX)}


def test_spill_dirs_of_killed_readers_are_removed_by_the_next_run(tmp_path: Path) -> None:
    import memkit
    from memkit.testing.tiny_models import one_thread, tiny_model

    disk_dir = tmp_path / "pages"
    (disk_dir / "notes").mkdir(parents=True)
    (disk_dir / "notes" / "mine.txt").write_text("a file of the user's")
    signals = {"sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL, "handler": signal.SIGTERM}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(disk_dir), *signals], cwd=ROOT, env=env,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with one_thread():
        hf = tiny_model("llama")  # the next run's model, built while the readers start
    pids: list[int] = []
    try:
        out, spilled, codes = launcher.stdout, {}, {}
        assert out is not None
        while len(spilled) < len(signals) and (line := out.readline()):
            word, mode, pid, *name = line.split()
            if word == "PID":
                pids.append(int(pid))
            else:
                spilled[mode] = (int(pid), name[0])
        assert len(spilled) == len(signals), launcher.communicate(timeout=60)
        for mode, (pid, _) in spilled.items():
            os.kill(pid, signals[mode])
        while len(codes) < len(signals) and (line := out.readline()):
            _, mode, code = line.split()
            codes[mode] = int(code)
        assert launcher.wait(60) == 0, launcher.communicate()
    finally:
        if launcher.poll() is None:  # a failure above: end the readers this test started, then their launcher
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            launcher.kill()
            launcher.communicate()
    assert codes == {"sigterm": -signal.SIGTERM, "sigkill": -signal.SIGKILL, "handler": 128 + signal.SIGTERM}
    stranded = {spilled["sigterm"][1], spilled["sigkill"][1]}
    assert _spill_dirs(disk_dir) == stranded  # the killed readers' pages are still there; the handler's are gone
    stranded_files = sum(len(os.listdir(disk_dir / d)) for d in stranded)

    page = 4 * 2 * 2 * 8 * 16 * 2
    with one_thread():  # the next run on the same disk_dir
        model = memkit.wrap(hf, window=32, chunk_size=8, block_size=16, top_k=2, sink_tokens=2,
                            progress=False, kvstore={"disk_dir": str(disk_dir), "device_bytes": 0,
                                                     "host_bytes": 8 * page})
        assert _spill_dirs(disk_dir) == set()  # removed when its store started, before it read anything
        model.memory.ingest([3 + i % 250 for i in range(256)])
        assert len(_spill_dirs(disk_dir)) == 1
        model.memory.manager.store.close()
    assert _spill_dirs(disk_dir) == set()
    assert (disk_dir / "notes" / "mine.txt").read_text() == "a file of the user's"
    report("spill_killed_readers", stranded_dirs=len(stranded), stranded_files=stranded_files, left_after=0)


def _crafted(root: Path, name: str, record: dict[str, object], *, extra: str | None = None) -> Path:
    d = root / f"{PREFIX}{name}"
    d.mkdir()
    write_json(d / OWNER_FILE, {"format": FORMAT, "version": 1, **record})
    (d / "seg-00000.bin").write_bytes(b"\0" * 4096)
    if extra is not None:
        (d / extra).write_text("yours")
    return d


def test_sweep_removes_only_directories_it_proves_are_a_gone_process_own(tmp_path: Path) -> None:
    me = owner_record()
    child = subprocess.Popen(["sleep", "30"])
    child_record = dict(me, pid=child.pid, start=process_start(child.pid))
    child.kill()
    child.wait()
    gone = _crafted(tmp_path, "gone", child_record)  # its process has exited
    reused = _crafted(tmp_path, "reused", dict(me, start="1"))  # a record of this pid from an earlier process
    rebooted = _crafted(tmp_path, "rebooted", dict(me, boot="another-boot"))
    keep = {
        "live": _crafted(tmp_path, "live", me),  # this very process: alive
        "host": _crafted(tmp_path, "host", dict(child_record, host="another-host")),  # a shared disk
        "yours": _crafted(tmp_path, "yours", child_record, extra="notes.txt"),  # a file of yours inside
        "nostart": _crafted(tmp_path, "nostart", dict(child_record, start=None)),  # cannot tell a reused pid
    }
    edited = _crafted(tmp_path, "edited", child_record)
    (edited / OWNER_FILE).write_text((edited / OWNER_FILE).read_text().replace(str(child.pid), str(child.pid + 1)))
    bare = tmp_path / f"{PREFIX}bare"
    bare.mkdir()
    (bare / "seg-00000.bin").write_bytes(b"x")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "seg-00000.bin").write_bytes(b"x")
    (tmp_path / f"{PREFIX}link").symlink_to(target)
    before = {p: sorted(os.listdir(p)) for p in [*keep.values(), edited, bare, target]}

    removed = sweep(tmp_path)

    assert sorted(removed) == sorted(str(p) for p in (gone, reused, rebooted))
    assert not gone.exists() and not reused.exists() and not rebooted.exists()
    assert {p: sorted(os.listdir(p)) for p in before} == before
    assert (tmp_path / f"{PREFIX}link").is_symlink() and (target / "seg-00000.bin").read_bytes() == b"x"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times come from /proc")
def test_owner_record_names_this_process() -> None:
    me = owner_record()
    assert me["pid"] == os.getpid() and me["start"] == process_start(os.getpid()) and me["start"]
    assert process_start(2**22 + 12345) == ""  # beyond pid_max: no such process


# A process that makes a temporary disk bank and opens a save (load_bank's private copy), then waits to be killed.
DISK_CHILD = r"""
import sys, time
import numpy as np
import memkit

made = memkit.create_bank("disk", dim=4)
made.add(np.eye(4, dtype=np.float32), np.arange(4))
copy = memkit.load_bank(sys.argv[1])
print(made.path, copy.path, flush=True)
time.sleep(120)  # a bound, should the test runner die before it kills this process
"""


def test_temporary_disk_banks_of_a_killed_process_are_removed_by_the_next_one(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk bank without a path, and ``load_bank``'s private copy of a saved disk bank, live in private temporary
    directories with an owner record: SIGKILL leaves them, the next temporary disk bank removes them; its own is
    removed on close, the save is untouched, and a directory with a file of yours inside stays."""
    import numpy as np

    import memkit
    from backends.disk_bank import TEMP_DIR

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # this process's temporary directory, and the child's below
    saved = memkit.create_bank("disk", dim=4)
    saved.add(np.eye(4, dtype=np.float32), np.arange(4))
    saved.save(tmp_path / "saved")
    saved.close()
    files = sorted(os.listdir(tmp_path / "saved"))
    child = subprocess.Popen([sys.executable, "-c", DISK_CHILD, str(tmp_path / "saved")], cwd=ROOT,
                             env={**os.environ, "TMPDIR": str(tmp)}, stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()  # type: ignore[union-attr]
    finally:
        child.kill()
        child.wait()
    made, copy = (Path(p) for p in line.split())
    assert made.parent == tmp and copy.parent == tmp and made.name.startswith(TEMP_DIR.prefix)
    assert (made / OWNER_FILE).is_file() and (copy / "bank.sqlite").is_file()  # left behind by the kill
    user_file = tmp / f"{TEMP_DIR.prefix}yours"  # a gone process's, but with a file of yours inside: kept
    user_file.mkdir()
    write_json(user_file / OWNER_FILE, {"format": TEMP_DIR.format, "version": 1,
                                        **dict(owner_record(), pid=child.pid, start="1")})
    (user_file / "notes.txt").write_text("yours")
    kept_user = sorted(os.listdir(user_file))

    bank = memkit.create_bank("disk", dim=4)  # the next temporary disk bank
    assert not made.exists() and not copy.exists()
    assert sorted(os.listdir(user_file)) == kept_user and sorted(os.listdir(tmp_path / "saved")) == files
    own = bank.path
    assert (own / OWNER_FILE).is_file()
    bank.add(np.eye(4, dtype=np.float32), np.arange(4))
    assert bank.search(np.eye(4, dtype=np.float32)[:1], 1).ids.tolist() == [[0]]
    bank.close()
    assert not own.exists()
    assert sorted(p.name for p in tmp.iterdir()) == [user_file.name]
