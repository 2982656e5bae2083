"""The README's MemoryBank snippet runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _block(after: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(after)
    m = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert m, f"no python block after {after!r}"
    return m.group(1)


def test_memorybank_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = _block("## MemoryBank: one API")
    monkeypatch.chdir(tmp_path)
    disk = Path("/tmp/memkit-readme-bank")
    if disk.exists():  # a leftover of an earlier run of this test: the snippet creates a new bank there
        import shutil

        shutil.rmtree(disk)
    scope: dict[str, object] = {}
    try:
        exec(compile(code, "README.md", "exec"), scope)
    finally:
        if disk.exists():
            import shutil

            shutil.rmtree(disk)
    assert len(scope["bank2"]) == 997 and (tmp_path / "mem" / "manifest.json").is_file()  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == ["mem"]
