"""Packaging: light import, backends/ and integrations/ installed as memkit.*, typed, both install modes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import memkit

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("faiss", "hnswlib", "usearch", "qdrant_client", "transformers", "torch", "sqlite_utils")


def test_import_memkit_is_light() -> None:
    code = f"import sys, memkit; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"import memkit pulled in {out.stdout.strip()}"


def test_editable_install_maps_folders() -> None:
    import memkit.backends
    import memkit.integrations

    assert Path(memkit.backends.__file__).parent == ROOT / "backends"
    assert Path(memkit.integrations.__file__).parent == ROOT / "integrations"
    assert (Path(memkit.__file__).parent / "py.typed").is_file()


@pytest.mark.slow
def test_regular_install_maps_folders(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True)
    assert (target / "memkit" / "backends" / "faiss_bank.py").is_file()
    assert (target / "memkit" / "integrations" / "__init__.py").is_file()
    assert (target / "memkit" / "py.typed").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import memkit, memkit.backends.faiss_bank as f, memkit.integrations as i; "
            "print(memkit.__file__, f.__file__, i.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert all(p.startswith(str(target)) for p in out.stdout.split()), out.stdout


def test_public_names() -> None:
    for name in ("create_bank", "load_bank", "register_backend", "MemkitError", "MemoryConfig", "BankConfig",
                 "KVStoreConfig", "wrap", "unwrap", "plan"):
        assert name in memkit.__all__
    assert callable(memkit.plan)
