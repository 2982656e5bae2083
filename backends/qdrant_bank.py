"""``qdrant``: a bank in a Qdrant collection, embedded (local mode) by default or on a server.

What it implements: the memkit bank API on top of ``qdrant-client``. One code path serves both
modes; only the client differs:

* local mode (default): ``path=None`` keeps the collection in memory (``":memory:"``);
  ``path="/dir"`` persists it in qdrant-client's own local storage in that directory (SQLite
  rows written by qdrant-client; a directory reopens as the same bank). Local mode is exact
  brute force (qdrant-client scores every stored vector with numpy and sorts), so this backend
  declares ``exact = True``. It is also slow (tens of ms per query at 20k x 384 on 2 cores, and
  qdrant-client warns beyond 20k points): use it for small memories, demos and tests.
* server mode: ``url="http://host:6333"`` (and ``api_key=...``), or the URI
  ``qdrant://host:6333/collection``. Searches send ``SearchParams(exact=True)`` so results stay
  exact; pass ``exact_search=False`` to use the server's HNSW index (then recall, not exactness).

Semantics shared with every memkit bank: memkit ids (int64 >= 0) are the Qdrant point ids;
scores are higher = closer: ``DOT`` for ``ip`` and ``cosine`` (memkit normalises cosine vectors
before they reach Qdrant), ``EUCLID`` for ``l2``, whose distance ``d`` is returned as ``-d**2``
like the other backends. Queries go out in batches (``query_batch_points``, ``batch_size``
requests per call), points in ``upsert`` batches of ``batch_size``. The memkit metric is stored
in the collection's metadata, so reopening with another dim or metric raises ``ConfigError``.

``save(path)`` writes a portable snapshot, never a pickle: ``ids.npy`` (n,) int64,
``vectors.npy`` (n, dim) float32 (streamed through ``np.lib.format.open_memmap``, so RAM stays
bounded) and ``qdrant.json`` (format, version, distance, count). ``memkit.load_bank`` validates
them and restores into a new in-memory local collection; ``QdrantBank.restore(dir, url=...)``
restores into a server or a local path instead. Costs: save and load move every vector once;
reopening a collection scans its ids once to continue auto ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models

from memkit.bank import BaseBank, read_manifest
from memkit.errors import ConfigError, CorruptFileError, InvalidInputError
from memkit.files import save_path
from memkit.paths import check_dir_target, user_path

__all__ = ["QdrantBank"]

IDS_FILE, VEC_FILE, INFO_FILE = "ids.npy", "vectors.npy", "qdrant.json"
SNAPSHOT_FORMAT, SNAPSHOT_VERSION = "memkit-qdrant-snapshot", 1
SCROLL = 4096


def _distance(metric: str) -> models.Distance:
    return models.Distance.EUCLID if metric == "l2" else models.Distance.DOT


def _is_qdrant_store(directory: Path) -> bool:
    """True when ``directory`` holds qdrant-client's local storage (its meta.json lists collections)."""
    meta = directory / "meta.json"
    try:
        data = json.loads(meta.read_text()) if meta.is_file() and not meta.is_symlink() else None
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("collections"), dict)


