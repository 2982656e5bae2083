"""Training documents for LongMem-style memory (Wang et al. 2023): what ``memkit train`` reads, and why.

LongMem adapts its memory-reading parts on long documents while the memory bank caches the same document's
earlier segments (the paper: "memory-augmented adaptation training" on long Pile subsets, with the SideNet and
the joint attention trained and the backbone frozen). memkit's CPU recipe does the same at a small scale:

* **Long documents, memory = the document so far.** Each training text (a play, a book) is cut into documents
  of ``doc_tokens`` tokens; ``memkit.train`` reads a document segment by segment, in order, and resets memory
  when the next one starts, so every target beyond the first window can only be helped by memory of *the same*
  document (speaker names, rare words, refrains that left the window). The documents are shuffled (seeded) so
  consecutive steps see different texts: variety matters more than steps here (``memkit bench train``: three
  plays cycled made held-out loss worse, twelve plays lowered it).
* **Optional copy documents** (``copy_fraction``): a document that ends with a passage of itself read at
  least one window earlier, so its targets depend on text beyond the window as strongly as text can. This is
  the repeated-sequence probe of induction behaviour (Olsson et al. 2022, "In-context Learning and Induction
  Heads"), used as training signal for copying out of memory. Measured here (see ``benchmarks/results/
  train.md``): it did not raise the held-out perplexity gain, so the documented recipe leaves it at 0.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from memkit.errors import InvalidInputError

__all__ = ["split_documents", "copy_documents", "training_documents", "describe"]


def split_documents(texts: Sequence[torch.Tensor], doc_tokens: int, *, min_tokens: int = 0) -> list[torch.Tensor]:
    """Cut each 1-D token tensor into documents of ``doc_tokens`` tokens (a shorter tail is kept when it has at
    least ``min_tokens`` tokens)."""
    if doc_tokens < 2:
        raise InvalidInputError(f"doc_tokens must be >= 2, got {doc_tokens}")
    out = []
    for ids in texts:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        for s in range(0, ids.numel(), doc_tokens):
            piece = ids[s:s + doc_tokens]
            if piece.numel() >= max(2, min_tokens if s else 2):
                out.append(piece)
    return out


def copy_documents(docs: Sequence[torch.Tensor], n: int, *, window: int, rng: random.Random,
                   passage: tuple[int, int] = (128, 384)) -> list[torch.Tensor]:
    """``n`` documents ``text + passage`` where ``passage`` (``passage`` tokens long) is a piece of ``text`` that
    starts at least ``window`` tokens before the copy, so all of it has left the window when it is read again."""
    out = []
    lo, hi = passage
    usable = [d for d in docs if d.numel() >= hi + window + 2]
    if n and not usable:
        raise InvalidInputError(f"copy documents need training documents of at least {hi + window + 2} tokens")
    for i in range(n):
        d = usable[i % len(usable)]
        P = rng.randrange(lo, hi)
        start = rng.randrange(0, d.numel() - P - window)  # the copy begins >= window tokens after the passage starts
        out.append(torch.cat([d, d[start:start + P]]))
    return out


def training_documents(texts: Sequence[torch.Tensor], *, doc_tokens: int, window: int, copy_fraction: float = 0.0,
                       seed: int = 0) -> list[torch.Tensor]:
    """The shuffled document list ``memkit train`` reads: :func:`split_documents` plus ``copy_fraction`` of copy
    documents (a share of the final list)."""
    if not 0.0 <= copy_fraction < 1.0:
        raise InvalidInputError(f"copy_fraction must be in [0, 1), got {copy_fraction}")
    rng = random.Random(seed)
    docs = split_documents(texts, doc_tokens, min_tokens=max(2 * window, 64))
    if not docs:
        raise InvalidInputError(f"no training document of at least {max(2 * window, 64)} tokens; give longer texts")
    n_copy = round(len(docs) * copy_fraction / (1.0 - copy_fraction))
    passage = (max(8, min(128, doc_tokens // 8)), max(16, min(384, doc_tokens // 4)))  # (128, 384) at 3,072 tokens
    docs = docs + copy_documents(docs, n_copy, window=window, rng=rng, passage=passage)
    rng.shuffle(docs)
    return docs


def describe(docs: Sequence[Any]) -> dict[str, int]:
    """Counts for logs: documents and tokens."""
    return {"documents": len(docs), "tokens": int(sum(int(d.numel()) for d in docs))}
