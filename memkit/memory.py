"""MemoryManager: chunk-level long-term memory = a MemoryBank per namespace + one shared KVStore + a policy.

This is the memory of MemLong (Liu et al. 2024, "MemLong: Memory-Augmented Retrieval for Long Text
Modeling"): K/V of past text are kept per chunk; each chunk's retrieval embedding goes to a vector bank
and its K/V pages to the tiered :class:`~memkit.kvstore.KVStore` under the same globally unique id;
before a block runs, the top-k chunks are retrieved and returned **in time order** (by span start) for
the retrieval attention. A candidate whose retrieval embedding is a near-duplicate (cosine >=
``max_chunk_similarity``) of a better-scoring chosen chunk gives its slot to the next candidate, so
repeated text fills one slot (a hard-threshold form of maximal marginal relevance, Carbonell & Goldstein 1998).
Slots left free then take the chunks adjacent to the chosen ones (``fill_neighbors``), so text split at a
chunk boundary is read whole (the neighbouring-chunk expansion of retrieval-augmented readers).
When a namespace holds more than ``capacity_tokens`` tokens, its eviction
policy (:mod:`memkit.policy`; MemLong's recency+frequency update by default) picks chunks to drop from
bank, store and policy together. The K/V paging follows InfLLM (Xiao et al. 2024).

Namespaces isolate batch rows / sessions: each has its own bank, policy and metadata
(:class:`~memkit.namespace.Namespace`), so a query in one namespace can never return another's chunk; pages
share one store (one set of byte budgets). ``capacity_tokens`` applies per namespace. A chunk whose token ids
equal one already stored in the namespace is stored once. A short span (end - start < C) is a partial chunk
(the end of a call): its pages are zero-padded and readers attend only its real tokens.

Shapes: pages are ``(L, 2, H, C, D)`` = (stored layers, key/value, kv heads, chunk_size, head_dim).

Saved layout (``save(dir)``; loading never executes code — JSON, safetensors and the bank's native
index only; every file is checksummed in ``manifest.json``)::

    manifest.json          format, version, config, dims, owner, next id, namespaces, file checksums, seal
    pages/                 KVStore.save: safetensors shards + kvstore.json
    ns-00000/bank/         bank.save (native index + its own manifest)
    ns-00000/meta.safetensors   ids (n,) int64, spans (n, 2) int64
    ns-00000/meta.json     name, texts, token digests, policy state, last trace
    ns-00000/tokens.safetensors  token ids (t,) int64 + offsets (n + 1,) int64 (chunks stored with their ids)
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memkit._arrays import as_vectors, check_k
from memkit.bank import check_bank_config, create_bank, load_bank
from memkit.config import BankConfig, MemoryConfig
from memkit.configbase import is_cosine_setting
from memkit.errors import (
    ConfigError,
    CorruptFileError,
    DimensionMismatchError,
    IncompatibleMemoryError,
    InvalidInputError,
    MemkitError,
)
from memkit.files import atomic_save, file_digests, read_versioned_json, save_path, verify_files, write_json
from memkit.kvstore import KVStore
from memkit.namespace import Namespace, Retrieved, token_digests, token_rows
from memkit.policy import EvictionPolicy, make_policy
from memkit.retrieval import Pipeline, Reader, Row, RowRequest, StepContext
from memkit.retrieval.stages.candidates import CandidatesConfig
from memkit.retrieval.stages.dedup import DedupConfig
from memkit.retrieval.stages.fusion import FusionConfig
from memkit.retrieval.stages.select import SelectConfig
from memkit.retrievers import RETRIEVERS, make_retriever, retriever_input

__all__ = ["MemoryManager", "Retrieved"]

FORMAT, FORMAT_VERSION = "memkit-memory", 2  # 2: sealed manifest, owner record
MANIFEST = "manifest.json"


class _ClassOrInstance:
    """``MemoryManager.load(dir)`` builds a new manager; ``mm.load(dir)`` loads in place."""

    def __init__(self, on_class: Any, on_instance: Any) -> None:
        self.on_class, self.on_instance = on_class, on_instance

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return types.MethodType(self.on_class, objtype)
        return types.MethodType(self.on_instance, obj)


class MemoryManager:
    """Chunk memory with namespaces; see the module docstring. Thread-safe."""

    def __init__(self, config: MemoryConfig | None = None, *, num_layers: int, kv_heads: int, head_dim: int,
                 embed_dim: int, device: str | torch.device = "cpu", retriever: Any = None) -> None:
        self.config = config if config is not None else MemoryConfig()
        if not isinstance(self.config, MemoryConfig):
            raise ConfigError(f"MemoryManager needs a MemoryConfig, got {type(self.config).__name__}")
        for name, v in (("num_layers", num_layers), ("kv_heads", kv_heads), ("head_dim", head_dim),
                        ("embed_dim", embed_dim)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ConfigError(f"MemoryManager {name} must be a positive integer, got {v!r}")
        self.num_layers, self.kv_heads, self.head_dim = int(num_layers), int(kv_heads), int(head_dim)
        self.embed_dim = int(embed_dim)
        if self.config.bank.dim is not None and self.config.bank.dim != self.embed_dim:
            raise ConfigError(f"config.bank.dim={self.config.bank.dim} differs from embed_dim={self.embed_dim}; "
                              "leave bank.dim None or set it to the retriever's dimension")
        self.chunk_size = self.config.chunk_size
        self.page_shape = (self.num_layers, 2, self.kv_heads, self.chunk_size, self.head_dim)  # (L, 2, H, C, D)
        self.device = torch.device(self.config.kvstore.device or device)
        self.retriever = retriever
        self.store = KVStore(self.config.kvstore, page_shape=self.page_shape, device=self.device)
        self._ns: dict[str, Namespace] = {}
        self._next_id = 0
        self._bank_serial = 0  # makes per-namespace bank paths/collections unique
        self._lock = threading.RLock()
        self._counters = {"added": 0, "evicted": 0, "retrievals": 0}
        self._timers: list[Callable[[str, float], None]] = []
        self._pipelines: dict[str, Pipeline] = {}  # step -> its pipeline, built from config.retrieval on first use
        check_bank_config(self._bank_config("__check__"), self.embed_dim)  # a bad backend fails now, not at a store

    # ------------------------------------------------------------------ timing hook
    def add_timer(self, callback: Callable[[str, float], None]) -> Callable[[], None]:
        """Call ``callback(event, seconds)`` after every ``"search"`` (retrieve_batch, search_many: bank search and
        page fetch) and ``"embed"`` (retriever); returns the function that removes it. Benchmarks time memory
        through this hook."""
        if not callable(callback):
            raise InvalidInputError(f"add_timer needs a callable(event, seconds), got {callback!r}")
        self._timers.append(callback)
        return lambda: self._timers.remove(callback) if callback in self._timers else None

    @contextlib.contextmanager
    def _timed(self, event: str) -> Iterator[None]:
        if not self._timers:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            for cb in list(self._timers):
                cb(event, dt)

    # ------------------------------------------------------------------ namespaces
    def _bank_config(self, name: str) -> BankConfig:
        params = dict(self.config.bank.params)
        self._bank_serial += 1
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64] + f"-{self._bank_serial}"
        if isinstance(params.get("path"), str) and params["path"] != ":memory:":
            params["path"] = os.path.join(params["path"], f"ns-{safe}")  # one directory per namespace
        if isinstance(params.get("collection"), str):
            params["collection"] = f"{params['collection']}-{safe}"  # one collection per namespace
        return BankConfig(backend=self.config.bank.backend, dim=self.embed_dim, metric=self.config.bank.metric,
                          params=params)

    def _policy(self) -> EvictionPolicy:
        kw = {"protect_recent": self.config.protect_recent} if self.config.policy == "recency_frequency" else {}
        return make_policy(self.config.policy, **kw)

    def _namespace(self, name: str, create: bool) -> Namespace | None:
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"namespace must be a non-empty string, got {name!r}")
        ns = self._ns.get(name)
        if ns is None and create:
            ns = Namespace(name, create_bank(self._bank_config(name)), self._policy())
            self._ns[name] = ns
        return ns

    def namespaces(self) -> list[str]:
        with self._lock:
            return list(self._ns)

    # ------------------------------------------------------------------ writing
    def _check_kv(self, x: Any, name: str) -> torch.Tensor:
        if not torch.is_tensor(x):
            try:
                x = torch.as_tensor(np.asarray(x))
            except Exception as exc:
                raise InvalidInputError(f"{name} must be a tensor of shape (n, L, H, C, D) ({exc})") from exc
        want = (self.num_layers, self.kv_heads, self.chunk_size, self.head_dim)
        if x.ndim != 5 or tuple(x.shape[1:]) != want:
            raise DimensionMismatchError(
                f"{name} have shape {tuple(x.shape)}, expected (n, L={want[0]}, H={want[1]}, C={want[2]}, "
                f"D={want[3]}); pad the last partial chunk to chunk_size or keep it in the local window"
            )
        if not x.is_floating_point():
            raise InvalidInputError(f"{name} must be floating point, got {x.dtype}")
        return x

    def add_chunks(self, keys: Any, values: Any, embeddings: Any, spans: Any, *, namespace: str = "default",
                   texts: Sequence[str | None] | None = None, token_ids: Any = None) -> torch.Tensor:
        """Store n chunks; returns their (n,) int64 ids. Then enforces capacity_tokens with the policy.

        keys/values: (n, L, H, C, D); embeddings: (n, embed_dim); spans: (n, 2) token [start, end) with
        end - start <= C (a shorter span is a partial chunk whose pages are padded). ``token_ids`` (n, C), -1 for
        padding: a chunk whose tokens equal a chunk already stored in the namespace is not stored again (its
        existing id is returned), so text sent twice does not double memory; the ids are kept with the chunk (a
        row whose real tokens are not its span's length is not kept) and come back in :class:`Retrieved`, so the
        chunk can be read afresh. Chunks evicted by this call's capacity check (possibly some of these) are gone
        from memory.
        """
        keys, values = self._check_kv(keys, "keys"), self._check_kv(values, "values")
        n = keys.shape[0]
        if values.shape[0] != n:
            raise InvalidInputError(f"got {n} key chunks but {values.shape[0]} value chunks")
        emb = as_vectors(embeddings, self.embed_dim, name="embeddings")
        if emb.shape[0] != n:
            raise InvalidInputError(f"got {emb.shape[0]} embeddings for {n} chunks; pass one per chunk")
        sp = np.asarray(spans.cpu() if torch.is_tensor(spans) else spans)
        if sp.shape != (n, 2) or (n and not np.issubdtype(sp.dtype, np.integer)):
            raise InvalidInputError(f"spans must be an (n, 2) integer array of token [start, end), got "
                                    f"shape {sp.shape} dtype {sp.dtype}")
        sp = sp.astype(np.int64)
        if n and ((sp[:, 0] < 0).any() or (sp[:, 1] <= sp[:, 0]).any()):
            raise InvalidInputError("spans need 0 <= start < end for every chunk")
        if n and (sp[:, 1] - sp[:, 0] > self.chunk_size).any():
            raise InvalidInputError(f"a chunk span covers at most chunk_size={self.chunk_size} tokens")
        digests: list[str | None] = token_digests(token_ids, n) if token_ids is not None else [None] * n
        rows = token_rows(token_ids, sp)  # (end - start,) per chunk, or None
        if texts is not None:
            texts = list(texts)
            if len(texts) != n or not all(t is None or isinstance(t, str) for t in texts):
                raise InvalidInputError(f"texts must be a list of {n} strings (or None), one per chunk")
        with self._lock:
            ns = self._namespace(namespace, create=True)
            assert ns is not None
            known = ns.known(digests)
            fresh = [j for j in range(n) if known[j] is None and (digests[j] is None or digests[j] not in digests[:j])]
            out = np.asarray([-1 if c is None else c for c in known], np.int64)  # (n,) ids already stored
            if len(fresh) < n:  # some chunks are stored already: store the rest, report the existing ids
                sel = torch.as_tensor(fresh, dtype=torch.long)
                keys, values, emb, sp = keys[sel], values[sel], emb[fresh], sp[fresh]
                texts = [texts[j] for j in fresh] if texts is not None else None
                new_digests, rows = [digests[j] for j in fresh], [rows[j] for j in fresh]
            else:
                new_digests = digests
            m = len(fresh)
            ids = np.arange(self._next_id, self._next_id + m, dtype=np.int64)
            if m:
                self.store.put(ids, torch.stack([keys, values], dim=2))  # (m, L, 2, H, C, D); CapacityError changes nothing
                try:
                    ns.add(ids, emb, sp, texts, new_digests, rows)
                except BaseException:
                    self.store.remove(ids)
                    raise
                self._next_id += m
                self._counters["added"] += m
                victims = ns.victims(self.config.capacity_tokens, self.chunk_size)
                self._drop(ns, victims)
                self._counters["evicted"] += len(victims)
            if m == n:
                return torch.from_numpy(ids)
            out[fresh] = ids
            return torch.from_numpy(np.asarray([out[j] if out[j] >= 0 else ns.digests[digests[j]]  # type: ignore[index]
                                                for j in range(n)], np.int64))

    def _drop(self, ns: Namespace, ids: list[int]) -> None:
        if ids:
            ns.drop(ids)
            self.store.remove(np.asarray(ids, np.int64))

    def remove_chunks(self, ids: Any, *, namespace: str = "default") -> int:
        """Remove chunks of a namespace by id (ids of other namespaces are ignored). Returns the count."""
        arr = np.asarray(ids.cpu() if torch.is_tensor(ids) else ids, dtype=np.int64).reshape(-1)
        with self._lock:
            ns = self._namespace(namespace, create=False)
            if ns is None:
                return 0
            mine = [int(i) for i in dict.fromkeys(arr.tolist()) if int(i) in ns.spans]
            self._drop(ns, mine)
            return len(mine)

    # ------------------------------------------------------------------ reading
    def _empty(self, namespace: str, device: torch.device, dtype: torch.dtype) -> Retrieved:
        kv = torch.empty((0, self.num_layers, self.kv_heads, self.chunk_size, self.head_dim), dtype=dtype,
                         device=device)
        return Retrieved(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float32),
                         torch.empty((0, 2), dtype=torch.int64), kv, kv.clone(), namespace, [])

    def retrieve(self, query: Any, k: int | None = None, *, namespace: str = "default",
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 max_similarity: float | str | None = "config") -> Retrieved:
        """Top-k chunks of ``namespace`` for one query (embed_dim,) or (1, embed_dim), in time order."""
        q = query.detach().cpu() if torch.is_tensor(query) else np.asarray(query)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[0] != 1:
            raise InvalidInputError(f"retrieve takes one query of shape (embed_dim,) or (1, embed_dim), got "
                                    f"{tuple(q.shape)}; use retrieve_batch for several")
        return self.retrieve_batch(q, [namespace], k, device=device, dtype=dtype, max_similarity=max_similarity)[0]

    def retrieve_batch(self, queries: Any, namespaces: Sequence[str], k: int | None = None,
                       device: str | torch.device | None = None, *, dtype: torch.dtype = torch.float32,
                       max_similarity: float | str | None = "config",
                       exclude: Sequence[tuple[int, int] | None] | None = None,
                       lexical: Sequence[Any] | None = None) -> list[Retrieved]:
        """One retrieval per row: queries (B, embed_dim), namespaces (B,) -> B Retrieved, each in time order.

        The block step's pipeline (:mod:`memkit.retrieval`: candidates, near-duplicate skip, the first k, neighbours
        filling free slots) run on the caller's queries. Queries (B, Q, embed_dim) give each row Q queries whose
        candidate rankings are fused by reciprocal rank (the question step's ``fusion`` stage); ``lexical`` (per row
        token ids (t,) or None) adds a BM25 ranking of those tokens against the token ids kept with each chunk. A fused
        row also brings the neighbours of its best chunk as the question step does. The scores returned are each
        chunk's best embedding score.

        Rows of the same namespace are searched in one batched bank call; pages are fetched once for all.
        ``max_similarity`` ("config" = the config's ``dedup`` setting; None turns it off): a candidate whose
        retrieval embedding has cosine >= this with a better-scoring chunk already chosen is skipped and the
        next candidate takes its slot. ``exclude`` (one token range [lo, hi) or None per row): chunks whose span
        lies inside it are skipped (the caller attends them anyway), and the next candidates take their slots. The
        policy and the trace see exactly the chunks returned.
        """
        k = check_k(self.config.top_k if k is None else k)
        if max_similarity != "config" and not is_cosine_setting(max_similarity):
            raise InvalidInputError(f"max_similarity must be a cosine in (-1, 1], 'auto', 'config' or None, "
                                    f"got {max_similarity!r}")
        stacked = getattr(queries, "ndim", 2) == 3  # (B, Q, E) array or tensor: Q queries per row, rankings fused
        Q = int(queries.shape[1]) if stacked else 1
        if Q < 1:
            raise InvalidInputError("queries of shape (B, Q, embed_dim) need Q >= 1 query per row")
        q = as_vectors(queries.reshape(-1, queries.shape[-1]) if stacked else queries, self.embed_dim,
                       name="queries").reshape(-1, Q, self.embed_dim)  # (B, Q, E); as_vectors validates values
        names = list(namespaces) if not isinstance(namespaces, str) else [namespaces]
        ex = list(exclude) if exclude is not None else [None] * len(names)
        lex = [None if w is None else _token_query(w) for w in lexical] if lexical is not None else [None] * len(names)
        if len(names) != q.shape[0] or len(ex) != len(names) or len(lex) != len(names):
            raise InvalidInputError(f"got {q.shape[0]} queries, {len(names)} namespaces, {len(ex)} exclusions and "
                                    f"{len(lex)} lexical queries; pass one of each per row")
        for name in names:
            _name(name)
        fused = Q > 1 or any(w is not None for w in lex)
        requests = [RowRequest(namespace=n, exclude=e, queries=q[b], words=lex[b]) for b, (n, e) in
                    enumerate(zip(names, ex))]
        out = self._run(self._direct_pipeline(fused, max_similarity), requests, k, device=device, dtype=dtype)
        return [r.result for r in out]  # type: ignore[misc]

    def _direct_pipeline(self, fused: bool, max_similarity: float | str | None) -> Pipeline:
        """retrieve_batch's pipeline: the block step's stages (with the question step's fusion and neighbours for
        fused rows), a fixed selection, and the caller's near-duplicate threshold."""
        cfg = self.config.retrieval
        step = "question" if fused else "block"
        stages: dict[str, Any] = {name: cfg.stage("block", name) for name in ("candidates", "dedup", "neighbours")}
        stages["select"] = SelectConfig()
        if fused:
            stages["fusion"] = cfg.stage("question", "fusion") or FusionConfig(lexical_tokens=0)
            stages["neighbours"] = cfg.stage("question", "neighbours")
        stages["candidates"] = stages["candidates"] or CandidatesConfig()
        if max_similarity != "config":
            base = stages["dedup"] or DedupConfig()
            stages["dedup"] = DedupConfig(max_similarity=max_similarity, auto_text=base.auto_text)
        return Pipeline.build(step, stages)

    def pipeline(self, step: str) -> Pipeline:
        """The pipeline of ``step`` ("block" or "question") built from ``config.retrieval`` (built once)."""
        got = self._pipelines.get(step)
        if got is None:
            got = self._pipelines[step] = Pipeline.build(step, self.config.retrieval.stages(step))
        return got

    def retrieve_step(self, requests: Sequence[RowRequest], step: str, *, device: str | torch.device | None = None,
                      dtype: torch.dtype = torch.float32, reader: Reader | None = None,
                      decode: Callable[[list[int]], str] | None = None) -> list[Row]:
        """One step's retrieval for its rows: the step's pipeline (``config.retrieval``) runs its query stages, then
        its rank stages under this manager's lock, the chosen chunks' pages are fetched and the trace recorded, then
        its read stages (``reader``: the model's probe reads; ``decode``: token ids -> text for text queries). Each
        returned :class:`~memkit.retrieval.Row` holds ``result`` (a :class:`Retrieved`, empty when nothing was
        found) and, when the ``reread`` stage ran, ``reread``."""
        for r in requests:
            if not isinstance(r, RowRequest):
                raise InvalidInputError(f"retrieve_step takes memkit.retrieval.RowRequest objects, got {type(r).__name__}")
            _name(r.namespace)
        return self._run(self.pipeline(step), list(requests), self.config.top_k, device=device, dtype=dtype,
                         reader=reader, decode=decode)

    def _run(self, pipe: Pipeline, requests: list[RowRequest], k: int, *, device: str | torch.device | None,
             dtype: torch.dtype, reader: Reader | None = None,
             decode: Callable[[list[int]], str] | None = None) -> list[Row]:
        ctx = StepContext(manager=self, step=pipe.step, k=k, chunk_size=self.chunk_size,
                          sink_tokens=self.config.sink_tokens, retriever_input=self.retriever_input(),
                          decode=decode, reader=reader)
        rows = [Row(r, queries=None if r.queries is None else np.asarray(r.queries, np.float32).reshape(
            -1, self.embed_dim)) for r in requests]  # (Q, E) when the caller gave them
        target = torch.device(device) if device is not None else self.device
        pipe.run("query", rows, ctx)  # embeddings time themselves ("embed")
        with self._timed("search"):
            with self._lock:
                for r in rows:
                    ns = self._ns.get(r.request.namespace)
                    r.ns = ns if ns is not None and ns.spans else None
                pipe.run("rank", rows, ctx)
                self._materialise(rows, target, dtype)
        pipe.run("read", rows, ctx)
        return rows

    def _materialise(self, rows: list[Row], device: torch.device, dtype: torch.dtype) -> None:
        """Under the lock: each row's chosen chunks in time order with their pages (fetched once for all rows);
        the namespace records them (policy, trace, selection)."""
        wanted = list(dict.fromkeys(c for r in rows if r.ns is not None for c in r.chosen))
        pages = self.store.get(wanted, device, dtype=dtype) if wanted else None  # (u, L, 2, H, C, D)
        pos = {c: j for j, c in enumerate(wanted)}
        for r in rows:
            name, ns = r.request.namespace, r.ns
            if ns is None or not r.chosen:
                r.result = self._empty(name, device, dtype)
                if name in self._ns:
                    self._ns[name].trace, self._ns[name].selection = [], dict(r.selection)
                continue
            assert pages is not None and r.queries is not None
            chosen = sorted(r.chosen, key=lambda c: (ns.spans[c][0], c))  # time order
            missing = [c for c in chosen if c not in r.known]
            if missing:  # neighbours outside the candidates: scored as the bank scores them
                r.known.update(zip(missing, ns.scores_of(r.queries, np.asarray(missing, np.int64)).tolist()))
            ids_b = np.asarray(chosen, np.int64)
            scores_b = np.asarray([r.known[c] for c in chosen], np.float32)
            sel = pages[torch.as_tensor([pos[c] for c in chosen], device=pages.device)]  # (k', L, 2, H, C, D)
            spans = torch.as_tensor([ns.spans[c] for c in chosen], dtype=torch.int64).reshape(-1, 2)
            r.result = Retrieved(torch.from_numpy(ids_b), torch.from_numpy(scores_b), spans, sel[:, :, 0],
                                 sel[:, :, 1], name, [ns.texts.get(c) for c in chosen],
                                 [ns.token_ids.get(c) for c in chosen])
            r.selection["chosen"] = len(chosen)
            ns.record(ids_b, scores_b, r.why, r.selection)
        self._counters["retrievals"] += len(rows)

    def retriever_input(self) -> str:
        """What the bank's vectors embed: "text" or "keys" (the key-mean retriever)."""
        kind = getattr(self.retriever, "input", None) or (self.config.retriever if self.config.retriever != "auto"
                                                           else "text")
        keys = kind == "keys" or (kind in RETRIEVERS and retriever_input(kind) == "keys")
        return "keys" if keys else "text"

    def selection(self, namespace: str = "default") -> dict[str, Any]:
        """How the last retrieval of ``namespace`` chose its chunks: mode ("fixed" or "adaptive"), the budget, how
        many were chosen, and for adaptive the signal that decided, its gap and the reason ({} if none)."""
        namespace = _name(namespace)  # type: ignore[assignment]
        with self._lock:
            ns = self._ns.get(namespace)
            return dict(ns.selection) if ns is not None else {}

    def search_many(self, queries: Any, namespace: str, k: int, *, device: torch.device, dtype: torch.dtype,
                    trace_max: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """One bank search for many queries (n, embed_dim) of one namespace, e.g. every token of a block (LongMem's
        token-to-chunk retrieval). None when the namespace is empty, else ids (n, k) int64 ascending (= time
        order; -1 pads last), slot (n, k) long index into pages (pads -> 0), pages (u, L, 2, H, C, D) of the u
        distinct chunks on ``device``, starts (n, k) long token start of each chunk. The trace lists the
        ``trace_max`` chunks most queries chose (``hits``); the policy sees every distinct chunk once."""
        q = as_vectors(queries, self.embed_dim, name="queries")  # (n, E)
        with self._timed("search"), self._lock:
            ns = self._ns.get(namespace)
            if ns is None or not ns.spans:
                return None
            scores, raw = ns.bank.search(q, k)  # (n, k), (n, k)
            big = np.iinfo(np.int64).max
            ids = np.sort(np.where(raw >= 0, raw, big), axis=1)
            ok = ids != big
            uniq = np.unique(ids[ok])  # (u,)
            slot = np.searchsorted(uniq, np.where(ok, ids, uniq[0]))  # (n, k)
            ids = np.where(ok, ids, -1)
            pages = self.store.get(uniq, device, dtype=dtype)  # (u, L, 2, H, C, D)
            starts = np.asarray([ns.spans[int(i)][0] for i in uniq], np.int64)[slot]  # (n, k)
            hits = np.bincount(slot[ok], minlength=len(uniq))  # how many queries chose each chunk
            best = np.full(len(uniq), -np.inf, np.float32)
            np.maximum.at(best, np.searchsorted(uniq, raw[raw >= 0]), scores[raw >= 0])
            ns.record_hits(uniq, hits, best, trace_max)
            self._counters["retrievals"] += 1
        return torch.from_numpy(ids), torch.from_numpy(slot).long(), pages, torch.from_numpy(starts)

    def trace(self, namespace: str = "default") -> list[dict[str, Any]]:
        """The last retrieval of ``namespace``: [{id, score, span, text, rank}] in time order ([] if none)."""
        namespace = _name(namespace)  # type: ignore[assignment]
        with self._lock:
            ns = self._ns.get(namespace)
            return [dict(t) for t in ns.trace] if ns is not None else []

    def embed(self, *, texts: Sequence[str] | None = None, keys: Any = None) -> np.ndarray:
        """Embed chunks with the retriever: texts (a text retriever) or keys (n, H, C, D) (a key retriever).

        Without a retriever given at construction, the config's registered one is made on first use ("auto":
        a key retriever when keys are given, else the text retriever)."""
        if self.retriever is None:
            name = self.config.retriever
            if name == "auto":
                name = "keys" if texts is None and keys is not None else "text"
            self.retriever = make_retriever(name, key_dim=self.embed_dim)
        with self._timed("embed"):
            return np.asarray(self.retriever(list(texts) if texts is not None else keys), np.float32)

    def tokens_of(self, start: int, end: int, *, namespace: str = "default") -> torch.Tensor | None:
        """(end - start,) int64 token ids [start, end) of the namespace's stream when one stored chunk starting at
        ``start`` holds them with its token ids (e.g. the stream's first tokens, its sinks), else None."""
        name = _name(namespace)
        with self._lock:
            ns = self._ns.get(name) if name is not None else None
            row = ns.tokens_of(int(start), int(end)) if ns is not None else None
        return torch.from_numpy(row.copy()) if row is not None else None

    # ------------------------------------------------------------------ bookkeeping
    def num_chunks(self, namespace: str | None = None) -> int:
        namespace = _name(namespace, allow_none=True)
        with self._lock:
            if namespace is None:
                return sum(len(ns.spans) for ns in self._ns.values())
            ns = self._ns.get(namespace)
            return len(ns.spans) if ns is not None else 0

    def num_tokens(self, namespace: str | None = None) -> int:
        namespace = _name(namespace, allow_none=True)
        with self._lock:
            if namespace is None:
                return sum(ns.tokens for ns in self._ns.values())
            ns = self._ns.get(namespace)
            return ns.tokens if ns is not None else 0

    def spans(self, namespace: str = "default") -> list[tuple[int, int]]:
        """Token spans [start, end) of a namespace's chunks in insertion order ([] if it does not exist)."""
        namespace = _name(namespace)  # type: ignore[assignment]
        with self._lock:
            ns = self._ns.get(namespace)
            return list(ns.spans.values()) if ns is not None else []

    def span_end(self, namespace: str = "default") -> int | None:
        """End of the latest span stored in ``namespace`` (0 if it holds none), or None if it does not exist."""
        namespace = _name(namespace)  # type: ignore[assignment]
        with self._lock:
            ns = self._ns.get(namespace)
            if ns is None:
                return None
            return max((int(e) for _, e in ns.spans.values()), default=0)

    def chunk_ids(self, namespace: str = "default") -> torch.Tensor:
        """Ids of a namespace's chunks in insertion order (int64)."""
        namespace = _name(namespace)  # type: ignore[assignment]
        with self._lock:
            ns = self._ns.get(namespace)
            return torch.as_tensor(list(ns.spans) if ns is not None else [], dtype=torch.int64)

    def reset(self, namespace: str | None = None) -> None:
        """Forget one namespace (or everything when None). Ids are never reused.

        ``reset()`` also sets the counters of :meth:`stats` (``added``, ``evicted``, ``retrievals``) back to 0;
        ``reset(namespace)`` keeps them (they count every namespace)."""
        namespace = _name(namespace, allow_none=True)  # type: ignore[assignment]
        with self._lock:
            names = list(self._ns) if namespace is None else [namespace] if namespace in self._ns else []
            for name in names:
                ns = self._ns.pop(name)
                self.store.remove(np.asarray(list(ns.spans), np.int64))
                ns.bank.reset()
                if hasattr(ns.bank, "close"):
                    ns.bank.close()
            if namespace is None:
                self.store.reset()
                self._counters = dict.fromkeys(self._counters, 0)

    def stats(self) -> dict[str, Any]:
        """Sizes and counters. ``added``, ``evicted`` and ``retrievals`` count chunks stored, chunks evicted and
        retrievals since the manager was made or last ``reset()`` (``reset(namespace)`` does not clear them)."""
        with self._lock:
            return {"namespaces": len(self._ns), "chunks": self.num_chunks(), "tokens": self.num_tokens(),
                    "per_namespace": {n: {"chunks": len(ns.spans), "tokens": ns.tokens} for n, ns in self._ns.items()},
                    "capacity_tokens": self.config.capacity_tokens, "policy": self.config.policy,
                    "page_shape": list(self.page_shape), **self._counters, "kvstore": self.store.stats(),
                    "retrieval": {step: self.pipeline(step).names() for step in ("block", "question")}}

    def _dims(self) -> dict[str, int]:
        return {"num_layers": self.num_layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "embed_dim": self.embed_dim, "chunk_size": self.chunk_size}

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str], *, owner: dict[str, Any] | None = None) -> None:
        """Save everything to directory ``path`` atomically (old save or new, never half).

        ``path`` must be new, empty, or a previous memkit save (anything else raises SaveTargetError).
        ``owner`` (JSON) records what the memory belongs to (the wrapped model's fingerprint); ``load``
        compares it with its own ``owner`` argument."""
        with atomic_save(path, "memory") as tmp, self._lock:
            (tmp / "pages").mkdir()
            self.store.save_into(tmp / "pages")
            entries = []
            for j, ns in enumerate(self._ns.values()):
                d = tmp / f"ns-{j:05d}"
                d.mkdir()
                ns.save(d)
                entries.append({"name": ns.name, "dir": d.name})
            manifest = {"format": FORMAT, "version": FORMAT_VERSION, "config": self.config.to_dict(),
                        "dims": self._dims(), "owner": owner, "next_id": self._next_id, "namespaces": entries,
                        "counters": self._counters, "files": file_digests(tmp)}
            write_json(tmp / MANIFEST, manifest)

    def _load_new(cls, path: str | os.PathLike[str], device: str | torch.device | None = None,
                  retriever: Any = None) -> MemoryManager:
        manifest = _read_manifest(save_path(path, "loading memory"))
        try:
            with warnings.catch_warnings():  # a save of memkit 0.2 spells retrieval settings the old way: not the
                warnings.simplefilter("ignore", FutureWarning)  # user's config to fix, so no warning
                config = MemoryConfig.from_dict(manifest["config"])
        except MemkitError as exc:
            raise CorruptFileError(f"{path}: saved config is invalid ({exc})") from exc
        if device is not None:
            config.kvstore.device = None
        d = manifest["dims"]
        mm: MemoryManager = cls(config, num_layers=d["num_layers"], kv_heads=d["kv_heads"],  # type: ignore[operator]
                                head_dim=d["head_dim"], embed_dim=d["embed_dim"],
                                device=device or config.kvstore.device or "cpu", retriever=retriever)
        mm._load_into(path, _manifest=manifest)
        return mm

    def _load_into(self, path: str | os.PathLike[str], *, owner_check: Any = None,
                   _manifest: dict[str, Any] | None = None) -> None:
        """Replace this manager's memory with a saved one. On any error the current memory is kept.

        ``owner_check(saved_owner)`` (optional) raises IncompatibleMemoryError when the save belongs elsewhere."""

        directory = save_path(path, "loading memory")
        manifest = _manifest or _read_manifest(directory)
        if owner_check is not None:
            owner_check(manifest.get("owner"))
        mine, saved = self._dims(), manifest["dims"]
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            raise IncompatibleMemoryError(
                "saved memory does not match this model/config: " + ", ".join(
                    f"{k} saved={a} here={b}" for k, (a, b) in diff.items())
                + "; load it into a model with the same layers, heads, head_dim, embedder and chunk_size")
        spaces: dict[str, Namespace] = {}
        store = KVStore(self.config.kvstore, page_shape=self.page_shape, device=self.device)
        seen: set[int] = set()  # chunk ids across namespaces: each belongs to exactly one
        try:
            store.load(directory / "pages")
            for entry in manifest["namespaces"]:
                d = directory / str(entry["dir"])
                bank = load_bank(d / "bank")
                if bank.dim != self.embed_dim:
                    raise CorruptFileError(f"{d}: its bank holds {bank.dim}-d vectors, this memory {self.embed_dim}-d")
                ns = Namespace.load(d, str(entry["name"]), bank, self._policy())
                ids = list(ns.spans)
                if not all(int(i) in store for i in ids):
                    raise CorruptFileError(f"{d}: K/V pages are missing for some chunks")
                if seen.intersection(ids):
                    raise CorruptFileError(f"{d}: chunk ids are shared with another namespace")
                seen.update(ids)
                spaces[ns.name] = ns
            if len(store) != len(seen):
                raise CorruptFileError(f"{directory}: the K/V store holds pages of no namespace")
        except MemkitError:
            store.close()
            raise
        except Exception as exc:
            store.close()
            raise CorruptFileError(f"could not load memory from {str(directory)!r}: {exc}") from exc
        with self._lock:
            old_store, self.store = self.store, store
            self._ns = spaces
            # never below a stored id: a new chunk must not take over another chunk's pages
            self._next_id = max(int(manifest["next_id"]), self._next_id, max(seen) + 1 if seen else 0)
            saved_counters = manifest.get("counters")
            if isinstance(saved_counters, dict):
                self._counters = {k: int(saved_counters.get(k, 0)) for k in self._counters}
            old_store.close()

    load = _ClassOrInstance(_load_new, _load_into)

    def __repr__(self) -> str:
        return (f"MemoryManager(page_shape={self.page_shape}, namespaces={len(self._ns)}, "
                f"chunks={self.num_chunks()}, policy={self.config.policy!r})")