class QdrantBank(BaseBank):
    """Qdrant collection as a memkit bank (embedded local mode, or a server through ``url``).

    ``path``: local-mode directory (``None`` or ``":memory:"``: in memory). ``url``/``api_key``:
    a Qdrant server instead (``path`` must then be ``None``). ``collection``: the collection
    name (created if missing, reopened if it exists). ``batch_size``: points per upsert and
    queries per batched search call. ``exact_search``: server mode only, brute-force search.
    """

    name = "qdrant"
    exact = True  # local mode is brute force; server mode sends SearchParams(exact=True)
    path_is_dir = True

    def __init__(self, *, dim: int, metric: str = "ip", path: str | os.PathLike[str] | None = None,
                 url: str | None = None, api_key: str | None = None, collection: str = "memkit",
                 batch_size: int = 256, exact_search: bool = True, timeout: int | None = None) -> None:
        super().__init__(dim=dim, metric=metric)
        if not isinstance(collection, str) or not collection:
            raise ConfigError(f"qdrant collection must be a non-empty string, got {collection!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"qdrant batch_size must be a positive integer, got {batch_size!r}")
        if url is not None and path not in (None, ":memory:"):
            raise ConfigError("give qdrant either path= (local mode) or url= (a server), not both")
        self.collection, self.batch_size, self.exact_search = collection, batch_size, bool(exact_search)
        self.url, self.local = url, url is None
        self.path = None if path in (None, ":memory:") else str(user_path(path, "qdrant path", error=ConfigError))
        if self.path is not None:  # qdrant-client writes .lock, meta.json, collection/ into it: never beside yours
            check_dir_target(Path(self.path), "the qdrant local path", is_ours=_is_qdrant_store)
        try:
            if url is not None:
                self.client = QdrantClient(url=url, api_key=api_key, timeout=timeout)
            elif self.path is None:
                self.client = QdrantClient(location=":memory:")
            else:
                self.client = QdrantClient(path=self.path)
        except (RuntimeError, ValueError, OSError) as exc:
            raise ConfigError(f"could not open Qdrant at {url or self.path!r}: {exc}; if another "
                              "client holds this local path, close it first") from exc
        try:
            self._open_collection()
        except ConfigError:
            self.client.close()
            raise
        except Exception as exc:
            self.client.close()
            raise ConfigError(f"could not use Qdrant collection {collection!r} at {url or self.path or ':memory:'}:"
                              f" {exc}; check that the server is reachable and the api_key is right") from exc

    def params(self) -> dict[str, Any]:
        # Not path/url/api_key: a loaded snapshot restores into memory, and secrets never go to disk.
        return {"collection": self.collection, "batch_size": self.batch_size, "exact_search": self.exact_search}

    def close(self) -> None:
        """Close the client (and its local storage). Idempotent."""
        with self._lock.write():
            self.client.close()
            self._closed = True

    def _cl(self) -> QdrantClient:
        if getattr(self, "_closed", False):
            raise InvalidInputError("this qdrant bank is closed; create it again with memkit.create_bank(...)")
        return self.client

    # ------------------------------------------------------------------ collection
    def _create(self) -> None:
        self._cl().create_collection(
            self.collection, vectors_config=models.VectorParams(size=self.dim, distance=_distance(self.metric)),
            metadata={"memkit_metric": self.metric})

    def _open_collection(self) -> None:
        if not self._cl().collection_exists(self.collection):
            self._create()
            return
        info = self._cl().get_collection(self.collection)
        vec = info.config.params.vectors
        stored = (getattr(info.config, "metadata", None) or {}).get("memkit_metric")
        where = f"qdrant collection {self.collection!r}"
        if not isinstance(vec, models.VectorParams):
            raise ConfigError(f"{where} uses named vectors; memkit needs a collection with one unnamed vector")
        if vec.size != self.dim or vec.distance != _distance(self.metric) or stored not in (None, self.metric):
            raise ConfigError(f"{where} holds dim={vec.size}, distance={vec.distance.value}, metric={stored!r}, "
                              f"but dim={self.dim}, metric={self.metric!r} was asked for; pass the matching "
                              "dim and metric, or another collection")
        ids = self._all_ids()
        self._next_id = int(ids.max()) + 1 if len(ids) else 0

    # ------------------------------------------------------------------ hooks
    def _add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        for s in range(0, len(ids), self.batch_size):
            batch = models.Batch(ids=ids[s:s + self.batch_size].tolist(),
                                 vectors=vectors[s:s + self.batch_size].tolist())
            self._cl().upsert(self.collection, points=batch, wait=True)

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        m = queries.shape[0]
        scores = np.full((m, k), -np.inf, np.float32)
        out = np.full((m, k), -1, np.int64)
        params = None if self.local else models.SearchParams(exact=self.exact_search)
        for s in range(0, m, self.batch_size):
            requests = [models.QueryRequest(query=q.tolist(), limit=k, with_payload=False, with_vector=False,
                                            params=params) for q in queries[s:s + self.batch_size]]
            for row, resp in enumerate(self._cl().query_batch_points(self.collection, requests), start=s):
                pts = resp.points[:k]
                if pts:
                    sc = np.array([p.score for p in pts], np.float64)
                    scores[row, : len(pts)] = -(sc * sc) if self.metric == "l2" else sc
                    out[row, : len(pts)] = [int(p.id) for p in pts]  # type: ignore[arg-type]
        return scores, out

    def _remove(self, ids: np.ndarray) -> int:
        for s in range(0, len(ids), SCROLL):
            sel = models.PointIdsList(points=ids[s:s + SCROLL].tolist())
            self._cl().delete(self.collection, points_selector=sel, wait=True)
        return len(ids)

    def _retrieve(self, ids: np.ndarray, *, vectors: bool) -> list[models.Record]:
        out: list[models.Record] = []
        for s in range(0, len(ids), SCROLL):
            out += self._cl().retrieve(self.collection, ids=ids[s:s + SCROLL].tolist(), with_payload=False,
                                        with_vectors=vectors)
        return out

    def _contains(self, ids: np.ndarray) -> np.ndarray:
        found = np.fromiter((int(r.id) for r in self._retrieve(ids, vectors=False)), np.int64)  # type: ignore[arg-type]
        return np.isin(ids, found)

    def _count(self) -> int:
        return int(self._cl().count(self.collection, exact=True).count)

    def _scroll(self, *, vectors: bool) -> Any:
        offset = None
        while True:
            recs, offset = self._cl().scroll(self.collection, limit=SCROLL, offset=offset, with_payload=False,
                                              with_vectors=vectors)
            yield recs
            if offset is None:
                return

    def _all_ids(self) -> np.ndarray:
        chunks = [np.fromiter((int(r.id) for r in recs), np.int64) for recs in self._scroll(vectors=False)]  # type: ignore[arg-type]
        return np.concatenate(chunks) if chunks else np.empty(0, np.int64)

    def _get(self, ids: np.ndarray) -> np.ndarray:
        by_id = {int(r.id): r.vector for r in self._retrieve(ids, vectors=True)}  # type: ignore[arg-type]
        return np.asarray([by_id[int(i)] for i in ids], np.float32).reshape(len(ids), self.dim)

    def _reset(self) -> None:
        self._cl().delete_collection(self.collection)
        self._create()

    # ------------------------------------------------------------------ save / load
    def _save_files(self, directory: Path) -> None:
        n = self._count()
        if n == 0:  # numpy cannot memory-map an empty array: write the empty snapshot directly
            np.save(directory / IDS_FILE, np.empty((0,), np.int64))
            np.save(directory / VEC_FILE, np.empty((0, self.dim), np.float32))
            info = {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "count": 0,
                    "distance": _distance(self.metric).value, "collection": self.collection}
            (directory / INFO_FILE).write_text(json.dumps(info, indent=2))
            return
        ids = np.lib.format.open_memmap(directory / IDS_FILE, mode="w+", dtype=np.int64, shape=(n,))
        vecs = np.lib.format.open_memmap(directory / VEC_FILE, mode="w+", dtype=np.float32, shape=(n, self.dim))
        at = 0
        for recs in self._scroll(vectors=True):
            if at + len(recs) > n:
                raise InvalidInputError("the collection grew while it was being saved; save again when "
                                        "no other client writes to it")
            ids[at:at + len(recs)] = [int(r.id) for r in recs]  # type: ignore[arg-type]
            vecs[at:at + len(recs)] = [r.vector for r in recs]
            at += len(recs)
        if at != n:
            raise InvalidInputError("the collection shrank while it was being saved; save again when "
                                    "no other client writes to it")
        ids.flush()
        vecs.flush()
        del ids, vecs
        info = {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "count": n,
                "distance": _distance(self.metric).value, "collection": self.collection}
        (directory / INFO_FILE).write_text(json.dumps(info, indent=2))

    @staticmethod
    def _read_snapshot(directory: Path, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Validated (ids, vectors) of a snapshot, memory-mapped; never unpickles anything."""
        try:
            info = json.loads((directory / INFO_FILE).read_text())
            ids = np.load(directory / IDS_FILE, mmap_mode="r", allow_pickle=False)
            vecs = np.load(directory / VEC_FILE, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CorruptFileError(f"qdrant snapshot in {directory} is unreadable ({exc})") from exc
        if not isinstance(info, dict) or info.get("format") != SNAPSHOT_FORMAT or info.get("version") != SNAPSHOT_VERSION:
            raise CorruptFileError(f"{directory / INFO_FILE} is not a version-{SNAPSHOT_VERSION} qdrant snapshot")
        n = info.get("count")
        if ids.dtype != np.int64 or ids.shape != (n,) or vecs.dtype != np.float32 or vecs.shape != (n, dim):
            raise CorruptFileError(f"qdrant snapshot in {directory} has ids {ids.dtype}{ids.shape} and vectors "
                                   f"{vecs.dtype}{vecs.shape}; expected {n} int64 ids and ({n}, {dim}) float32")
        if n and (ids.min() < 0 or len(np.unique(ids)) != n):
            raise CorruptFileError(f"qdrant snapshot in {directory} has negative or duplicate ids")
        return ids, vecs

    @classmethod
    def _load_files(cls, directory: Path, manifest: dict[str, Any], *, mmap: bool = False) -> BaseBank:
        ids, vecs = cls._read_snapshot(directory, manifest["dim"])  # mmap: nothing to map, loads normally
        bank = cls(dim=manifest["dim"], metric=manifest["metric"], **manifest["params"])
        try:
            bank._fill(ids, vecs)
        except BaseException:
            bank.close()
            raise
        return bank

    def _fill(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        step = max(self.batch_size, 4096)
        for s in range(0, len(ids), step):
            chunk = np.ascontiguousarray(vecs[s:s + step], np.float32)
            if not np.isfinite(chunk).all():
                raise CorruptFileError("the qdrant snapshot holds NaN or inf vectors")
            self._add(chunk, np.asarray(ids[s:s + step], np.int64))
        self._next_id = int(ids.max()) + 1 if len(ids) else 0

    @classmethod
    def restore(cls, directory: str | os.PathLike[str], **params: Any) -> QdrantBank:
        """Restore a saved snapshot into the collection ``params`` name (e.g. ``url=``, ``path=``).

        The target collection must be new or empty, so nothing in it is overwritten by accident.
        """
        d = save_path(directory, "restoring a qdrant snapshot")
        manifest = read_manifest(d)
        if manifest["backend"] != cls.name:
            raise CorruptFileError(f"{d} holds a {manifest['backend']!r} bank, not a qdrant snapshot")
        ids, vecs = cls._read_snapshot(d, manifest["dim"])
        merged = {**manifest["params"], **params}
        bank = cls(dim=manifest["dim"], metric=manifest["metric"], **merged)
        if len(bank):
            bank.close()
            raise ConfigError(f"qdrant collection {bank.collection!r} is not empty; restore into a new collection")
        with bank._lock.write():
            bank._fill(ids, vecs)
        bank._next_id = max(bank._next_id, int(manifest.get("next_id", 0)))
        return bank
