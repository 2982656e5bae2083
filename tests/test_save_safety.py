"""Saves never delete, move or hide a file memkit did not write; URIs mean what they say.

The bank side runs in every backend's conformance suite (``test_save_never_replaces_what_memkit_did_not_write``);
this file covers the memory manager, the K/V store and a wrapped model's ``memory.save``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import memkit
from memkit.config import MemoryConfig
from memkit.errors import SaveTargetError
from memkit.kvstore import KVStore
from memkit.memory import MemoryManager


def _manager() -> MemoryManager:
    mm = MemoryManager(MemoryConfig(chunk_size=4, kvstore={"dtype": "fp32"}), num_layers=1, kv_heads=1, head_dim=4,
                       embed_dim=4)
    mm.add_chunks(torch.ones(2, 1, 1, 4, 4), torch.ones(2, 1, 1, 4, 4), torch.eye(4)[:2], [[0, 4], [4, 8]])
    return mm


def _user_area(root: Path) -> dict[str, Path]:
    project = root / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')")
    lone = root / "hostname"
    lone.write_text("my-host")
    return {"dir": project, "file": lone, "under_file": lone / "sub", "link": root / "link"}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["memory", "kvstore"])
def test_saves_refuse_what_memkit_did_not_write(tmp_path: Path, kind: str) -> None:
    mm = _manager()
    obj = mm if kind == "memory" else mm.store
    area = _user_area(tmp_path)
    area["link"].symlink_to(area["dir"])
    before = _snapshot(tmp_path)
    for name in ("dir", "file", "under_file", "link"):
        with pytest.raises(SaveTargetError):
            obj.save(area[name])
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostname", "link", "project"]  # nothing hidden aside
    for bad in (None, "", ".", b"", 3.5):
        with pytest.raises(memkit.MemkitError):
            obj.save(bad)  # type: ignore[arg-type]
    target = tmp_path / "save"
    obj.save(target)
    obj.save(target)  # a previous memkit save is replaced atomically
    loaded = MemoryManager.load(target) if kind == "memory" else KVStore(mm.config.kvstore, page_shape=mm.page_shape)
    if kind == "kvstore":
        loaded.load(target)
    assert len(loaded.store if kind == "memory" else loaded) == 2


def test_save_to_unwritable_places_is_a_memkit_error(tmp_path: Path) -> None:
    mm = _manager()
    with pytest.raises(SaveTargetError):
        mm.save("/proc/memkit-test")
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(SaveTargetError):
            mm.save(ro / "m")


def test_loads_of_nothing_are_memkit_errors(tmp_path: Path) -> None:
    for bad in (None, "", 7):
        with pytest.raises(memkit.MemkitError):
            MemoryManager.load(bad)  # type: ignore[arg-type]
        with pytest.raises(memkit.MemkitError):
            memkit.load_bank(bad)  # type: ignore[arg-type]
    (tmp_path / "f").write_text("x")
    with pytest.raises(memkit.CorruptFileError):
        MemoryManager.load(tmp_path / "f")


def test_wrapped_model_memory_save_is_safe(tmp_path: Path) -> None:
    from memkit.testing.tiny_models import tiny_model

    wrapped = memkit.wrap(tiny_model("llama"), window=32, chunk_size=8, block_size=16, top_k=2, sink_tokens=2,
                          progress=False)
    wrapped.memory.ingest(torch.randint(3, 256, (1, 80)))
    area = _user_area(tmp_path)
    with pytest.raises(SaveTargetError):
        wrapped.memory.save(area["dir"])
    with pytest.raises(SaveTargetError):
        wrapped.memory.save(area["file"])
    assert (area["dir"] / "src" / "main.py").read_text() == "print('mine')"
    assert area["file"].read_text() == "my-host"
    wrapped.memory.save(tmp_path / "mem")
    assert (tmp_path / "mem" / "manifest.json").is_file()


def test_disk_uris_name_absolute_paths(tmp_path: Path) -> None:
    with pytest.raises(memkit.ConfigError, match="three slashes"):
        memkit.create_bank("disk://relative/dir", dim=4)
    with pytest.raises(memkit.ConfigError):
        memkit.create_bank("disk://host/abs/dir", dim=4)
    assert not Path("/dir").exists() and not Path("/abs").exists()
    bank = memkit.create_bank(f"disk://{tmp_path / 'bank'}", dim=4)  # disk:// + /abs/path = three slashes
    bank.add(np.eye(4, dtype=np.float32))
    assert (tmp_path / "bank").is_dir()
    bank.close()
    rel = memkit.create_bank({"backend": "disk", "params": {"path": str(tmp_path / "rel")}}, dim=4)
    rel.close()


def test_search_k_is_capped() -> None:
    bank = memkit.create_bank("faiss-flat", dim=4)
    bank.add(np.eye(4, dtype=np.float32))
    with pytest.raises(memkit.InvalidInputError, match="limit"):
        bank.search(np.eye(4, dtype=np.float32), k=10**9)
    scores, ids = bank.search(np.eye(4, dtype=np.float32), k=10)
    assert np.isneginf(scores[:, 4:]).all()
    assert ids.shape == (4, 10) and (ids[:, 4:] == -1).all()
