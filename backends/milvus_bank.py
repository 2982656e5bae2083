"""``milvus``: a bank in a Milvus collection, embedded (milvus-lite) by default or on a Milvus server.

What it follows (the Milvus documentation, milvus.io/docs, 2.6/3.0): "Run Milvus Lite Locally" (a local
``*.db`` URI makes ``pymilvus.MilvusClient`` start milvus-lite, and the same client code reaches Milvus
Standalone or Distributed when the URI names a server), "Create Collection" (an explicit schema),
"Index Vector Fields" and "FLAT" (the exact brute-force index), "Delete Entities" (by primary key),
"Consistency Level" (``Strong``: a read sees every write acknowledged before it), "Metric Types" (``L2``
returns the *squared* distance) and "Milvus Limits" (names of letters, digits and ``_``, at most 255 of
them; dim <= 32,768; top-k and nq <= 16,384; 64 MB per insert or search request).

One code path serves both modes; only the ``MilvusClient`` URI differs:

* embedded (default): milvus-lite 3.x, a pure-Python engine that pymilvus starts *inside this process*
  (a gRPC server on a free 127.0.0.1 port, served by background threads; no child process). ``path=None``
  keeps the database in a private temporary directory removed by ``close()``; ``path="mem.db"`` (or a
  directory, which gets a ``milvus.db`` inside) persists it and reopens as the same bank. milvus-lite
  locks a database per process; ``close()`` (or garbage collection) stops the server memkit started.
* server: ``uri="http://host:19530"`` (with ``token=``, ``db_name=``), or the URI
  ``milvus://host:19530/collection``. Not run here: no Milvus server can be installed on this machine.

Schema: ``id`` INT64 primary key (the memkit id; auto_id off) and ``vector`` FLOAT_VECTOR(dim). The
default ``index_type="FLAT"`` makes search exact in both modes (``exact = True``); ``"HNSW"``,
``"IVF_FLAT"`` ... with ``index_params`` (``M``, ``efConstruction``, ``nlist``) and ``search_params``
(``ef``, ``nprobe``) trade exactness for speed. Metrics: ``ip`` and ``cosine`` use ``IP`` (memkit
normalises cosine vectors first); ``l2`` uses ``L2``, whose squared distance ``d`` becomes the score ``-d``
as in every memkit bank. The memkit metric is a collection property, so reopening a collection with
another dim, metric or index type raises ``ConfigError``. Collection names are mapped onto Milvus's
alphabet: any character other than a letter, digit or ``_`` becomes ``_``.

Bookkeeping. Embedded, memkit is the only writer (milvus-lite locks the database per process, and this
module refuses a second open bank on the same database and collection), so live ids are kept in a Python
set and ``len``/``in``/``ids()`` cost nothing. On a server other clients may write, so those ask the server
(one round trip each). milvus-lite scans rows it has not flushed yet row by row in Python (0.5 s per query
over 16k x 384 here) but flushed segments through numpy (9 ms): the embedded bank flushes before the first
search after a write (about 5 ms for a few rows; its compaction keeps the segment count small). A server
indexes growing data itself, so nothing is flushed there until ``save``.

``save(path)`` writes a portable snapshot, never milvus-lite's own files: ``ids.npy`` (n,) int64,
``vectors.npy`` (n, dim) float32 (streamed through ``np.lib.format.open_memmap``) and ``milvus.json``
(format, version, metric, collection, count). It first flushes the live collection, so an embedded
database at ``path=`` or a server collection is durable at that point too. ``memkit.load_bank`` validates
the snapshot (checksummed manifest, dtypes, shapes, unique ids) and restores it into a new embedded
bank; ``MilvusBank.restore(dir, uri=... or path=...)`` restores it into a server or a database file. A save
never names a server, so loading a file never opens a connection. Why not copy milvus-lite's directory:
it holds parquet, WAL and faiss index files that its loaders would read unchecked, it changes under
every write (it would have to be copied again to be opened), and it ties a save to one milvus-lite version.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from memkit.bank import BaseBank, read_manifest, require
from memkit.errors import ConfigError, CorruptFileError, InvalidInputError
from memkit.files import save_path
from memkit.paths import check_dir_target, user_path

__all__ = ["MilvusBank"]

ID, VEC, METRIC_PROP = "id", "vector", "memkit.metric"
IDS_FILE, VEC_FILE, INFO_FILE = "ids.npy", "vectors.npy", "milvus.json"
SNAPSHOT_FORMAT, SNAPSHOT_VERSION = "memkit-milvus-snapshot", 1
MAX_MILVUS_DIM = 32_768  # Milvus limit on a vector field's dim
MAX_TOPK = 16_384  # Milvus limit on top-k (and on queries per search request)
REQUEST_BYTES = 32 << 20  # half of a server's 64 MB per-request limit
GET_BATCH = 1024  # ids per get/delete request
# index type -> (build parameters, search parameters) memkit passes on; values are integers checked below.
INDEXES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "FLAT": ((), ()), "AUTOINDEX": ((), ()),
    "HNSW": (("M", "efConstruction"), ("ef",)), "HNSW_SQ": (("M", "efConstruction"), ("ef",)),
    "IVF_FLAT": (("nlist",), ("nprobe",)), "IVF_SQ8": (("nlist",), ("nprobe",)),
    "IVF_PQ": (("nlist", "m", "nbits"), ("nprobe",)),
}
LITE_INDEXES = frozenset(INDEXES) - {"IVF_PQ"}  # what milvus-lite 3.x builds
BOUNDS = {"M": (2, 2048), "nbits": (1, 16)}  # anything else: 1..65536 (Milvus documents these ranges)

_OPEN_LOCK = threading.Lock()
# embedded db path -> [open collections, whether memkit started its milvus-lite server, private temp dir or None]
_OPEN: dict[str, list[Any]] = {}


def _milvus_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"milvus collection must be a non-empty string, got {name!r}")
    out = re.sub(r"[^A-Za-z0-9_]", "_", name)
    out = out if not out[0].isdigit() else "_" + out
    if len(out) > 255:
        raise ConfigError(f"milvus collection names have at most 255 characters; {name[:40]!r}... has {len(out)}")
    return out


def _check_params(kind: str, params: Any, allowed: tuple[str, ...], index_type: str) -> dict[str, int]:
    if params is None:
        return {}
    if not isinstance(params, dict) or set(params) - set(allowed):
        raise ConfigError(f"milvus {kind} for index_type={index_type!r} may only set {list(allowed) or 'nothing'}; "
                          f"got {params!r}")
    for key, value in params.items():
        lo, hi = BOUNDS.get(key, (1, 65_536))
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
            raise ConfigError(f"milvus {kind} {key!r} must be an integer in [{lo}, {hi}], got {value!r}")
    return {k: int(v) for k, v in params.items()}


def _db_path(path: str | os.PathLike[str]) -> str:
    """An absolute milvus-lite database path: ``*.db`` as given, any other path is a directory holding milvus.db.
    ``~`` and ``$VARIABLES`` are expanded (:mod:`memkit.paths`); milvus-lite keeps a database in a directory, so a
    file or a foreign non-empty directory at that path is refused before milvus-lite writes there."""
    p = user_path(path, "milvus path", error=ConfigError)
    if p.suffix != ".db":
        p = p / "milvus.db"
    check_dir_target(p, "the milvus-lite database (a directory)",
                     is_ours=lambda d: (d / "collections").is_dir() or (d / "databases").is_dir())
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the directory of milvus database {str(p)!r}: {exc}") from exc
    return os.path.abspath(p)


def _release(client: Any, db: str | None, coll: str, tmp: str | None) -> None:
    """Close a bank's client; stop the milvus-lite server memkit started once its last bank closes."""
    if tmp is not None:  # a private database: dropping first spares milvus-lite a final flush of dead data
        try:
            client.drop_collection(coll)
        except Exception:
            pass
    try:
        client.close()
    except Exception:
        pass
    if db is None:
        return
    with _OPEN_LOCK:
        entry = _OPEN.get(db)
        if entry is None:  # already released at interpreter exit
            return
        entry[0].discard(coll)
        if entry[0]:
            return
        del _OPEN[db]
    _stop(db, owned=entry[1], tmp=entry[2])


