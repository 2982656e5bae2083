"""Bad input is refused at the door (``wrap``, ``create_bank``, ``load_config``) with a MemkitError that says what
to do, and no file of the user's is touched: budgets that hold no page, URIs with a query or fragment, a backend
given twice, duplicate config keys, a path under a file, foreign directories for qdrant and milvus-lite, and
messages that name what a path really is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import memkit
from memkit.bank import check_bank_config
from memkit.config import BankConfig, KVStoreConfig, load_config
from memkit.configbase import read_mapping
from memkit.testing.reliability import backend_available
from memkit.testing.tiny_models import one_thread, tiny_model

CFG = dict(window=32, chunk_size=8, block_size=16, top_k=2, sink_tokens=2, progress=False)
PAGE = 4 * 2 * 2 * 8 * 16 * 2  # one fp16 page of the tiny Llama: (layers, k/v, kv heads, chunk, head dim)


def _tree(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


def _needs(backend: str) -> None:
    if not backend_available(backend):
        pytest.skip(f"{backend} is not installed")


# ---------------------------------------------------------------------------------------------- budgets
def test_kvstore_budgets_that_hold_no_page_are_refused_at_load_config_and_wrap(tmp_path: Path) -> None:
    with pytest.raises(memkit.ConfigError, match="no K/V page"):
        load_config(None, kvstore={"host_bytes": 0, "device_bytes": 0})
    with pytest.raises(memkit.ConfigError, match="no K/V page"):
        KVStoreConfig(host_bytes=0, device_bytes=0, disk_dir=str(tmp_path), disk_bytes=0)
    with one_thread():
        model = tiny_model("llama")
        with pytest.raises(memkit.ConfigError, match="no K/V page"):
            memkit.wrap(model, **CFG, kvstore={"host_bytes": 0, "device_bytes": 0})
        with pytest.raises(memkit.ConfigError, match="hold no page"):  # a budget smaller than one page
            memkit.wrap(model, **CFG, kvstore={"host_bytes": PAGE - 1, "device_bytes": 0})
        wrapped = memkit.wrap(model, **CFG, kvstore={"host_bytes": 0, "device_bytes": 0, "disk_dir": str(tmp_path)})
        wrapped.memory.ingest(list(range(3, 40)))  # the disk tier alone holds them
        assert wrapped.memory.num_chunks() > 0


# ---------------------------------------------------------------------------------------------- URIs
@pytest.mark.parametrize("tail", ["?y=1#frag", "#frag", "?"])
@pytest.mark.parametrize("scheme, name", [("disk", "d"), ("qdrant", "q"), ("milvus", "m.db")])
def test_uri_query_or_fragment_is_refused(tmp_path: Path, scheme: str, name: str, tail: str) -> None:
    uri = f"{scheme}://{tmp_path}/{name}{tail}"  # a local path: should this ever be accepted, it lands in tmp_path
    with pytest.raises(memkit.ConfigError, match="query"):
        memkit.create_bank(uri, dim=4)
    with pytest.raises(memkit.ConfigError, match="query"):
        check_bank_config(BankConfig(backend=uri), 4)  # what wrap runs
    assert list(tmp_path.iterdir()) == []
    for server in ("qdrant://host:6333/coll#a", "milvus://host:19530/coll?db=a"):  # parsed only: no connection
        with pytest.raises(memkit.ConfigError, match="query"):
            memkit.bank.parse_uri(server)


# ---------------------------------------------------------------------------------------------- config
def test_backend_given_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(memkit.ConfigError, match="give one"):
        load_config(None, backend="hnswlib", bank={"backend": "usearch"})
    with pytest.raises(memkit.ConfigError, match="give one"):
        load_config({"backend": "hnswlib", "bank": {"backend": "faiss-flat"}})
    cfg = tmp_path / "memkit.yaml"
    cfg.write_text("backend: hnswlib\nbank: {backend: usearch}\n")
    with pytest.raises(memkit.ConfigError, match="give one"):
        load_config(cfg)
    cfg.write_text("backend: hnswlib\n")  # a keyword overrides the file: not a conflict
    assert load_config(cfg, bank={"backend": "usearch"}).bank.backend == "usearch"
    assert load_config(cfg, backend="usearch").bank.backend == "usearch"


@pytest.mark.parametrize("name, text", [
    ("top.yaml", "top_k: 4\nwindow: 64\ntop_k: 8\n"),
    ("nested.yaml", "kvstore:\n  dtype: fp16\n  dtype: int8\n"),
    ("flow.yaml", "bank: {metric: ip, metric: l2}\n"),
    ("top.json", '{"top_k": 4, "top_k": 8}'),
    ("nested.json", '{"kvstore": {"dtype": "fp16", "dtype": "int8"}}'),
])
def test_duplicate_config_keys_are_refused(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(memkit.ConfigError, match="written twice"):
        load_config(path)


def test_yaml_merge_keys_still_load(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {dtype: fp16, prefetch: true}\nkvstore:\n  <<: *b\n  dtype: int8\n")
    data = read_mapping(path)
    assert data["kvstore"] == {"dtype": "int8", "prefetch": True}


# ---------------------------------------------------------------------------------------------- paths
@pytest.mark.parametrize("backend", ["disk", "qdrant", "milvus"])
def test_a_path_under_a_file_is_a_config_error(tmp_path: Path, backend: str) -> None:
    _needs(backend)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    uri = f"{backend}://{notes}/sub" + (".db" if backend == "milvus" else "")
    with pytest.raises(memkit.ConfigError, match=r"notes\.txt' is a file"):
        memkit.create_bank(uri, dim=4)
    with pytest.raises(memkit.ConfigError, match=r"notes\.txt' is a file"):
        check_bank_config(BankConfig(backend=uri), 4)
    with pytest.raises(memkit.ConfigError, match="is a file"):
        KVStoreConfig(disk_dir=str(notes / "pages"))
    assert notes.read_text() == "my notes" and _tree(tmp_path) == {"notes.txt": b"my notes"}


def test_wrap_refuses_a_bank_path_under_a_file(tmp_path: Path) -> None:
    _needs("disk")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with one_thread(), pytest.raises(memkit.ConfigError, match="is a file"):
        memkit.wrap(tiny_model("llama"), **CFG, backend=f"disk://{notes}/sub")
    assert _tree(tmp_path) == {"notes.txt": b"my notes"}


def test_qdrant_never_writes_beside_a_users_files(tmp_path: Path) -> None:
    _needs("qdrant")
    mine = tmp_path / "project"
    (mine / "src").mkdir(parents=True)
    (mine / "README").write_text("mine")
    before = _tree(mine)
    with pytest.raises(memkit.ConfigError, match="non-empty directory"):
        memkit.create_bank(f"qdrant://{mine}", dim=4)
    assert _tree(mine) == before
    store = tmp_path / "store"
    bank = memkit.create_bank(f"qdrant://{store}", dim=4)  # a new directory; then it reopens as its own store
    bank.add(np.eye(4, dtype=np.float32))
    bank.close()
    again = memkit.create_bank(f"qdrant://{store}", dim=4)
    assert len(again) == 4
    again.close()


def test_milvus_refuses_a_users_file_or_directory_named_like_a_database(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    _needs("milvus")
    data = tmp_path / "data.db"
    data.write_text("my text, not a database")
    with pytest.raises(memkit.ConfigError, match=r"data\.db' is a file"):
        memkit.create_bank(f"milvus://{data}", dim=4)
    photos = tmp_path / "photos.db"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(memkit.ConfigError, match="non-empty directory"):
        memkit.create_bank(f"milvus://{photos}", dim=4)
    assert _tree(tmp_path) == {"data.db": b"my text, not a database", "photos.db": None, "photos.db/cat.jpg": b"\xff\xd8"}
    err = capfd.readouterr().err
    assert "Traceback" not in err and "lock" not in err.lower()


def test_messages_name_what_a_path_really_is(tmp_path: Path) -> None:
    file = tmp_path / "bank.txt"
    file.write_text("x")
    with pytest.raises(memkit.CorruptFileError, match="is a file, not a directory"):
        memkit.load_bank(file)
    with pytest.raises(memkit.CorruptFileError, match="does not exist"):
        memkit.load_bank(tmp_path / "missing")
    from memkit.kvstore import KVStore

    with pytest.raises(memkit.CorruptFileError, match="is a file, not a directory"):
        KVStore(page_shape=(1, 2, 1, 4, 2)).load(file)
    with pytest.raises(memkit.ConfigError, match="is a directory"):
        load_config(tmp_path)
    assert file.read_text() == "x"