def _token_query(words: Any) -> np.ndarray:
    """A lexical query: token ids as a 1-D int64 array."""
    arr = np.asarray(words.cpu() if torch.is_tensor(words) else words)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)) or (arr < 0).any():
        raise InvalidInputError(f"a lexical query must be 1-D non-negative integer token ids (or None), got shape "
                                f"{arr.shape} dtype {arr.dtype}")
    return arr.astype(np.int64)


def _name(namespace: Any, *, allow_none: bool = False) -> str | None:
    """A namespace argument: a non-empty string (or None where "every namespace" is meant)."""
    if namespace is None and allow_none:
        return None
    if not isinstance(namespace, str) or not namespace:
        raise InvalidInputError(f"a namespace is a non-empty string such as 'default', got {namespace!r}")
    return namespace


def _read_manifest(directory: Path) -> dict[str, Any]:
    mpath = directory / MANIFEST
    m = read_versioned_json(directory, MANIFEST, fmt=FORMAT, version=FORMAT_VERSION,
                            what="memkit memory manifest", writer="MemoryManager.save()")
    if not (isinstance(m.get("dims"), dict) and isinstance(m.get("config"), dict) and isinstance(m.get("files"), dict)
            and isinstance(m.get("namespaces"), list) and _is_count(m.get("next_id"))
            and all(_is_count(m["dims"].get(k), positive=True)
                    for k in ("num_layers", "kv_heads", "head_dim", "embed_dim", "chunk_size"))
            and all(isinstance(e, dict) and re.fullmatch(r"ns-\d{5}", str(e.get("dir"))) and isinstance(e.get("name"), str)
                    for e in m["namespaces"])):
        raise CorruptFileError(f"{mpath} has missing or mistyped fields; the save is corrupted")
    names = [e["name"] for e in m["namespaces"]]
    dirs = [e["dir"] for e in m["namespaces"]]
    if len(set(names)) != len(names) or len(set(dirs)) != len(dirs):
        raise CorruptFileError(f"{mpath} lists a namespace twice; the save is corrupted")
    verify_files(directory, m["files"], mpath)
    return m


def _is_count(v: Any, positive: bool = False) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (1 if positive else 0) <= v < 2**62
