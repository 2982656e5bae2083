"""Shared pytest fixtures: real MiniLM vectors (cached), tiny models, seeds."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def real_vectors() -> np.ndarray:
    """20,200 MiniLM embeddings of distinct real paragraphs (first run embeds them, ~3 min on 2 cores)."""
    from memkit.testing.data import real_embeddings

    return real_embeddings(20_200)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder with a tiny random Llama + a BPE tokenizer trained on Hamlet, text file, memkit config file)."""
    from memkit.testing.cli import TINY_CONFIG
    from memkit.testing.tiny_models import tiny_hf_folder

    root = tmp_path_factory.mktemp("tiny")
    folder, text = tiny_hf_folder(root)
    (root / "memkit.yaml").write_text(TINY_CONFIG)
    return folder, text, root / "memkit.yaml"
