"""Running the ``memkit`` CLI in a subprocess for tests, with a tiny model's memory config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["memkit_cli", "TINY_CONFIG"]

# A memkit config small enough for the tiny random models of memkit.testing.tiny_models.
TINY_CONFIG = """\
window: 128
block_size: 128
chunk_size: 32
top_k: 2
sink_tokens: 4
retriever: keys
"""


def memkit_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """``python -m memkit.cli *args`` offline, one torch thread, output captured."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "memkit.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)
