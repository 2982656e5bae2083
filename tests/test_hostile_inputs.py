"""Property-based hostile input (``memkit.testing.hostile_inputs``): paths, URIs and K/V budgets.

Every example ends in success or a MemkitError, never another exception; inside a sandbox (its own ``$HOME``,
working directory, and a user's ``notes.txt`` and ``project/``), no user file changes, no ``~`` directory appears
in the working directory and no name with a ``$VARIABLE`` in it is created. A K/V store is never built that
cannot hold a page, and one that is built stores and returns a page exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memkit
from memkit.config import KVStoreConfig, load_config
from memkit.kvstore import KVStore
from memkit.testing.hostile_inputs import Sandbox, budgets, paths, uris
from memkit.testing.reliability import backend_available

SHAPE = (2, 2, 2, 8, 4)
PAGE = KVStore(KVStoreConfig(dtype="fp32"), page_shape=SHAPE).page_bytes
SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _use_path(op: str, text: str) -> None:
    if op == "bank.save":
        bank = memkit.create_bank("faiss-flat", dim=4)
        bank.add(np.eye(4, dtype=np.float32))
        bank.save(text)
        assert len(memkit.load_bank(text)) == 4
    elif op == "load_bank":
        memkit.load_bank(text)
    elif op == "load_config":
        load_config(text)
    elif op == "disk_dir":
        store = KVStore(KVStoreConfig(disk_dir=text, device_bytes=0, host_bytes=PAGE, dtype="fp32"), page_shape=SHAPE)
        pages = torch.randn(3, *SHAPE)
        store.put([0, 1, 2], pages)
        torch.testing.assert_close(store.get([0, 1, 2]), pages, rtol=0, atol=0)
        store.close()


@settings(SLOW, max_examples=80)
@given(path=paths(), op=st.sampled_from(["bank.save", "load_bank", "load_config", "disk_dir"]))
def test_hostile_paths_end_in_success_or_a_memkit_error(tmp_path_factory: Any, path: str, op: str) -> None:
    sandbox = Sandbox(tmp_path_factory.mktemp("paths"))
    with sandbox.active():
        try:
            _use_path(op, sandbox.resolve(path))
        except memkit.MemkitError:
            pass
    sandbox.check()


@settings(SLOW, max_examples=50)
@given(uri=uris())
def test_hostile_uris_end_in_success_or_a_memkit_error(tmp_path_factory: Any, uri: str) -> None:
    if not (backend_available("disk") and backend_available("qdrant")):
        pytest.skip("needs the disk and qdrant backends")
    sandbox = Sandbox(tmp_path_factory.mktemp("uris"))
    text = sandbox.resolve(uri)
    with sandbox.active():
        try:
            bank = memkit.create_bank(text, dim=4)
        except memkit.MemkitError:
            bank = None
        if bank is not None:
            assert "?" not in text and "#" not in text  # a query or fragment is never dropped silently
            try:
                bank.add(np.eye(4, dtype=np.float32))
                assert bank.search(np.eye(4, dtype=np.float32), 1).ids[:, 0].tolist() == [0, 1, 2, 3]
            finally:
                bank.close()
    sandbox.check()


@settings(SLOW, max_examples=150)
@given(settings_=budgets(PAGE))
def test_hostile_budgets_never_build_a_store_that_holds_no_page(tmp_path_factory: Any,
                                                                settings_: dict[str, Any]) -> None:
    sandbox = Sandbox(tmp_path_factory.mktemp("budgets"))
    with sandbox.active():
        cfg = dict(settings_, dtype="fp32")
        if isinstance(cfg.get("disk_dir"), str):
            cfg["disk_dir"] = sandbox.resolve(cfg["disk_dir"])
        try:
            store = KVStore(load_config(None, kvstore=cfg).kvstore, page_shape=SHAPE)
        except memkit.MemkitError:
            store = None
        if store is not None:
            assert store.capacity_pages >= 1
            page = torch.randn(1, *SHAPE)
            store.put([7], page)
            torch.testing.assert_close(store.get([7]), page, rtol=0, atol=0)
            store.close()
    sandbox.check()


def test_sandbox_check_catches_what_it_guards(tmp_path: Path) -> None:
    """The invariants can fail: a literal ~, a literal $VARIABLE and a changed user file are each caught."""
    for damage in (lambda s: (s.root / "cwd" / "~").mkdir(), lambda s: (s.root / "cwd" / "$HOME").mkdir(),
                   lambda s: (s.root / "notes.txt").write_text("gone"), lambda s: (s.root / "project" / "x.lock").touch()):
        sandbox = Sandbox(tmp_path / str(id(damage)))
        damage(sandbox)
        with pytest.raises(AssertionError):
            sandbox.check()