def _stop(db: str, *, owned: bool, tmp: str | None) -> None:
    if owned:
        try:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(db)  # stops its gRPC threads, flushes, unlocks the database
        except Exception:
            pass
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


@atexit.register
def _at_exit() -> None:
    """Stop the servers of banks still open at exit and remove their temporary databases, without RPCs.

    Bank finalizers do not run at exit (``atexit = False``): by then ``concurrent.futures`` has shut its
    executors down, so milvus-lite's gRPC server can no longer answer, and a client call would hang in
    pymilvus's retries for minutes. This handler, registered when this module is imported (normally before
    milvus-lite's own), runs after milvus-lite's ``release_all`` and only removes what is left.
    """
    with _OPEN_LOCK:
        entries = list(_OPEN.items())
        _OPEN.clear()
    for db, (_, owned, tmp) in entries:
        _stop(db, owned=owned, tmp=tmp)


class MilvusBank(BaseBank):
    """A Milvus collection as a memkit bank: embedded milvus-lite, or a Milvus server through ``uri``.

    ``path``: embedded database (``None``: private and temporary). ``uri``/``token``/``db_name``/``timeout``:
    a Milvus server instead. ``collection``: created if missing, reopened if it exists. ``index_type``,
    ``index_params``, ``search_params``: see the module docstring (FLAT = exact). ``batch_size``: rows per
    insert and queries per search request (further capped so a request stays under 32 MB).
    """

    name = "milvus"
    path_is_dir = True  # milvus-lite's *.db is a directory
    exact = True  # FLAT (the default) is brute force in milvus-lite and on a server

    def __init__(self, *, dim: int, metric: str = "ip", path: str | os.PathLike[str] | None = None,
                 uri: str | None = None, token: str | None = None, db_name: str | None = None,
                 collection: str = "memkit", index_type: str = "FLAT", index_params: dict[str, int] | None = None,
                 search_params: dict[str, int] | None = None, batch_size: int = 4096,
                 timeout: float | None = None) -> None:
        super().__init__(dim=dim, metric=metric)
        if self.dim > MAX_MILVUS_DIM:
            raise ConfigError(f"Milvus vectors have at most {MAX_MILVUS_DIM} dimensions; dim={self.dim} is too large")
        if not isinstance(index_type, str) or index_type.upper() not in INDEXES:
            raise ConfigError(f"milvus index_type must be one of {sorted(INDEXES)}, got {index_type!r}")
        self.index_type = index_type.upper()
        build_keys, search_keys = INDEXES[self.index_type]
        self.index_params = _check_params("index_params", index_params, build_keys, self.index_type)
        self.search_params = _check_params("search_params", search_params, search_keys, self.index_type)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_TOPK:
            raise ConfigError(f"milvus batch_size must be an integer in [1, {MAX_TOPK}], got {batch_size!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ConfigError(f"milvus timeout must be a positive number of seconds or None, got {timeout!r}")
        self.collection, self._coll, self.batch_size = collection, _milvus_name(collection), batch_size
        self.local = uri is None
        self._closed, self._dirty, self._flush_lock = False, False, threading.Lock()
        self._ids: set[int] = set()
        self._db: str | None = None
        tmp: str | None = None
        if self.local:
            if token is not None or db_name is not None:
                raise ConfigError("milvus token= and db_name= apply to a server (uri=...); embedded mode uses path=")
            if self.index_type not in LITE_INDEXES:
                raise ConfigError(f"milvus-lite cannot build index_type={self.index_type!r}; use one of "
                                  f"{sorted(LITE_INDEXES)} or a server (uri=...)")
            require("milvus_lite.server_manager", "milvus")  # pymilvus alone cannot run embedded
            if path is None:
                tmp = tempfile.mkdtemp(prefix="memkit-milvus-")
            where = tmp if path is None else path
            assert where is not None  # a temporary directory when no path is given
            self._db = _db_path(where)
            self._where = self._db if path is not None else "a temporary milvus-lite database"
            self.client = self._connect_embedded(tmp)
        else:
            if path is not None:
                raise ConfigError("give milvus either path= (embedded milvus-lite) or uri= (a server), not both")
            if not isinstance(uri, str) or not uri.startswith(("http://", "https://", "tcp://")):
                raise ConfigError(f"milvus uri must look like http://host:19530 (or https://, tcp://), got {uri!r}; "
                                  "for an embedded database pass path='file.db'")
            self._where = uri.split("@")[-1]  # never print credentials given in the URI
            try:
                self.client = MilvusClient(uri=uri, token=token or "", db_name=db_name or "", timeout=timeout)
            except MilvusException as exc:
                raise ConfigError(f"could not connect to Milvus at {self._where}: {exc.message}; check that the "
                                  "server is reachable and the token is right") from exc
        self._finalizer = weakref.finalize(self, _release, self.client, self._db, self._coll, tmp)
        self._finalizer.atexit = False  # see _at_exit
        try:
            self._open_collection()
        except BaseException:
            self._finalizer()
            raise

    def _connect_embedded(self, tmp: str | None) -> MilvusClient:
        from milvus_lite.server_manager import server_manager_instance

        db = self._db
        assert db is not None
        with _OPEN_LOCK:
            entry = _OPEN.setdefault(db, [set(), db not in getattr(server_manager_instance, "_servers", {}), tmp])
            if self._coll in entry[0]:
                raise ConfigError(f"milvus collection {self.collection!r} in {db} is already open in this process; "
                                  "use that bank, or close() it first")
            entry[0].add(self._coll)
        try:
            return MilvusClient(uri=db)
        except Exception as exc:  # MilvusException, or OSError from milvus-lite's files
            _release(_NoClient(), db, self._coll, tmp)
            raise ConfigError(f"could not open milvus-lite database {db}: {getattr(exc, 'message', exc)}; milvus-lite "
                              "locks a database per process, so close the process or client holding it") from exc

    def params(self) -> dict[str, Any]:
        # Not path/uri/token/db_name: a loaded snapshot restores into a new embedded bank; secrets never go to disk.
        return {"collection": self.collection, "index_type": self.index_type, "index_params": dict(self.index_params),
                "search_params": dict(self.search_params), "batch_size": self.batch_size}

    def close(self) -> None:
        """Close the client; an embedded bank also stops the milvus-lite server it started. Idempotent."""
        with self._lock.write():
            self._closed = True
            self._finalizer()

    def _cl(self) -> MilvusClient:
        if self._closed:
            raise InvalidInputError("this milvus bank is closed; create it again with memkit.create_bank(...)")
        return self.client

    def _op(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call pymilvus; its errors become ConfigError naming the collection and where it lives."""
        try:
            return fn(*args, **kwargs)
        except MilvusException as exc:
            raise ConfigError(f"milvus {what} on collection {self.collection!r} at {self._where} failed: {exc.message}"
                              "; check that the server is reachable and nothing else changed the collection") from exc

    # ------------------------------------------------------------------ collection
    @property
    def collection_name(self) -> str:
        """The Milvus collection this bank writes (the given name mapped to Milvus's alphabet)."""
        return self._coll

    def milvus_metric(self) -> str:
        """The Milvus metric type of this bank (L2 or IP; cosine is IP on normalised vectors)."""
        return "L2" if self.metric == "l2" else "IP"

    def _create(self) -> None:
        cl = self._cl()
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID, DataType.INT64, is_primary=True)
        schema.add_field(VEC, DataType.FLOAT_VECTOR, dim=self.dim)
        self._op("create_collection", cl.create_collection, self._coll, schema=schema, consistency_level="Strong",
                 properties={METRIC_PROP: self.metric})
        self._index_and_load()
        self._ids, self._dirty = set(), False

    def _index_and_load(self) -> None:
        # Not create_collection(index_params=...): pymilvus then waits for the index with AllocTimestamp, which
        # milvus-lite lacks (it logs an error) and a 0.5 s sleep. An empty collection's index needs no wait.
        cl = self._cl()
        index = cl.prepare_index_params()
        index.add_index(field_name=VEC, index_type=self.index_type, metric_type=self.milvus_metric(),
                        params=dict(self.index_params))
        self._op("create_index", cl.create_index, self._coll, index, sync=False)
        self._op("load_collection", cl.load_collection, self._coll)

    def _open_collection(self) -> None:
        cl = self._cl()
        if not self._op("has_collection", cl.has_collection, self._coll):
            self._create()
            return
        info = self._op("describe_collection", cl.describe_collection, self._coll)
        fields = {f.get("name"): f for f in info.get("fields", [])}
        pk, vec = fields.get(ID, {}), fields.get(VEC, {})
        where = f"milvus collection {self._coll!r} at {self._where}"
        if not (pk.get("is_primary") and pk.get("type") == DataType.INT64 and vec.get("type") == DataType.FLOAT_VECTOR
                and not info.get("auto_id")):
            raise ConfigError(f"{where} is not a memkit collection (it needs an INT64 primary key 'id' without "
                              "auto_id and a FLOAT_VECTOR field 'vector'); use another collection")
        names = self._op("list_indexes", cl.list_indexes, self._coll, field_name=VEC)
        if not names:  # e.g. a creation interrupted before its index: finish it
            self._index_and_load()
            names = self._op("list_indexes", cl.list_indexes, self._coll, field_name=VEC)
        index = self._op("describe_index", cl.describe_index, self._coll, names[0])
        dim, stored = int(vec.get("params", {}).get("dim", -1)), (info.get("properties") or {}).get(METRIC_PROP)
        if (dim != self.dim or index.get("metric_type") != self.milvus_metric()
                or stored not in (None, self.metric) or (stored is None and self.metric == "cosine")):
            raise ConfigError(f"{where} holds dim={dim}, metric_type={index.get('metric_type')}, memkit metric="
                              f"{stored!r}, but dim={self.dim}, metric={self.metric!r} was asked for; pass the "
                              "matching dim and metric, or another collection")
        if index.get("index_type") != self.index_type:
            raise ConfigError(f"{where} has index_type={index.get('index_type')!r}, not {self.index_type!r}; pass "
                              "that index_type, or another collection")
        self._op("load_collection", cl.load_collection, self._coll)
        ids = self._scan_ids()
        self._ids = set(ids.tolist()) if self.local else set()
        self._next_id = int(ids.max()) + 1 if len(ids) else 0

    def _scan_ids(self) -> np.ndarray:
        """Every stored id, from the server: one query for milvus-lite (it has no 16,384-row result window,
        and its query_iterator needs AllocTimestamp, which it does not implement), query_iterator on a server."""
        if self.local:
            rows = self._op("query", self._cl().query, self._coll, filter=f"{ID} >= 0", output_fields=[ID])
            return np.fromiter((r[ID] for r in rows), np.int64, count=len(rows))
        it = self._op("query_iterator", self._cl().query_iterator, self._coll, batch_size=4096, filter="",
                      output_fields=[ID], consistency_level="Strong")
        chunks = []
        try:
            while rows := self._op("query_iterator", it.next):
                chunks.append(np.fromiter((r[ID] for r in rows), np.int64, count=len(rows)))
        finally:
            it.close()
        return np.concatenate(chunks) if chunks else np.empty(0, np.int64)

    def _flush(self) -> None:
        with self._flush_lock:  # several readers may find the bank dirty at once; one flush is enough
            if self._dirty:
                self._op("flush", self._cl().flush, self._coll)
                self._dirty = False

    # ------------------------------------------------------------------ hooks
    def _add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        step = max(1, min(self.batch_size, REQUEST_BYTES // (4 * self.dim + 16)))
        cl = self._cl()
        for s in range(0, len(ids), step):
            rows = [{ID: i, VEC: v} for i, v in zip(ids[s:s + step].tolist(), vectors[s:s + step].tolist())]
            self._op("insert", cl.insert, self._coll, rows)
            if self.local:
                self._ids.update(ids[s:s + step].tolist())
                self._dirty = True

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k > MAX_TOPK:
            raise InvalidInputError(f"k={k} is more than Milvus returns per query ({MAX_TOPK:,}); ask for fewer")
        if self.local and self._dirty:
            self._flush()
        m = queries.shape[0]
        scores = np.full((m, k), -np.inf, np.float32)  # (m, k)
        out = np.full((m, k), -1, np.int64)  # (m, k)
        params = {"metric_type": self.milvus_metric(), "params": dict(self.search_params)}
        step = max(1, min(self.batch_size, REQUEST_BYTES // (4 * self.dim)))
        cl = self._cl()
        for s in range(0, m, step):
            res = self._op("search", cl.search, self._coll, data=queries[s:s + step].tolist(), limit=k,
                           anns_field=VEC, search_params=params, output_fields=[ID], consistency_level="Strong")
            for row, hits in enumerate(res, start=s):
                n = min(len(hits.ids), k)
                if n:
                    d = np.asarray(hits.distances[:n], np.float32)  # (n,)
                    scores[row, :n] = -d if self.metric == "l2" else d  # L2 is squared: -d like every memkit bank
                    out[row, :n] = hits.ids[:n]
        return scores, out

    def _remove(self, ids: np.ndarray) -> int:
        cl = self._cl()
        for s in range(0, len(ids), GET_BATCH):
            self._op("delete", cl.delete, self._coll, ids=ids[s:s + GET_BATCH].tolist())
        if self.local:
            self._ids.difference_update(ids.tolist())
            self._dirty = True
        return len(ids)

    def _fetch(self, ids: np.ndarray, field: str) -> dict[int, Any]:
        out: dict[int, Any] = {}
        cl = self._cl()
        for s in range(0, len(ids), GET_BATCH):
            rows = self._op("get", cl.get, self._coll, ids=ids[s:s + GET_BATCH].tolist(), output_fields=[ID, field],
                            consistency_level="Strong")
            out.update((int(r[ID]), r[field]) for r in rows)
        return out

    def _contains(self, ids: np.ndarray) -> np.ndarray:
        self._cl()  # raises once closed
        if self.local:
            return np.fromiter((int(i) in self._ids for i in ids), bool, count=len(ids))
        return np.isin(ids, np.fromiter(self._fetch(ids, ID), np.int64))

    def _count(self) -> int:
        self._cl()  # raises once closed
        if self.local:
            return len(self._ids)
        rows = self._op("count", self._cl().query, self._coll, filter="", output_fields=["count(*)"],
                        consistency_level="Strong")
        return int(rows[0]["count(*)"])

    def _all_ids(self) -> np.ndarray:
        self._cl()  # raises once closed
        if self.local:
            return np.fromiter(self._ids, np.int64, count=len(self._ids))
        return self._scan_ids()

    def _get(self, ids: np.ndarray) -> np.ndarray:
        by_id = self._fetch(ids, VEC)
        return np.asarray([by_id[int(i)] for i in ids], np.float32).reshape(len(ids), self.dim)  # (n, dim)

    def _reset(self) -> None:
        self._op("drop_collection", self._cl().drop_collection, self._coll)
        self._create()

    # ------------------------------------------------------------------ save / load
    def _save_files(self, directory: Path) -> None:
        with self._flush_lock:  # durable at this point too: the embedded database file or the server collection
            self._op("flush", self._cl().flush, self._coll)
            self._dirty = False
        ids = np.sort(self._all_ids())  # (n,)
        n = len(ids)
        info = {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "count": n, "metric": self.metric,
                "collection": self.collection}
        if n == 0:  # numpy cannot memory-map an empty array
            np.save(directory / IDS_FILE, ids)
            np.save(directory / VEC_FILE, np.empty((0, self.dim), np.float32))
        else:
            np.save(directory / IDS_FILE, ids)
            vecs = np.lib.format.open_memmap(directory / VEC_FILE, mode="w+", dtype=np.float32, shape=(n, self.dim))
            for s in range(0, n, 4 * GET_BATCH):
                part = ids[s:s + 4 * GET_BATCH]
                by_id = self._fetch(part, VEC)
                if len(by_id) != len(part):
                    raise InvalidInputError("the collection changed while it was being saved; save again when no "
                                            "other client writes to it")
                vecs[s:s + len(part)] = [by_id[int(i)] for i in part]
            vecs.flush()
            del vecs
        (directory / INFO_FILE).write_text(json.dumps(info, indent=2))

    @staticmethod
    def _read_snapshot(directory: Path, dim: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Validated (ids, vectors) of a snapshot, memory-mapped; never unpickles anything."""
        try:
            info = json.loads((directory / INFO_FILE).read_text())
            ids = np.load(directory / IDS_FILE, mmap_mode="r", allow_pickle=False)
            vecs = np.load(directory / VEC_FILE, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CorruptFileError(f"milvus snapshot in {directory} is unreadable ({str(exc)[:200]})") from exc
        if not isinstance(info, dict) or info.get("format") != SNAPSHOT_FORMAT or info.get("version") != SNAPSHOT_VERSION:
            raise CorruptFileError(f"{directory / INFO_FILE} is not a version-{SNAPSHOT_VERSION} milvus snapshot")
        n = info.get("count")
        if info.get("metric") != metric or ids.dtype != np.int64 or ids.shape != (n,) or vecs.dtype != np.float32 \
                or vecs.shape != (n, dim):
            raise CorruptFileError(f"milvus snapshot in {directory} has ids {ids.dtype}{ids.shape}, vectors "
                                   f"{vecs.dtype}{vecs.shape} and metric {info.get('metric')!r}; expected {n} int64 "
                                   f"ids, ({n}, {dim}) float32 and metric {metric!r}")
        if n and (ids.min() < 0 or len(np.unique(ids)) != n):
            raise CorruptFileError(f"milvus snapshot in {directory} has negative or duplicate ids")
        return ids, vecs

    @classmethod
    def _load_files(cls, directory: Path, manifest: dict[str, Any], *, mmap: bool = False) -> BaseBank:
        ids, vecs = cls._read_snapshot(directory, manifest["dim"], manifest["metric"])  # mmap: loads normally
        bank = cls(dim=manifest["dim"], metric=manifest["metric"], **manifest["params"])
        try:
            with bank._lock.write():
                bank._fill(ids, vecs)
        except BaseException:
            bank.close()
            raise
        return bank

    def _fill(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        step = max(self.batch_size, 4096)
        for s in range(0, len(ids), step):
            chunk = np.ascontiguousarray(vecs[s:s + step], np.float32)  # (b, dim)
            if not np.isfinite(chunk).all():
                raise CorruptFileError("the milvus snapshot holds NaN or inf vectors")
            self._add(chunk, np.asarray(ids[s:s + step], np.int64))
        self._next_id = max(self._next_id, int(ids.max()) + 1 if len(ids) else 0)

    @classmethod
    def restore(cls, directory: str | os.PathLike[str], **params: Any) -> MilvusBank:
        """Restore a saved snapshot into the collection ``params`` name (``uri=`` for a server, ``path=``).

        The target collection must be new or empty, so nothing in it is overwritten by accident.
        """
        d = save_path(directory, "restoring a milvus snapshot")
        manifest = read_manifest(d)
        if manifest["backend"] != cls.name:
            raise CorruptFileError(f"{d} holds a {manifest['backend']!r} bank, not a milvus snapshot")
        ids, vecs = cls._read_snapshot(d, manifest["dim"], manifest["metric"])
        bank = cls(dim=manifest["dim"], metric=manifest["metric"], **{**manifest["params"], **params})
        if len(bank):
            bank.close()
            raise ConfigError(f"milvus collection {bank.collection!r} is not empty; restore into a new collection")
        with bank._lock.write():
            bank._fill(ids, vecs)
        bank._next_id = max(bank._next_id, int(manifest.get("next_id", 0)))
        return bank


class _NoClient:
    """Stands in for a client that was never created, so a failed open releases its registration."""

    def close(self) -> None:
        pass

    def drop_collection(self, _: str) -> None:
        pass
