"""One namespace of a :class:`~memkit.memory.MemoryManager`: its bank, its eviction policy and its chunks' metadata.

A namespace (a batch row, a user, a session) owns the retrieval side of its chunks: the embeddings in its own
bank, the policy that picks eviction victims, and per chunk its token span, text, token digest and (when the
writer gave them) its token ids, so a reader can read the chunk afresh (the ``reread`` stage). K/V pages live in
the manager's shared store under the same ids. The retrieval stages (:mod:`memkit.retrieval`) read a namespace
through its small reading API: bank search, scores of given chunks (:meth:`Namespace.scores_of`), BM25 over the
kept token ids (:meth:`Namespace.lexical`, Robertson & Zaragoza 2009), the chunks adjacent in the text
(:meth:`Namespace.adjacent`) and which chunks lie inside a span (:meth:`Namespace.outside`); the manager records
what a retrieval returned (:meth:`Namespace.record`: policy, trace, and the selection's reasons).
Nothing here takes a lock: the manager calls it under its own.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memkit.bank import BaseBank
from memkit.errors import CorruptFileError, InvalidInputError
from memkit.lexical import bm25, token_index
from memkit.policy import EvictionPolicy

__all__ = ["Namespace", "Retrieved", "token_digests", "token_rows"]
TOKENS_FILE = "tokens.safetensors"  # optional: token ids of the chunks that have them (readers before it ignore it)


def _is_digest_list(token_ids: Any) -> bool:
    """True for a list of digests already made (str or None per chunk) in place of (n, C) token ids."""
    return isinstance(token_ids, list) and all(isinstance(d, str) or d is None for d in token_ids)


def token_digests(token_ids: Any, n: int) -> list[str | None]:
    """sha256 of each chunk's token ids (padding -1 dropped); ``token_ids`` (n, C) or n digests already made."""
    if _is_digest_list(token_ids):
        if len(token_ids) != n:
            raise InvalidInputError(f"got {len(token_ids)} token-id digests for {n} chunks")
        return list(token_ids)
    arr = np.asarray(token_ids.cpu() if torch.is_tensor(token_ids) else token_ids)
    if arr.ndim != 2 or arr.shape[0] != n or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise InvalidInputError(f"token_ids must be an (n, chunk) integer array, one row per chunk; got {arr.shape}")
    return [hashlib.sha256(row[row >= 0].astype(np.int64).tobytes()).hexdigest() for row in arr]


def token_rows(token_ids: Any, spans: np.ndarray) -> list[np.ndarray | None]:
    """Each chunk's real token ids (t,) int64 from ``token_ids`` (n, C) with -1 padding; None for a chunk whose row
    does not hold exactly its span's length of tokens (or when only digests were given): such a chunk is never
    re-read from tokens that may not be its own."""
    n = spans.shape[0]
    if token_ids is None or _is_digest_list(token_ids):
        return [None] * n
    arr = np.asarray(token_ids.cpu() if torch.is_tensor(token_ids) else token_ids)
    out: list[np.ndarray | None] = []
    for row, (a, b) in zip(arr.reshape(n, -1), spans.tolist()):
        real = row[row >= 0].astype(np.int64)
        out.append(real if real.shape[0] == b - a else None)
    return out


@dataclass
class Retrieved:
    """Chunks returned by one retrieval, in time order (span start ascending); k' <= k rows.

    ``ids``/``scores``/``spans`` are CPU tensors; ``keys``/``values`` are on the requested device in the
    requested dtype (views into one page tensor, not contiguous). A span shorter than C is a partial chunk: only
    its first ``end - start`` tokens are real.
    """

    ids: torch.Tensor  # (k',) int64
    scores: torch.Tensor  # (k',) float32, higher = closer
    spans: torch.Tensor  # (k', 2) int64 token [start, end) in the input
    keys: torch.Tensor  # (k', L, H, C, D)
    values: torch.Tensor  # (k', L, H, C, D)
    namespace: str = "default"
    texts: list[str | None] = field(default_factory=list)
    token_ids: list[np.ndarray | None] = field(default_factory=list)  # per chunk (end - start,) int64, or None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


