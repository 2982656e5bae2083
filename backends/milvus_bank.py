"""``milvus``: a bank in a Milvus collection, embedded (milvus-lite) by default or on a Milvus server.

What it follows (the Milvus documentation, milvus.io/docs, 2.6/3.0): "Run Milvus Lite Locally" (a local
``*.db`` URI makes ``pymilvus.MilvusClient`` start milvus-lite, and the same client code reaches Milvus
Standalone or Distributed when the URI names a server), "Create Collection" (an explicit schema),
"Index Vector Fields" and "FLAT" (the exact brute-force index), "Delete Entities" (by primary key),
"Consistency Level" (``Session``: a client reads its own writes; ``Strong``: a read sees every write
acknowledged before it, from any client), "Metric Types" (``L2``
returns the *squared* distance) and "Milvus Limits" (names of letters, digits and ``_``, at most 255 of
them; dim <= 32,768; top-k and nq <= 16,384; 64 MB per insert or search request).

One code path serves both modes; only the ``MilvusClient`` URI differs:

* embedded (default): milvus-lite 3.x, a pure-Python engine that pymilvus starts *inside this process*
  (a gRPC server on a free 127.0.0.1 port, served by background threads; no child process). ``path=None``
  keeps the database in a private temporary directory removed by ``close()``; ``path="mem.db"`` (or a
  directory, which gets a ``milvus.db`` inside) persists it and reopens as the same bank. milvus-lite
  locks a database per process; ``close()`` (or garbage collection) stops the server memkit started.
* server: ``uri="http://host:19530"`` (with ``token=``, ``db_name=``, ``timeout=``), or the URI
  ``milvus://[user:password@]host:19530/collection``. Tested against a real Milvus 2.3.5 standalone server (the
  ``milvus`` pip package, started by the test suite: tests/test_milvus_server.py); docs/milvus.md says how to
  point memkit at a cluster and what was tested. Every request has a timeout (60 s unless ``timeout=`` says
  otherwise; loading a collection gets at least 300 s), and every server failure becomes a MemkitError that
  names the server and the fix (:mod:`memkit.backends.milvus_errors`). One writing bank per collection: an owner
  record checked on open (:mod:`memkit.backends.milvus_owner`); ``read_only=True`` opens readers beside it.

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
set and ``len``/``in``/``ids()`` cost nothing. On a server readers in other processes see the writer's changes,
so those ask the server (one round trip each). Acknowledged, on a server: an ``add``/``remove`` that returned;
the server has then written it to its log (rocksmq on the standalone server's disk, Pulsar or Kafka in a
cluster) and keeps it across a restart, flushed or not. An add that fails part-way returns no ids and deletes
its new rows again (:meth:`MilvusBank._store`); ``flush()`` and ``save`` seal segments into object storage.
milvus-lite scans rows it has not flushed yet row by row in Python (0.5 s per query over 16k x 384 here) but
flushed segments through numpy (9 ms): the embedded bank flushes before the first search after a write (about
5 ms for a few rows; its compaction keeps the segment count small). A server indexes growing data itself, so
nothing is flushed there until ``save`` or ``flush()``.

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

import json
import os
import re
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from pymilvus import DataType, MilvusClient

from memkit.backends import milvus_embedded, milvus_owner
from memkit.backends.milvus_errors import is_rpc_error, translate
from memkit.bank import BaseBank, read_manifest, require
from memkit.errors import ConfigError, CorruptFileError, InvalidInputError, MemkitError, ReadOnlyError
from memkit.files import save_path

__all__ = ["MilvusBank"]

ID, VEC, METRIC_PROP = "id", "vector", "memkit.metric"
IDS_FILE, VEC_FILE, INFO_FILE = "ids.npy", "vectors.npy", "milvus.json"
SNAPSHOT_FORMAT, SNAPSHOT_VERSION = "memkit-milvus-snapshot", 1
MAX_MILVUS_DIM = 32_768  # Milvus limit on a vector field's dim
MAX_TOPK = 16_384  # Milvus limit on top-k (and on queries per search request)
REQUEST_BYTES = 32 << 20  # half of a server's 64 MB per-request limit
GET_BATCH = 1024  # ids per get/delete request
SERVER_TIMEOUT = 60.0  # seconds per server request unless timeout= says otherwise (a frozen server must not hang us)
MIN_INDEX_ROWS = 1024  # Milvus 2.3 builds no index on a sealed segment with fewer rows (minSegmentNumRowsToEnableIndex)
LOAD_TIMEOUT = 300.0  # at least this long for loading a collection into the server's memory (not one request)
# index type -> (build parameters, search parameters) memkit passes on; values are integers checked below.
INDEXES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "FLAT": ((), ()), "AUTOINDEX": ((), ()),
    "HNSW": (("M", "efConstruction"), ("ef",)), "HNSW_SQ": (("M", "efConstruction"), ("ef",)),
    "IVF_FLAT": (("nlist",), ("nprobe",)), "IVF_SQ8": (("nlist",), ("nprobe",)),
    "IVF_PQ": (("nlist", "m", "nbits"), ("nprobe",)),
}
LITE_INDEXES = frozenset(INDEXES) - {"IVF_PQ"}  # what milvus-lite 3.x builds
BOUNDS = {"M": (2, 2048), "nbits": (1, 16)}  # anything else: 1..65536 (Milvus documents these ranges)

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


class MilvusBank(BaseBank):
    """A Milvus collection as a memkit bank: embedded milvus-lite, or a Milvus server through ``uri``.

    ``path``: embedded database (``None``: private and temporary). ``uri``/``token``/``db_name``: a Milvus server
    instead; ``timeout``: seconds per server request (default 60 on a server, none embedded). ``collection``:
    created if missing, reopened if it exists. ``index_type``, ``index_params``, ``search_params``: see the module
    docstring (FLAT = exact). ``batch_size``: rows per insert and queries per search request (further capped so a
    request stays under 32 MB). On a server a writing bank holds the collection's owner record
    (:mod:`memkit.backends.milvus_owner`): ``read_only=True`` opens a reader beside it (searches only), and
    ``take_over=True`` replaces the record of an owner known to be gone.
    """

    name = "milvus"
    path_is_dir = True  # milvus-lite's *.db is a directory
    exact = True  # FLAT (the default) is brute force in milvus-lite and on a server

    def __init__(self, *, dim: int, metric: str = "ip", path: str | os.PathLike[str] | None = None,
                 uri: str | None = None, token: str | None = None, db_name: str | None = None,
                 collection: str = "memkit", index_type: str = "FLAT", index_params: dict[str, int] | None = None,
                 search_params: dict[str, int] | None = None, batch_size: int = 4096,
                 timeout: float | None = None, read_only: bool = False, take_over: bool = False) -> None:
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
        if not isinstance(read_only, bool) or not isinstance(take_over, bool):
            raise ConfigError(f"milvus read_only and take_over are True or False, got {read_only!r}, {take_over!r}")
        self.collection, self._coll, self.batch_size = collection, _milvus_name(collection), batch_size
        self.local = uri is None
        self.timeout = float(timeout) if timeout is not None else (None if self.local else SERVER_TIMEOUT)
        self._closed, self._dirty, self._flush_lock = False, False, threading.Lock()
        self._ids: set[int] = set()
        self._db: str | None = None
        self._db_name, self._secrets = db_name, [token or ""]
        self._unsettled: set[int] = set()  # ids of a failed add that may be on the server: deleted before the next call
        self._settle_lock = threading.Lock()
        self._owner: list[Any] = []  # [owner record, timeout] while this bank holds the collection (server, writer)
        self.consistency = "Strong"  # until open: see the end of __init__
        self._deleted = False  # a delete since the last strong read: pymilvus's Session misses deletes on 2.3
        self.created = False
        tmp: str | None = None
        if self.local:
            if read_only or take_over:
                raise ConfigError("milvus read_only= and take_over= apply to a server (uri=...); an embedded database "
                                  "has one writer by construction")
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
            self._db = milvus_embedded.db_path(where)
            self._where = self._db if path is not None else "a temporary milvus-lite database"
            self.client = milvus_embedded.connect(self._db, self._coll, self.collection, tmp)
        else:
            if path is not None:
                raise ConfigError("give milvus either path= (embedded milvus-lite) or uri= (a server), not both")
            if not isinstance(uri, str) or not uri.startswith(("http://", "https://", "tcp://")):
                raise ConfigError(f"milvus uri must look like http://host:19530 (or https://, tcp://), got {uri!r}; "
                                  "for an embedded database pass path='file.db'")
            self._where = uri.split("@")[-1]  # never print credentials given in the URI
            parsed = urlparse(uri)
            self._secrets += [parsed.password or "", f"{parsed.username}:{parsed.password}" if parsed.password else ""]
            try:
                self.client = MilvusClient(uri=uri, token=token or "", db_name=db_name or "", timeout=self.timeout)
            except Exception as exc:
                if not is_rpc_error(exc):
                    raise
                raise self._translate(exc, "connect") from None  # the chain may hold the token: not kept
        self._finalizer = weakref.finalize(self, milvus_embedded.release, self.client, self._db, self._coll, tmp,
                                           self._owner)
        self._finalizer.atexit = False  # see milvus_embedded's exit handler
        try:
            if not self.local and not read_only:
                record = milvus_owner.acquire(self, coll=self._coll, where=self._where, take_over=take_over)
                self._owner += [record, self.timeout]
            self._open_collection(create=not read_only)
        except BaseException:
            self._finalizer()
            raise
        self.read_only = read_only
        # A writer reads its own writes ("Session": a search waits only for this client's last write to be
        # visible, ~3 ms otherwise); a reader must see the writer's ("Strong": every search waits for the
        # server's next time tick, ~200 ms by default).
        self.consistency = "Strong" if read_only else "Session"
        self.count_before_search = self.local  # a server pads short results itself: no count(*) per search

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

    def _translate(self, exc: BaseException, what: str) -> MemkitError:
        return translate(exc, what=what, collection=self.collection, where=self._where, timeout=self.timeout,
                         secrets=self._secrets, db_name=self._db_name)

    def _op(self, what: str, fn: Any, *args: Any, _timed: bool = True, _slow: bool = False, **kwargs: Any) -> Any:
        """Call pymilvus (with the bank's timeout on a server; ``_slow``: at least LOAD_TIMEOUT, for loading a
        collection); its errors become MemkitErrors that name the collection, where it lives and what to do
        (:mod:`memkit.backends.milvus_errors`)."""
        if _timed and not self.local:
            kwargs["timeout"] = max(self.timeout or 0.0, LOAD_TIMEOUT) if _slow else self.timeout
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not is_rpc_error(exc):
                raise
            err = self._translate(exc, what)
            raise err from (None if any(s and s in str(exc) for s in self._secrets) else exc)

    def _level(self) -> str:
        """The consistency level of the next read. ``Session`` waits for this client's last insert, but pymilvus
        3.0.2 on a Milvus 2.3 server does not wait for its deletes (tested: a search, get or count right after a
        delete still saw the row 9 times in 10), so the first read after a delete or upsert is ``Strong``."""
        return "Strong" if self._deleted else self.consistency

    def _read(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A read through :meth:`_op` at :meth:`_level`; a strong read makes earlier deletes visible to later ones."""
        level = self._level()
        out = self._op(what, fn, *args, consistency_level=level, **kwargs)
        if level == "Strong":
            self._deleted = False
        return out

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """``self.client.<method>(*args, **kwargs)`` through :meth:`_op`."""
        return self._op(what, getattr(self._cl(), method), *args, **kwargs)

    def _check_writable(self, op: str) -> None:
        if self.read_only:
            raise ReadOnlyError(f"this milvus bank on collection {self.collection!r} at {self._where} was opened with "
                                f"read_only=True; {op} is refused. Write through the bank that owns the collection")

    def flush(self) -> None:
        """Seal the rows added so far into segments: a server writes them to its object storage and builds the
        index on them (embedded: milvus-lite writes its files). Not needed for durability on a server: an ``add``
        that returned was acknowledged by the server, which keeps it in its write-ahead log across a restart
        (see docs/milvus.md). ``save`` flushes too."""
        with self._lock.write(), self._flush_lock:
            self._call("flush", "flush", self._coll)
            self._dirty = False

    def index_progress(self) -> tuple[int, int]:
        """(rows that searches reach through the index, rows stored). On a server the first counts rows of sealed,
        indexed segments that the query nodes have loaded: a flushed segment is searched through the index only
        after it is built *and* handed to the query nodes (~20 s after ``flush()`` here); until then its rows
        are searched as growing data (for a non-FLAT index, through Milvus's interim IVF index). A sealed segment
        under MIN_INDEX_ROWS rows gets no index (Milvus searches it by brute force) and counts as done, and so does
        every sealed segment under FLAT (which has no index to build: the query node reports none). Embedded:
        milvus-lite's own report."""
        cl = self._cl()
        if not self.local:
            segs = self._op("list_loaded_segments", cl.list_loaded_segments, self._coll)
            flat = self.index_type == "FLAT"  # a sealed segment is searched exactly as it is: no index to build
            done = sum(int(g.num_rows) for g in segs if getattr(g.state, "name", str(g.state)) != "Growing"
                       and (flat or g.index_id or g.num_rows < MIN_INDEX_ROWS))
            return done, len(self)
        names = self._op("list_indexes", cl.list_indexes, self._coll, field_name=VEC)
        info = self._op("describe_index", cl.describe_index, self._coll, names[0]) if names else {}
        return int(info.get("indexed_rows", 0)), int(info.get("total_rows", 0))

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
        self._op("load_collection", cl.load_collection, self._coll, _slow=True)

    def _open_collection(self, *, create: bool = True) -> None:
        cl = self._cl()
        if not self._op("has_collection", cl.has_collection, self._coll):
            if not create:
                raise ConfigError(f"milvus collection {self._coll!r} does not exist at {self._where}; a read_only bank "
                                  "opens an existing collection: create it with a writing bank first")
            self._create()
            self.created = True  # this bank made the collection (so a benchmark may drop it again)
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
        self._op("load_collection", cl.load_collection, self._coll, _slow=True)
        ids = self._scan_ids()
        self._ids = set(ids.tolist()) if self.local else set()
        self._next_id = int(ids.max()) + 1 if len(ids) else 0

    def _scan_ids(self) -> np.ndarray:
        """Every stored id, from the server: one query for milvus-lite (it has no 16,384-row result window,
        and its query_iterator needs AllocTimestamp, which it does not implement), query_iterator on a server."""
        if self.local:
            rows = self._op("query", self._cl().query, self._coll, filter=f"{ID} >= 0", output_fields=[ID])
            return np.fromiter((r[ID] for r in rows), np.int64, count=len(rows))
        it = self._read("query_iterator", self._cl().query_iterator, self._coll, batch_size=4096, filter="",
                        output_fields=[ID])
        chunks = []
        try:
            while rows := self._op("query_iterator", it.next, _timed=False):
                chunks.append(np.fromiter((r[ID] for r in rows), np.int64, count=len(rows)))
        finally:
            it.close()
        return np.concatenate(chunks) if chunks else np.empty(0, np.int64)

    def _flush(self) -> None:
        with self._flush_lock:  # several readers may find the bank dirty at once; one flush is enough
            if self._dirty:
                self._op("flush", self._cl().flush, self._coll)
                self._dirty = False

    # ------------------------------------------------------------------ writes on a server
    auto_ids_unchecked = True  # one writer per collection (the owner record): auto ids are new

    def _store(self, vecs: np.ndarray, ids: np.ndarray, present: np.ndarray) -> None:
        """On a server an add is all or nothing for new ids: if a request fails part-way, the call's new rows that
        may have reached the server are deleted again (at once, or before the bank's next request if the server
        cannot be reached) and its ids are not returned; an id that was already stored keeps its old or its new
        vector. Replacing is one ``upsert`` (never a delete, then an insert)."""
        if self.local:
            super()._store(vecs, ids, present)
            return
        self._settle()
        self._write(vecs, ids, ~present)

    def _write(self, vecs: np.ndarray, ids: np.ndarray, fresh: np.ndarray) -> None:
        step = max(1, min(self.batch_size, REQUEST_BYTES // (4 * self.dim + 16)))
        cl = self._cl()
        for s in range(0, len(ids), step):
            rows = [{ID: i, VEC: v} for i, v in zip(ids[s:s + step].tolist(), vecs[s:s + step].tolist())]
            replace = not fresh[s:s + step].all()
            self._deleted |= replace  # an upsert deletes the old row
            try:
                self._op("upsert" if replace else "insert", cl.upsert if replace else cl.insert, self._coll, rows)
            except MemkitError as exc:
                sent = ids[:s + step][fresh[:s + step]].tolist()
                self._unsettled.update(sent)
                undone = "deleted again"
                try:
                    self._settle()
                except MemkitError:
                    undone = "deleted before this bank's next request that reaches the server"
                raise type(exc)(f"{exc}. None of this add's {len(ids)} ids were returned; its {len(sent)} new rows "
                                f"that may have reached the server are {undone}") from exc

    def _settle(self) -> None:
        """Delete the rows a failed add may have left (see :meth:`add`) before anything reads or writes."""
        if not self._unsettled:
            return
        with self._settle_lock:
            left = np.asarray(sorted(self._unsettled), np.int64)
            for s in range(0, len(left), GET_BATCH):
                part = left[s:s + GET_BATCH]
                self._deleted = True
                self._op("delete (undoing a failed add)", self._cl().delete, self._coll, ids=part.tolist())
                self._unsettled.difference_update(part.tolist())

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
        if k > MAX_TOPK and not self.count_before_search:
            k = max(1, min(k, self._count()))  # a bank holding fewer rows answers a large k (padded)
        if k > MAX_TOPK:
            raise InvalidInputError(f"k={k} is more than Milvus returns per query ({MAX_TOPK:,}); ask for fewer")
        if self.local and self._dirty:
            self._flush()
        self._settle()
        m = queries.shape[0]
        scores = np.full((m, k), -np.inf, np.float32)  # (m, k)
        out = np.full((m, k), -1, np.int64)  # (m, k)
        params = {"metric_type": self.milvus_metric(), "params": dict(self.search_params)}
        step = max(1, min(self.batch_size, REQUEST_BYTES // (4 * self.dim)))
        cl = self._cl()
        for s in range(0, m, step):
            res = self._read("search", cl.search, self._coll, data=queries[s:s + step].tolist(), limit=k,
                             anns_field=VEC, search_params=params, output_fields=[ID])
            for row, hits in enumerate(res, start=s):
                n = min(len(hits.ids), k)
                if n:
                    d = np.asarray(hits.distances[:n], np.float32)  # (n,)
                    scores[row, :n] = -d if self.metric == "l2" else d  # L2 is squared: -d like every memkit bank
                    out[row, :n] = hits.ids[:n]
        return scores, out

    def _remove(self, ids: np.ndarray) -> int:
        self._settle()
        cl = self._cl()
        for s in range(0, len(ids), GET_BATCH):
            self._deleted = True
            self._op("delete", cl.delete, self._coll, ids=ids[s:s + GET_BATCH].tolist())
        if self.local:
            self._ids.difference_update(ids.tolist())
            self._dirty = True
        return len(ids)

    def _fetch(self, ids: np.ndarray, field: str) -> dict[int, Any]:
        self._settle()
        out: dict[int, Any] = {}
        cl = self._cl()
        for s in range(0, len(ids), GET_BATCH):
            rows = self._read("get", cl.get, self._coll, ids=ids[s:s + GET_BATCH].tolist(), output_fields=[ID, field])
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
        self._settle()
        rows = self._read("count", self._cl().query, self._coll, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def _all_ids(self) -> np.ndarray:
        self._cl()  # raises once closed
        if self.local:
            return np.fromiter(self._ids, np.int64, count=len(self._ids))
        self._settle()
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
