"""Real vectors for tests and benchmarks: MiniLM embeddings of real paragraphs, cached on disk.

Embedding 20k paragraphs with MiniLM takes a few minutes on 2 CPU cores, so results are cached
under ``$MEMKIT_CACHE`` (default ``~/.cache/memkit``) keyed by count and a hash of the texts.
Cache files are plain ``.npy`` read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from memkit.resources import cache_dir

__all__ = ["cache_dir", "real_embeddings"]


def real_embeddings(n: int, *, max_chars: int = 300) -> np.ndarray:
    """(n, 384) float32 unit MiniLM embeddings of ``n`` distinct real paragraphs."""
    from memkit.corpora import paragraphs

    texts = paragraphs(n, max_chars=max_chars)
    if len(texts) < n:
        raise RuntimeError(f"only {len(texts)} distinct paragraphs available, asked for {n}")
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    path = cache_dir() / f"minilm-{n}-{digest}.npy"
    if path.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape == (n, 384) and arr.dtype == np.float32:
                return arr
        except (OSError, ValueError):
            pass
    from memkit.retrievers import get_text_retriever

    arr = get_text_retriever()(texts)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
    return arr
