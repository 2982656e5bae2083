"""Shared pytest fixtures: real MiniLM vectors (cached), tiny models, seeds."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def real_vectors() -> np.ndarray:
    """20,200 MiniLM embeddings of distinct real paragraphs (first run embeds them, ~3 min on 2 cores)."""
    from memkit.testing.data import real_embeddings

    return real_embeddings(20_200)
