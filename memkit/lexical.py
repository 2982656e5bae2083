"""BM25 over token ids: the lexical ranking a question adds to the embedding rankings (the ``fusion`` stage of :mod:`memkit.retrieval`).

Okapi BM25 (Robertson & Zaragoza, "The Probabilistic Relevance Framework: BM25 and Beyond", 2009) scores each
chunk for a query by the query's terms it contains, each weighted by its inverse document frequency over the
chunks and saturated in its count. Here terms are token ids and pairs of adjacent token ids (no tokenizer,
stemming or stop list: a term that half the chunks or more contain gets idf 0, the Robertson-Sparck Jones weight
floored at 0, so a filler's words and "the" weigh nothing; pairs make a key spelled in common pieces, a uuid's hex
fragments, distinctive where each piece alone is everywhere), documents are memory chunks, and the query is a
question's last tokens, weighted by position: the t tokens weigh 1/t .. t/t (a term's last use counts), because a
question's end is its subject and its start may still be the text before it. Dense retrieval with one sentence
embedding per 128-token chunk dilutes the one rare word (a name, a key, a uuid) a needle shares with its question;
BM25 does not.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["bm25", "token_index"]


def _terms(tokens: Any) -> tuple[np.ndarray, np.ndarray]:
    """Terms of a token sequence (t,): the t token ids, then the t - 1 adjacent pairs coded above every token id
    ((a + 1) << 32 | b, token ids < 2^31); and each term's position (a pair: its second token's)."""
    t = np.asarray(tokens, np.int64).reshape(-1)
    pairs = ((t[:-1] + 1) << 32) | t[1:]
    return np.concatenate([t, pairs]), np.concatenate([np.arange(len(t)), np.arange(1, len(t))])


def token_index(rows: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten m chunks' terms (token ids and adjacent pairs) for :func:`bm25`: (flat (T,) int64 terms, owner (T,)
    int64 chunk row of each term, lens (m,) float64 terms per chunk)."""
    terms = [_terms(r)[0] for r in rows]
    lens = np.asarray([len(x) for x in terms], np.float64)  # (m,)
    flat = np.concatenate(terms) if terms else np.zeros(0, np.int64)  # (T,)
    owner = np.repeat(np.arange(len(rows), dtype=np.int64), lens.astype(np.int64))  # (T,)
    return flat, owner, lens


def bm25(flat: np.ndarray, owner: np.ndarray, lens: np.ndarray, query_tokens: Any, *, k1: float = 1.2,
         b: float = 0.75, recency: bool = True) -> np.ndarray:
    """(m,) float64 BM25 score of each chunk of :func:`token_index` for ``query_tokens`` (t,) token ids."""
    m = len(lens)
    toks = np.asarray(query_tokens, np.int64).reshape(-1)
    if not m or not len(toks):
        return np.zeros(m)
    terms, pos = _terms(toks)
    qt = np.unique(terms)  # (nq,) distinct query terms
    at = np.full(len(qt), -1)
    np.maximum.at(at, np.searchsorted(qt, terms), pos)  # each term's last position in the query
    weight = (at + 1) / len(toks) if recency else np.ones(len(qt))  # (nq,) in (0, 1]
    hit = np.isin(flat, qt)
    if not hit.any():
        return np.zeros(m)
    term = np.searchsorted(qt, flat[hit])
    pair, tf = np.unique(owner[hit] * len(qt) + term, return_counts=True)  # each (chunk, term) present, its count
    row, term = pair // len(qt), pair % len(qt)
    df = np.bincount(term, minlength=len(qt))  # (nq,) chunks holding each term
    idf = np.maximum(np.log((m - df + 0.5) / (df + 0.5)), 0.0)  # Robertson-Sparck Jones, floored at 0
    norm = k1 * (1 - b + b * lens[row] / lens.mean())
    return np.bincount(row, weights=weight[term] * idf[term] * tf * (k1 + 1) / (tf + norm), minlength=m)
