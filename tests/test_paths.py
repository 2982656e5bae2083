"""One path policy (``memkit.paths``): ``~`` and ``$VARIABLES`` are expanded in every path memkit takes, and one
that cannot be expanded is refused; nothing named ``~`` or ``$HOME`` is ever created in the working directory.

Each test runs with ``HOME`` set to a fresh directory and the working directory set to another, then checks
that the files landed under HOME and that the working directory stayed empty.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import memkit
from memkit.config import KVStoreConfig, MemoryConfig, load_config
from memkit.kvstore import KVStore
from memkit.testing.reliability import backend_available
from memkit.testing.tiny_models import one_thread, tiny_model

SHAPE = (2, 2, 2, 8, 4)


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MEMKIT_TEST_DATA", str(home / "data"))
    monkeypatch.setenv("MEMKIT_RELATIVE", "relative")
    monkeypatch.delenv("MEMKIT_NO_SUCH_VARIABLE", raising=False)
    monkeypatch.chdir(cwd)
    yield home
    assert os.listdir(cwd) == []  # nothing called "~" or "$HOME" here


@pytest.mark.parametrize("disk_dir", ["~/pages", "$HOME/pages", "${HOME}/pages", "$MEMKIT_TEST_DATA/../pages"])
def test_kvstore_disk_dir_expands_home_and_variables(home: Path, disk_dir: str) -> None:
    pb = KVStore(KVStoreConfig(dtype="fp32"), page_shape=SHAPE).page_bytes
    store = KVStore(KVStoreConfig(disk_dir=disk_dir, device_bytes=0, host_bytes=pb, dtype="fp32"), page_shape=SHAPE)
    pages = torch.randn(3, *SHAPE)
    store.put([0, 1, 2], pages)
    spill = [p for p in (home / "pages").iterdir() if p.name.startswith("memkit-kv-")]
    assert len(spill) == 1 and any(p.name.startswith("seg-") for p in spill[0].iterdir())
    torch.testing.assert_close(store.get([0, 1, 2]), pages)
    store.close()
    assert list((home / "pages").iterdir()) == []
    assert KVStoreConfig(disk_dir=disk_dir).disk_dir == disk_dir  # the config keeps what was written


def test_saves_loads_and_config_files_expand_home(home: Path) -> None:
    bank = memkit.create_bank("faiss-flat", dim=4)
    bank.add(np.eye(4, dtype=np.float32))
    bank.save("~/bank")
    assert (home / "bank" / "manifest.json").is_file()
    assert len(memkit.load_bank("$HOME/bank")) == 4
    with one_thread():
        wrapped = memkit.wrap(tiny_model("llama"), window=32, chunk_size=8, block_size=16, top_k=2, sink_tokens=2,
                              progress=False)
        wrapped.memory.ingest(torch.arange(3, 60)[None])
        wrapped.memory.save("~/mem")
        assert (home / "mem" / "manifest.json").is_file()
        chunks = wrapped.memory.num_chunks()
        wrapped.memory.reset()
        wrapped.memory.load("${HOME}/mem")
        assert wrapped.memory.num_chunks() == chunks > 0
    MemoryConfig(top_k=3).save("~/memkit.yaml")
    assert load_config("~/memkit.yaml", window=64).top_k == 3 and (home / "memkit.yaml").is_file()


# Forms whose literal reading stays harmless here (refused, or a server address that is never reached); the
# three-slash forms, which old code read as a directory at the filesystem root, are checked by parsing alone.
@pytest.mark.parametrize("uri, where", [
    ("disk://~/d1", "d1"), ("disk://$MEMKIT_TEST_DATA/d4", "data/d4"), ("qdrant://~/q1", "q1"),
    ("milvus://~/m1.db", "m1.db"),
])
def test_uris_expand_home_and_variables(home: Path, uri: str, where: str) -> None:
    backend = uri.split(":")[0]
    if not backend_available(backend):
        pytest.skip(f"{backend} is not installed")
    bank = memkit.create_bank(uri, dim=4)
    try:
        bank.add(np.eye(4, dtype=np.float32))
        assert (home / where).is_dir()
    finally:
        bank.close()


def test_three_slash_uris_expand_home_and_variables(home: Path) -> None:
    parse = memkit.bank.parse_uri
    assert parse("disk:///~/d2") == ("disk", {"path": str(home / "d2")})
    assert parse("disk:///$HOME/d3") == ("disk", {"path": str(home / "d3")})
    assert parse("qdrant:///${HOME}/q") == ("qdrant", {"path": str(home / "q")})
    assert parse("milvus:///~/m.db") == ("milvus", {"path": str(home / "m.db")})
    assert parse("disk:///data/$MEMKIT_RELATIVE/x") == ("disk", {"path": "/data/relative/x"})


def test_bank_path_parameters_expand_home(home: Path) -> None:
    if not backend_available("disk"):
        pytest.skip("sqlite-utils is not installed")
    bank = memkit.create_bank({"backend": "disk", "params": {"path": "~/params"}}, dim=4)
    bank.close()
    assert (home / "params" / "bank.sqlite").is_file()


def test_paths_that_cannot_be_expanded_are_refused(home: Path) -> None:
    unset = "$MEMKIT_NO_SUCH_VARIABLE/x"
    with pytest.raises(memkit.ConfigError, match="MEMKIT_NO_SUCH_VARIABLE"):
        KVStoreConfig(disk_dir=unset)
    with pytest.raises(memkit.ConfigError, match="MEMKIT_NO_SUCH_VARIABLE"):
        memkit.create_bank(f"disk://{unset}", dim=4)
    with pytest.raises(memkit.ConfigError, match="MEMKIT_NO_SUCH_VARIABLE"):
        load_config(f"{unset}.yaml")
    bank = memkit.create_bank("faiss-flat", dim=4)
    with pytest.raises(memkit.InvalidInputError, match="MEMKIT_NO_SUCH_VARIABLE"):
        bank.save(unset)
    with pytest.raises(memkit.InvalidInputError, match="no user"):
        bank.save("~memkit_no_such_user/x")
    for literal in ("./~", "data/~/x"):  # a directory named ~ is one `rm -rf ~` from the home directory
        with pytest.raises(memkit.InvalidInputError, match="named '~'"):
            bank.save(literal)
    with pytest.raises(memkit.ConfigError, match="named '~'"):
        KVStoreConfig(disk_dir="./~")
    with pytest.raises(memkit.ConfigError, match="not an absolute path"):
        memkit.bank.parse_uri("qdrant://$MEMKIT_RELATIVE:6333/coll")  # host names are not expanded