class Namespace:
    """A namespace's bank, policy and chunk metadata; see the module docstring."""

    def __init__(self, name: str, bank: BaseBank, policy: EvictionPolicy) -> None:
        self.name, self.bank, self.policy = name, bank, policy
        self.spans: dict[int, tuple[int, int]] = {}  # id -> (start, end), insertion order
        self.texts: dict[int, str | None] = {}
        self.token_ids: dict[int, np.ndarray] = {}  # id -> (end - start,) int64 tokens, for chunks that have them
        self.digests: dict[str, int] = {}  # sha256 of a chunk's token ids -> its id: the same text is stored once
        self.tokens = 0
        self.trace: list[dict[str, Any]] = []
        self.selection: dict[str, Any] = {}  # how the last retrieval chose its chunks (the select stage's reasons)
        self._edges: tuple[dict[int, int], dict[int, int]] | None = None  # start -> id, end -> id (built lazily)
        self._lex: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None  # lexical index (lazily)

    # ------------------------------------------------------------------ writing
    def known(self, digests: list[str | None]) -> list[int | None]:
        """The id already stored for each digest (None: new, or no digest given)."""
        return [self.digests.get(d) if d is not None else None for d in digests]

    def add(self, ids: np.ndarray, embeddings: np.ndarray, spans: np.ndarray, texts: list[str | None] | None,
            digests: list[str | None], tokens: list[np.ndarray | None] | None = None) -> None:
        """Index (n,) new ids: embeddings (n, E) in the bank, spans (n, 2), texts, digests and token ids (each
        (end - start,) or None), then the policy."""
        self.bank.add(embeddings, ids=ids)
        for j, cid in enumerate(ids.tolist()):
            self.spans[cid] = (int(spans[j, 0]), int(spans[j, 1]))
            self.texts[cid] = texts[j] if texts is not None else None
            row = tokens[j] if tokens is not None else None
            if row is not None:
                self.token_ids[cid] = row
            digest = digests[j]
            if digest is not None:
                self.digests[digest] = cid
        self.tokens += int((spans[:, 1] - spans[:, 0]).sum())
        self._edges = None
        self._lex = None
        self.policy.on_add(ids)

    def victims(self, capacity: int | None, chunk_size: int) -> list[int]:
        """Chunks to evict so the namespace holds at most ``capacity`` tokens (the policy chooses)."""
        if capacity is None or self.tokens <= capacity or not len(self.policy):
            return []
        need = self.tokens - capacity
        out, freed = [], 0
        for cid in self.policy.evict(max(1, math.ceil(need / chunk_size))).tolist():
            out.append(cid)
            freed += self.spans[cid][1] - self.spans[cid][0]
            if freed >= need:
                break
        return out

    def drop(self, ids: list[int]) -> None:
        """Forget ``ids`` in the bank, the policy and the metadata (the caller removes their pages)."""
        if not ids:
            return
        arr = np.asarray(ids, np.int64)
        self.bank.remove(arr)
        self.policy.on_remove(arr)
        gone = set(ids)
        self._edges = None
        self._lex = None
        for cid in ids:
            s, e = self.spans.pop(cid)
            self.texts.pop(cid, None)
            self.token_ids.pop(cid, None)
            self.tokens -= e - s
        for d in [d for d, cid in self.digests.items() if cid in gone]:
            del self.digests[d]

    # ------------------------------------------------------------------ reading (for the retrieval stages)
    def inside(self, cid: int, span: tuple[int, int]) -> bool:
        """Chunk ``cid`` lies inside the stream positions [lo, hi)."""
        start, end = self.spans[cid]
        return start >= span[0] and end <= span[1]

    def outside(self, ids: np.ndarray, exclude: tuple[int, int] | None) -> np.ndarray:
        """(n,) bool: which of ``ids`` (n,) are not stored chunks inside ``exclude`` [lo, hi); padding (-1) counts
        as outside (callers drop it themselves)."""
        if exclude is None:
            return np.ones(len(ids), bool)
        return np.asarray([c < 0 or not self.inside(int(c), exclude) for c in ids], bool).reshape(len(ids))

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """(n, E) retrieval embeddings of stored chunks ``ids`` (n,), as the bank holds them."""
        return np.asarray(self.bank.get(np.asarray(ids, np.int64)), np.float32)

    def _by_edges(self) -> tuple[dict[int, int], dict[int, int]]:
        """(start -> id, end -> id) of the stored chunks, built once after each change."""
        if self._edges is None:
            self._edges = ({a: c for c, (a, _) in self.spans.items()}, {b: c for c, (_, b) in self.spans.items()})
        return self._edges

    def adjacent(self, of: Any, chosen: list[int], room: int, exclude: tuple[int, int] | None,
                 whole: int | None = None) -> list[int]:
        """Up to ``room`` chunks adjacent in the text to the chunks ``of`` (best first), not in ``chosen`` and not
        inside ``exclude``: for each, the chunk ending where it starts, then the one starting where it ends. With
        ``whole`` (the chunk size), a partial chunk (shorter than ``whole``) ends a call's text: the chunk after it
        begins another call's (another chat turn), so no neighbour is taken across it."""
        by_start, by_end = self._by_edges()

        def partial(cid: int) -> bool:
            a, b = self.spans[cid]
            return whole is not None and b - a < whole

        def around(c: int) -> tuple[int | None, int | None]:
            a, b = self.spans[c]
            before, after = by_end.get(a), by_start.get(b)
            return (None if before is not None and partial(before) else before), (None if partial(c) else after)

        extra: list[int] = []
        for nb in (nb for c in of for nb in around(int(c))):
            if len(extra) >= room:
                break
            if nb is None or nb in chosen or nb in extra or (exclude is not None and self.inside(nb, exclude)):
                continue
            extra.append(nb)
        return extra

    def lexical(self, query_tokens: np.ndarray, n: int, *, k1: float = 1.2, b: float = 0.75, recency: bool = True
                ) -> tuple[np.ndarray, np.ndarray, float, Callable[[np.ndarray], np.ndarray]]:
        """BM25 of the chunks that have token ids for ``query_tokens`` (:func:`memkit.lexical.bm25`): up to ``n``
        (ids, scores), best first, chunks sharing no weighted token with the query left out; the median score over
        all chunks with token ids; and a function giving the score of any stored ids (0 for chunks without ids)."""
        if self._lex is None:
            cids = np.asarray([c for c in self.spans if c in self.token_ids], np.int64)  # (m,)
            self._lex = (cids, *token_index([self.token_ids[int(c)] for c in cids]))
        cids, flat, owner, lens = self._lex
        score = bm25(flat, owner, lens, query_tokens, k1=k1, b=b, recency=recency)  # (m,)
        at = {int(c): float(v) for c, v in zip(cids.tolist(), score.tolist())}

        def of(ids: np.ndarray) -> np.ndarray:
            return np.asarray([at.get(int(c), 0.0) for c in ids], np.float64)

        if not len(score) or n <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), 0.0, of
        top = np.flatnonzero(score > 0)
        top = top[np.argsort(-score[top], kind="stable")][:n]
        return cids[top], score[top].astype(np.float32), float(np.median(score)), of

    def scores_of(self, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The bank's score ("higher = closer") of stored chunks ``ids`` (n,) for ``query`` (E,)."""
        vecs = self.bank.get(ids)  # (n, E), normalised for cosine
        q = np.asarray(query, np.float32).reshape(-1, vecs.shape[1])  # (Q, E)
        if self.bank.metric == "l2":
            return (-((vecs[None] - q[:, None]) ** 2).sum(2)).max(0)  # type: ignore[no-any-return]
        if self.bank.metric == "cosine":
            q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        return (q @ vecs.T).max(0)  # type: ignore[no-any-return]

    def record(self, ids: np.ndarray, scores: np.ndarray, why: dict[int, str] | None = None,
               selection: dict[str, Any] | None = None) -> None:
        """A retrieval returned ``ids`` (time order) with ``scores``: tell the policy, keep the trace (each chunk with
        why it was chosen, when given) and the selection's reasons."""
        self.policy.on_retrieve(ids)
        rank = {int(c): t for t, c in enumerate(ids[np.argsort(-scores, kind="stable")])}
        self.trace = [{"id": int(c), "score": float(s), "span": list(self.spans[int(c)]),
                       "text": self.texts.get(int(c)), "rank": rank[int(c)],
                       **({"why": why.get(int(c), "rank")} if why is not None else {})} for c, s in zip(ids, scores)]
        self.selection = dict(selection or {})

    def record_hits(self, uniq: np.ndarray, hits: np.ndarray, best: np.ndarray, trace_max: int) -> None:
        """A many-query search chose the distinct chunks ``uniq`` ``hits`` times: the policy sees each once, the
        trace lists the ``trace_max`` most chosen (with their best score), in time order."""
        self.policy.on_retrieve(uniq)
        order = np.argsort(-hits, kind="stable")[:trace_max].tolist()
        rank = {j: t for t, j in enumerate(order)}
        self.trace = [{"id": int(uniq[j]), "score": float(best[j]) if np.isfinite(best[j]) else None,
                       "hits": int(hits[j]), "span": list(self.spans[int(uniq[j])]),
                       "text": self.texts.get(int(uniq[j])), "rank": rank[j]}
                      for j in sorted(order, key=lambda j: int(uniq[j]))]

    def tokens_of(self, start: int, end: int) -> np.ndarray | None:
        """Token ids [start, end) of the stream when one stored chunk with token ids covers them, else None."""
        cid = self._by_edges()[0].get(start)
        row = self.token_ids.get(cid) if cid is not None else None
        if row is None or self.spans[cid][1] < end:  # type: ignore[index]
            return None
        return row[:end - start]

    # ------------------------------------------------------------------ persistence
    def save(self, directory: Path) -> None:
        """bank/, meta.safetensors (ids, spans), meta.json (name, texts, digests, policy, trace) and, when chunks
        have them, tokens.safetensors (token ids, offsets per id in meta's order; length 0 = none) into
        ``directory``."""
        from safetensors.numpy import save_file

        self.bank.save(directory / "bank")
        ids = np.asarray(list(self.spans), np.int64)
        spans = np.asarray([self.spans[i] for i in ids.tolist()], np.int64).reshape(-1, 2)
        save_file({"ids": ids, "spans": spans}, str(directory / "meta.safetensors"))
        if self.token_ids:
            rows = [self.token_ids.get(i, np.zeros(0, np.int64)) for i in ids.tolist()]
            offsets = np.zeros(len(rows) + 1, np.int64)
            offsets[1:] = np.cumsum([r.shape[0] for r in rows])
            flat = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
            save_file({"token_ids": flat, "offsets": offsets}, str(directory / TOKENS_FILE))
        by_id = {cid: dg for dg, cid in self.digests.items()}
        (directory / "meta.json").write_text(json.dumps({
            "name": self.name, "texts": [self.texts.get(i) for i in ids.tolist()],
            "digests": [by_id.get(i) for i in ids.tolist()], "policy": self.policy.state_dict(),
            "trace": self.trace, "tokens": self.tokens}))

    @classmethod
    def load(cls, directory: Path, name: str, bank: BaseBank, policy: EvictionPolicy) -> Namespace:
        """Rebuild from :meth:`save`'s files (already checksummed); ``bank`` is the loaded bank, ``policy`` a fresh
        one of the reader's config (the saved state is replayed into it when it is the same policy)."""
        from safetensors.numpy import load_file

        from memkit.policy import RecencyFrequencyPolicy

        meta = json.loads((directory / "meta.json").read_text())
        arrays = load_file(str(directory / "meta.safetensors"))
        if set(arrays) != {"ids", "spans"} or any(a.dtype != np.int64 for a in arrays.values()):
            raise CorruptFileError(f"{directory}/meta.safetensors must hold int64 'ids' and 'spans' only")
        ids, spans = arrays["ids"].reshape(-1), arrays["spans"]
        texts = meta["texts"]
        if spans.shape != (len(ids), 2) or len(texts) != len(ids) or meta["name"] != name:
            raise CorruptFileError(f"{directory}: ids, spans and texts disagree")
        if bank.dim <= 0 or len(bank) != len(ids) or not all(int(i) in bank for i in ids):
            raise CorruptFileError(f"{directory}: bank does not hold exactly this namespace's chunks")
        if len(np.unique(ids)) != len(ids):
            raise CorruptFileError(f"{directory}: chunk ids repeat")
        if meta["policy"].get("name") == policy.name:
            protect = getattr(policy, "protect_recent", None)
            policy.load_state_dict(meta["policy"])
            if isinstance(policy, RecencyFrequencyPolicy) and protect is not None:  # the reader's setting wins
                policy.protect_recent = float(protect)
            if set(policy.ids().tolist()) != set(ids.tolist()):
                raise CorruptFileError(f"{directory}: the policy tracks other chunks than the namespace holds")
        else:  # another policy was saved: replay the insertion order into this config's policy
            policy.on_add(ids)
        ns = cls(name, bank, policy)
        ns.spans = {int(i): (int(s), int(e)) for i, (s, e) in zip(ids, spans)}
        ns.texts = {int(i): t for i, t in zip(ids, texts)}
        digests = meta.get("digests") or [None] * len(ids)
        if len(digests) != len(ids) or not all(dg is None or (isinstance(dg, str) and len(dg) == 64)
                                               for dg in digests):
            raise CorruptFileError(f"{directory}/meta.json: digests do not match the chunks")
        ns.digests = {dg: int(i) for i, dg in zip(ids, digests) if dg is not None}
        ns.tokens = int((spans[:, 1] - spans[:, 0]).sum()) if len(ids) else 0
        ns.trace = list(meta.get("trace") or [])
        if (directory / TOKENS_FILE).is_file():
            tok = load_file(str(directory / TOKENS_FILE))
            flat, offsets = tok.get("token_ids"), tok.get("offsets")
            if (set(tok) != {"token_ids", "offsets"} or flat is None or offsets is None
                    or flat.dtype != np.int64 or offsets.dtype != np.int64 or offsets.shape != (len(ids) + 1,)
                    or offsets[0] != 0 or offsets[-1] != flat.shape[0] or (np.diff(offsets) < 0).any()):
                raise CorruptFileError(f"{directory}/{TOKENS_FILE} does not match the namespace's chunks")
            for j, cid in enumerate(ids.tolist()):
                a, b = int(offsets[j]), int(offsets[j + 1])
                if b == a:
                    continue
                if b - a != spans[j, 1] - spans[j, 0]:
                    raise CorruptFileError(f"{directory}/{TOKENS_FILE}: chunk {cid} has {b - a} token ids for a span "
                                           f"of {spans[j, 1] - spans[j, 0]}")
                ns.token_ids[int(cid)] = flat[a:b].copy()
        return ns
