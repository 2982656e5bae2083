"""Configs: defaults valid, dict/JSON/YAML round trips, validation errors that say what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from memkit.config import BankConfig, KVStoreConfig, LongMemConfig, MemLongConfig, MemoryConfig, load_config, resolve_layers
from memkit.errors import ConfigError, MemkitError, UnknownParameterError


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    cfg = MemoryConfig(backend="hnswlib", top_k=4, style_config=MemLongConfig(memory_layers=[3, 5]),
                       kvstore=KVStoreConfig(dtype="int8"))
    assert cfg.to_dict()["memlong"]["memory_layers"] == [3, 5] and "backend" not in cfg.to_dict()
    assert MemoryConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / f"memkit{suffix}"
    cfg.save(path)
    assert MemoryConfig.load(path) == cfg
    assert load_config(path) == cfg
    assert load_config(path, top_k=2).top_k == 2


def test_backend_shorthand_sets_the_bank() -> None:
    assert MemoryConfig(backend="usearch").bank.backend == "usearch"
    assert load_config(backend="disk").bank.backend == "disk"
    assert load_config({"bank": {"backend": "hnswlib", "params": {"ef_search": 64}}}, backend="usearch").bank.params \
        == {"ef_search": 64}
    with pytest.raises(ConfigError, match="disagree"):
        MemoryConfig(backend="usearch", bank={"backend": "disk"})


def test_style_blocks_and_old_flat_keys() -> None:
    lm = load_config(style="longmem", longmem={"sidenet": True, "layer": 3})
    assert isinstance(lm.style_config, LongMemConfig) and lm.style_config.sidenet and lm.style_config.layer == 3
    assert lm.to_dict()["longmem"]["sidenet"] is True and "memlong" not in lm.to_dict()
    assert load_config(lm.to_dict(), longmem={"gate_init": -2.0}).style_config.sidenet  # a partial block merges
    with pytest.warns(FutureWarning, match="sidenet -> longmem.sidenet"):
        old = load_config(style="longmem", sidenet=True, longmem_chunk=2, gate_init=-4.0)
    assert old.style_config == LongMemConfig(sidenet=True, chunk=2, gate_init=-4.0)
    with pytest.warns(FutureWarning, match="memory_layers -> memlong.memory_layers"):
        assert load_config(memory_layers=[1]).style_config.memory_layers == [1]
    with pytest.warns(FutureWarning, match="ignored"):
        assert load_config(gate_init=-3.0).style == "memlong"  # a LongMem key with style memlong is dropped
    with pytest.raises(ConfigError, match="'longmem' block but style='memlong'"):
        load_config(longmem={"sidenet": True})
    assert load_config(lm, style="memlong").style_config == MemLongConfig()  # switching style drops the old block


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"style": "nope"}, "style"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"top_k": -1}, "top_k"),
        ({"memlong": {"memory_layers": "some"}}, "memory_layers"),
        ({"top_k": 10**9}, "top_k"),
        ({"capacity_tokens": 1}, "below one chunk"),
        ({"progress": "yes"}, "progress"),
        ({"flush_window": 1}, "flush_window"),
        ({"protect_recent": "half"}, "protect_recent"),
        ({"retriever": "nope"}, "retriever"),
        ({"kvstore": {"device": "banana"}}, "device"),
        ({"kvstore": {"prefetch": "no"}}, "prefetch"),
        ({"style": "longmem", "longmem": {"gate_init": "x"}}, "gate_init"),
        ({"style": "longmem", "longmem": {"positions": "rope"}}, "positions"),
        ({"policy": "random"}, "policy"),
        ({"protect_recent": 1.5}, "protect_recent"),
        ({"kvstore": {"dtype": "fp8"}}, "dtype"),
        ({"bank": {"metric": "hamming"}}, "metric"),
    ],
)
def test_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MemoryConfig.from_dict(kwargs)


def test_unknown_field_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(UnknownParameterError, match="valid fields"):
        MemoryConfig.from_dict({"topk": 3})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [unclosed")
    with pytest.raises(ConfigError, match="could not parse"):
        load_config(bad)
    evil = tmp_path / "evil.yaml"
    evil.write_text("!!python/object/apply:os.system ['echo pwned']")
    with pytest.raises(MemkitError):
        load_config(evil)  # safe_load refuses to construct Python objects


def test_resolve_layers() -> None:
    assert resolve_layers("upper_half", 30) == list(range(15, 30))
    assert resolve_layers("all", 3) == [0, 1, 2]
    assert resolve_layers([-1, 0], 4) == [0, 3]
    with pytest.raises(ConfigError):
        resolve_layers([7], 4)
    assert BankConfig().backend == "faiss-flat"


def test_disk_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "pages"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        KVStoreConfig(disk_dir=str(f))
