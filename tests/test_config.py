"""Configs: defaults valid, dict/JSON/YAML round trips, validation errors that say what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from memkit.config import BankConfig, KVStoreConfig, MemoryConfig, load_config, resolve_layers
from memkit.errors import ConfigError, MemkitError, UnknownParameterError


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    cfg = MemoryConfig(backend="hnswlib", top_k=4, memory_layers=[3, 5], kvstore=KVStoreConfig(dtype="int8"))
    assert MemoryConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / f"memkit{suffix}"
    cfg.save(path)
    assert MemoryConfig.load(path) == cfg
    assert load_config(path) == cfg
    assert load_config(path, top_k=2).top_k == 2


def test_backend_shorthand_and_bank_stay_in_sync() -> None:
    assert MemoryConfig(backend="usearch").bank.backend == "usearch"
    assert MemoryConfig(bank={"backend": "disk"}).backend == "disk"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"style": "nope"}, "style"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"top_k": -1}, "top_k"),
        ({"memory_layers": "some"}, "memory_layers"),
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
