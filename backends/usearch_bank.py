"""usearch backend: ``usearch``, approximate search on usearch's HNSW graph with an explicit dtype.

* **dtype.** Vectors are stored as ``"f32"`` (default), ``"f16"`` (half the memory, recall
  within ~0.001 of f32 on MiniLM embeddings) or ``"i8"`` (a quarter; recall@10 ~0.94 on MiniLM).
  usearch's i8 stores ``trunc(127 * x / |x|)``, i.e. only the direction of each vector, so i8
  is offered for ``metric="cosine"`` only. The dtype is always passed to usearch: its own
  default (bf16) is never used. For f16 and i8 the bank fetches ``2k`` candidates and re-scores
  them in float32 against the dequantised stored vectors (re-normalised for i8, whose truncation
  shrinks them), so scores are in the same units as f32 and ranking improves.
* **Scores.** ``1 - distance`` for ``ip`` (cosine arrives normalised as ``ip``) and
  ``-distance`` (negated squared L2) for ``l2``; slots past usearch's per-query count are
  padded with id -1 / score -inf.
* **Capacity.** usearch reserves space by itself (rounding up to powers of two) on every add.
* **Removal.** Native: ``Index.remove`` frees the slot and a later add reuses it, so re-adding a
  removed id is an ordinary add.
* **Threads.** usearch releases the GIL during search but indexes its per-thread scratch space by
  the worker number of each call, so two concurrent calls would share it. Searches therefore go
  through one mutex; each call still spreads its batch of queries over ``threads`` cores (0 = all).
* **Persistence.** One native ``index.usearch`` file (``Index.save``); ``expansion_search`` is
  not stored there and lives in :meth:`params`. ``load_bank(path, mmap=True)`` memory-maps the
  file (``Index.view``) and returns a **read-only** bank: nothing is copied into RAM, pages load
  on demand, and add/remove/reset raise :class:`~memkit.errors.ReadOnlyError` (usearch itself
  segfaults when a view that had removals is written to, so the hooks refuse too). Before the
  file reaches native code its matrix header, index header, graph header, levels and every
  neighbour slot are checked with numpy, so truncated or crafted files raise
  :class:`~memkit.errors.CorruptFileError` instead of reading out of bounds (about 2.5 s per
  million vectors, on top of the manifest's sha256 pass).

Cost: ``dim * bytes(dtype)`` per vector plus ``~(2*connectivity*4 + 14)`` bytes of links;
defaults (connectivity=16, expansion_add=128, expansion_search=128) reach recall@10 ~0.99 on
20k MiniLM embeddings in f32 and f16.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
import usearch  # noqa: F401  (imported first so a missing package fails here, naming the extra)
from usearch.index import BatchMatches, Index

from memkit.bank import BaseBank, IdSetMixin
from memkit.errors import ConfigError, CorruptFileError, ReadOnlyError

__all__ = ["UsearchBank"]

INDEX_FILE = "index.usearch"
DTYPES = {"f32": (4, 11), "f16": (2, 12), "i8": (1, 23)}  # name -> (bytes per component, usearch ScalarKind)
_METRIC_KIND = {"ip": 105, "l2sq": 101}  # usearch MetricKind codes in the file header
_FREE_KEY = 2**64 - 1  # key usearch writes into removed slots
_MATRIX = struct.Struct("<II")  # rows, bytes per row
_HEAD = struct.Struct("<7s3H4B3Q?")  # magic, version, metric, scalar, key, slot, present, deleted, dims, multi
_GRAPH = struct.Struct("<5Q")  # size, connectivity, connectivity_base, max_level, entry_slot
_CHUNK = 16_384  # nodes per numpy gather while validating links


class UsearchBank(IdSetMixin, BaseBank):
    """usearch HNSW index with explicit storage dtype and memory-mapped read-only views."""

    name = "usearch"
    exact = False

    def __init__(self, *, dim: int, metric: str = "ip", dtype: str = "f32", connectivity: int = 16,
                 expansion_add: int = 128, expansion_search: int = 128, threads: int = 0) -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"usearch dtype={dtype!r} is not supported; choose one of {list(DTYPES)}")
        if dtype == "i8" and metric != "cosine":
            raise ConfigError("usearch dtype='i8' stores only each vector's direction, so it needs "
                              f"metric='cosine' (got {metric!r}); use dtype='f16' to halve memory for ip or l2")
        for label, value, low in (("connectivity", connectivity, 2), ("expansion_add", expansion_add, 1),
                                  ("expansion_search", expansion_search, 1), ("threads", threads, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ConfigError(f"usearch {label} must be an integer >= {low}, got {value!r}")
        super().__init__(dim=dim, metric=metric)
        self.dtype, self.connectivity = dtype, int(connectivity)
        self.expansion_add, self.expansion_search, self.threads = int(expansion_add), int(expansion_search), int(threads)
        self._search_lock = threading.Lock()
        self._ids: set[int] = set()
        self.index = self._new_index()

    def params(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "connectivity": self.connectivity, "expansion_add": self.expansion_add,
                "expansion_search": self.expansion_search, "threads": self.threads}

    def _usearch_metric(self) -> str:
        return "l2sq" if self.metric == "l2" else "ip"

    def _new_index(self) -> Index:
        return Index(ndim=self.dim, metric=self._usearch_metric(), dtype=self.dtype,
                     connectivity=self.connectivity, expansion_add=self.expansion_add,
                     expansion_search=self.expansion_search)

    def native_threads(self, n: int) -> int:
        """Threads a search of n queries uses."""
        return max(1, min(self.threads or os.cpu_count() or 1, n))

    def _writable_native(self, op: str) -> None:
        if self.read_only:  # BaseBank refuses first; this guards direct hook calls on a view
            raise ReadOnlyError(f"this usearch bank is a memory-mapped view; {op} would corrupt it. "
                                "Load it with memkit.load_bank(path) to modify it")

    # ------------------------------------------------------------------ hooks
    def _add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self._writable_native("add")
        self.index.add(ids.astype(np.uint64), vectors, threads=self.native_threads(len(ids)))
        self._ids.update(ids.tolist())

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        quantised = self.dtype != "f32"
        kk = min(2 * k, len(self._ids)) if quantised else k
        with self._search_lock:
            res = self.index.search(queries, kk,
                                    threads=self.native_threads(len(queries)))
        if isinstance(res, BatchMatches):
            keys, dist, counts = res.keys, res.distances, np.asarray(res.counts)
        else:  # a single query comes back as Matches, already cut to its count
            keys, dist, counts = res.keys[None, :], res.distances[None, :], np.array([len(res.keys)])
        m, width = keys.shape
        ids = np.full((m, kk), -1, np.int64)
        ids[:, :width] = keys.astype(np.int64)
        valid = np.arange(kk)[None, :] < counts[:, None]
        ids[~valid] = -1
        if quantised:
            scores = self._rescore(queries, ids)
        else:
            scores = np.full((m, kk), -np.inf, np.float32)
            scores[:, :width] = -dist if self.metric == "l2" else 1.0 - dist
            scores[~valid] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def _rescore(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Float32 scores of each query against the dequantised vectors of its candidates."""
        valid = ids >= 0
        vecs = np.zeros((*ids.shape, self.dim), np.float32)
        if valid.any():
            vecs[valid] = self._get(ids[valid])
        if self.metric == "l2":
            scores = -((vecs - queries[:, None, :]) ** 2).sum(-1)
        else:
            scores = np.einsum("mkd,md->mk", vecs, queries)
        return np.where(valid, scores, -np.inf).astype(np.float32)

    def _remove(self, ids: np.ndarray) -> int:
        self._writable_native("remove")
        self.index.remove(ids.astype(np.uint64))
        self._ids.difference_update(ids.tolist())
        return len(ids)

    def _get(self, ids: np.ndarray) -> np.ndarray:
        if not len(ids):
            return np.empty((0, self.dim), np.float32)
        got = self.index.get(ids.astype(np.uint64), dtype=np.float32)
        arr = np.stack(got) if isinstance(got, tuple) else np.asarray(got)  # usearch returns a tuple of rows
        arr = arr.astype(np.float32, copy=False).reshape(len(ids), self.dim)
        if self.dtype == "i8":  # truncation shrinks each stored direction: give back unit vectors
            arr = arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-12)
        return arr

    def _reset(self) -> None:
        self._writable_native("reset")
        self.index = self._new_index()
        self._ids = set()

    def close(self) -> None:
        self.index = None  # drops the memory map of a view; usearch unmaps on destruction

    # ------------------------------------------------------------------ persistence
    def _save_files(self, directory: Path) -> None:
        self.index.save(str(directory / INDEX_FILE))

    @classmethod
    def _load_files(cls, directory: Path, manifest: dict[str, Any], *, mmap: bool = False) -> BaseBank:
        bank = cls(dim=manifest["dim"], metric=manifest["metric"], **manifest["params"])
        path = directory / INDEX_FILE
        keys = bank._validate_file(path)
        index = bank._new_index()
        if mmap:
            index.view(str(path))
        else:
            index.load(str(path))
        if index.ndim != bank.dim or len(index) != len(keys):
            raise CorruptFileError(f"{path} loaded with {len(index)} vectors of dim {index.ndim}; "
                                   f"expected {len(keys)} of dim {bank.dim}. Re-save the bank")
        index.expansion_search = bank.expansion_search  # not stored in usearch's file
        bank.index, bank._ids, bank.read_only = index, set(keys.tolist()), bool(mmap)
        return bank

    def _validate_file(self, path: Path) -> np.ndarray:
        """Check a usearch file against this bank's parameters with numpy; return its live keys."""
        def bad(why: str) -> CorruptFileError:
            return CorruptFileError(f"{path} is not a valid usearch index for this bank ({why}); "
                                    "the save is corrupted or was written by another program. Re-save it")

        if not path.is_file():
            raise CorruptFileError(f"{path} is missing; the saved bank is incomplete")
        raw = np.memmap(path, np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
        width, scalar = DTYPES[self.dtype]
        if raw.size < _MATRIX.size:
            raise bad("shorter than its header")
        rows, cols = _MATRIX.unpack_from(raw.data, 0)
        head_at = _MATRIX.size + rows * cols
        if cols != self.dim * width or head_at + _HEAD.size > raw.size:
            raise bad(f"vector matrix {rows}x{cols} bytes does not fit dim={self.dim} {self.dtype}")
        magic, major, _minor, _patch, metric, kind, key_kind, slot_kind, present, deleted, dims, multi = (
            _HEAD.unpack_from(raw.data, head_at))
        if magic != b"usearch" or major != 2:
            raise bad("bad magic or unsupported format version")
        if (metric, kind, key_kind, slot_kind, dims, multi) != (
                _METRIC_KIND[self._usearch_metric()], scalar, 14, 15, self.dim, False):
            raise bad("metric, dtype or dimension differ from the manifest")
        graph_at = head_at + 64
        if graph_at + _GRAPH.size > raw.size:
            raise bad("truncated before the graph")
        size, conn, conn_base, max_level, entry = _GRAPH.unpack_from(raw.data, graph_at)
        if size != rows or present + deleted != size or conn != self.connectivity or conn_base != 2 * conn:
            raise bad("graph header does not match the vectors or connectivity")
        levels_at = graph_at + _GRAPH.size
        if (size and (max_level > 64 or entry >= size)) or levels_at + 2 * size > raw.size:
            raise bad("graph header out of range")
        levels = np.frombuffer(raw, "<i2", count=size, offset=levels_at).astype(np.int64)
        if size and (levels.min() < 0 or levels.max() > max_level or levels[entry] != max_level):
            raise bad("node levels out of range, or the entry point is not on the top level")
        base_bytes, upper_bytes = 4 + 4 * conn_base, 4 + 4 * conn
        node_bytes = 10 + base_bytes + levels * upper_bytes
        starts = levels_at + 2 * size + np.cumsum(node_bytes) - node_bytes  # where each node begins
        if levels_at + 2 * size + int(node_bytes.sum()) != raw.size:
            raise bad(f"size {raw.size} bytes does not match its nodes")
        keys = _gather(raw, starts, 8).view("<u8")[:, 0] if size else np.zeros(0, np.uint64)
        live = keys[keys != _FREE_KEY]
        if len(live) != present or len(np.unique(live)) != len(live) or (live >= 2**62).any():
            raise bad("node keys are repeated or out of range")
        _check_links(raw, starts + 10, conn_base, levels, np.zeros(size, np.int64), bad)
        upper = np.repeat(np.arange(size), levels)  # one entry per (node, level >= 1)
        if upper.size:
            nth = np.arange(upper.size) - np.repeat(np.cumsum(levels) - levels, levels)
            _check_links(raw, starts[upper] + 10 + base_bytes + nth * upper_bytes, conn, levels, nth + 1, bad)
        return live.astype(np.int64)


def _gather(raw: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """Bytes ``raw[s:s+width]`` for each start, as a (len(starts), width) uint8 array."""
    return np.asarray(raw[starts[:, None] + np.arange(width)[None, :]], np.uint8)


def _check_links(raw: np.ndarray, starts: np.ndarray, cap: int, levels: np.ndarray, level: np.ndarray,
                 bad: Any) -> None:
    """Each list is a uint32 count then ``cap`` uint32 slots: counts <= cap, and every used slot is a
    node that exists on the list's ``level`` (else a search would read past that node's links)."""
    for lo in range(0, len(starts), _CHUNK):
        block = _gather(raw, starts[lo:lo + _CHUNK], 4 + 4 * cap).view("<u4")
        counts = block[:, 0]
        used = np.arange(cap)[None, :] < counts[:, None]
        slots = block[:, 1:][used].astype(np.int64)
        if (counts > cap).any() or (slots >= len(levels)).any():
            raise bad("a neighbour list is out of range")
        if (levels[slots] < np.broadcast_to(level[lo:lo + _CHUNK, None], used.shape)[used]).any():
            raise bad("a neighbour is linked on a level it does not have")
