"""``disk``: an exact bank whose vectors and ids live on disk, with crash-safe writes.

What it implements: exact top-k search (the same ids as numpy brute force) over vectors that stay
on disk. A search memory-maps the vector file and streams it in blocks of ``block_rows`` rows:
one float32 matmul per block and a running top-k merge, then the block's pages are dropped from
the process (``madvise(MADV_DONTNEED)``), so resident memory is bounded by one block and one
score tile whatever the bank's size. Cost: every search reads every stored row (O(rows * dim)
per query batch; batch your queries, the block is read once for all of them).

On-disk layout of a bank directory (``path``; ``path=None`` makes a temporary directory that
``close()`` removes)::

    bank.sqlite   SQLite via sqlite-utils, WAL journal, synchronous=FULL. Source of truth.
                  rows(id INTEGER PRIMARY KEY, row UNIQUE)  memkit id -> row of the vector file
                  free(row INTEGER PRIMARY KEY)              rows freed by remove(), reused by add()
                  meta(key, value)                            format, version, dim, metric,
                                                              n_rows (committed rows), next_id
    vectors.f32   raw float32, row r at byte r * dim * 4 (memory-mapped for search and get)
    rowids.i64    raw int64 id of each row, -1 for a free row (a search-side copy of ``rows``)
    bank.lock     flock'ed while a bank object has the directory open (one writer at a time)

Durability (everything ``add()`` or ``remove()`` returned survives a kill -9 or a power loss):

* ``add``: the vectors and their row ids are written into free or new rows and ``fdatasync``'ed
  *before* the single SQLite transaction that maps the ids to the rows and raises ``n_rows``.
  Until that commit the rows are free or beyond ``n_rows``; on reopen rows past ``n_rows`` are
  truncated away and every free row is marked -1 again, so nothing half-written is ever visible.
  Replacing an existing id (re-adding it) removes the old mapping in the same transaction and
  never writes into a row that the committed state still uses: a crash leaves the old vector or
  the new one, never a mix.
* ``remove``: one committed transaction moves the rows to ``free``; ``rowids.i64`` is marked
  afterwards (a crash in between is repaired on reopen from ``free``).
* Cost: two ``fdatasync`` calls plus one SQLite commit (a WAL fsync) per ``add`` and one commit
  per ``remove``; add in batches. Reopening costs O(free rows) plus ``count(*)``.

Freed rows are reused, lowest first, by later adds; the vector file never shrinks (only
``reset()`` truncates it), and a search scans every row up to the high-water mark, free or not.
``save(path)`` writes a normal memkit bank directory (a compacted ``VACUUM INTO`` copy of the
database plus the two row files, checksummed by the manifest); ``memkit.load_bank`` opens a
private copy in a temporary directory (removed on ``close()``), or with ``mmap=True`` a
read-only view of the saved directory itself. To keep working on a bank in place, reopen its
directory: ``memkit.create_bank("disk:///data/mem", dim=384)``.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import sqlite_utils

from memkit.bank import BaseBank
from memkit.errors import ConfigError, CorruptFileError, InvalidInputError
from memkit.files import MANIFEST
from memkit.paths import check_dir_target, user_path
from memkit.spill import OWNER_FILE, Kind, make_spill_dir

try:  # POSIX advisory lock: a second opener gets a clear error instead of corrupting the bank
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["DiskBank"]

DB_FILE, VEC_FILE, IDS_FILE, LOCK_FILE = "bank.sqlite", "vectors.f32", "rowids.i64", "bank.lock"
DISK_FORMAT, DISK_VERSION = "memkit-disk", 1
# A bank without a path, and load_bank's private copy, live in a private temporary directory with an owner
# record (memkit.spill): removed on close and at exit, and by the next temporary bank if a signal killed its process.
TEMP_DIR = Kind("memkit-disk-", "memkit-disk-temp",
                re.compile(r"bank\.sqlite(-wal|-shm|-journal)?|bank\.lock|vectors\.f32|rowids\.i64"))
TILE = 1 << 21  # score elements per (queries x rows) tile: 8 MiB of float32
COPY_CHUNK = 8 << 20


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _runs(rows: np.ndarray) -> list[np.ndarray]:
    """Split positions of ``rows`` (sorted by row) into runs of consecutive row numbers."""
    order = np.argsort(rows, kind="stable")
    breaks = np.flatnonzero(np.diff(rows[order]) != 1) + 1
    return np.split(order, breaks)


def _copy_prefix(src: Path, dst: Path, nbytes: int) -> None:
    with src.open("rb") as fi, dst.open("wb") as fo:
        left = nbytes
        while left:
            buf = fi.read(min(COPY_CHUNK, left))
            if not buf:
                raise CorruptFileError(f"{src} is shorter than its committed rows; the bank is damaged")
            fo.write(buf)
            left -= len(buf)


def _close_maps(*maps: mmap.mmap) -> None:
    for mm in maps:
        try:
            mm.close()
        except BufferError:  # a view is still referenced (e.g. by a traceback): the GC unmaps it
            pass


def temp_dir() -> str:
    """A new private temporary directory for a disk bank (leftovers of killed processes swept first)."""
    return make_spill_dir(Path(tempfile.gettempdir()), TEMP_DIR)


class _Handles:
    """Open files of one bank; a finalizer closes them (and removes a temporary dir) exactly once."""

    def __init__(self) -> None:
        self.conn: sqlite3.Connection | None = None
        self.fds: list[int] = []
        self.tmpdir: str | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        for fd in self.fds:
            os.close(fd)  # closing the lock fd releases the flock
        self.fds = []
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


class DiskBank(BaseBank):
    """Exact search over vectors kept on disk (SQLite + memory-mapped float32 rows); crash-safe.

    ``path``: the bank directory (created if missing, reopened if it holds a disk bank; a
    different dim or metric raises :class:`ConfigError`). ``None`` uses a temporary directory
    that ``close()`` removes. ``block_rows``: rows per streamed search block (RAM per search is
    about ``block_rows * dim * 4`` bytes plus an 8 MiB score tile and its index array).
    """

    name = "disk"
    exact = True
    path_is_dir = True

    def __init__(self, *, dim: int, metric: str = "ip", path: str | os.PathLike[str] | None = None,
                 block_rows: int = 16384) -> None:
        if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or block_rows < 1:
            raise ConfigError(f"disk block_rows must be a positive integer, got {block_rows!r}")
        super().__init__(dim=dim, metric=metric)
        self._setup(path, int(block_rows), read_only=False)

    def _setup(self, path: str | os.PathLike[str] | None, block_rows: int, *, read_only: bool,
               private: bool = False) -> None:
        """Open the bank at ``path`` (None: a new private temporary directory); ``private``: ``path`` is such a
        directory already (load_bank's copy), removed with the bank."""
        self.block_rows = block_rows
        self._h = _Handles()
        self._finalizer = weakref.finalize(self, self._h.close)
        self._db_lock = threading.Lock()  # one SQLite connection, used by one thread at a time
        self._tls = threading.local()  # carries a replace (remove + add) into one transaction
        if path is None:
            path, private = temp_dir(), True
        if private:
            self._h.tmpdir = str(path)
        self.path = user_path(path, "disk bank path", error=ConfigError)
        self._open(read_only=read_only)
        self.read_only = read_only

    def params(self) -> dict[str, Any]:
        return {"block_rows": self.block_rows}  # not the path: a loaded copy lives elsewhere

    def close(self) -> None:
        """Close the database and files (removing a temporary directory). Idempotent."""
        with self._lock.write():
            self._finalizer()

    # ------------------------------------------------------------------ opening
    def _open(self, *, read_only: bool) -> None:
        d, h = self.path, self._h
        try:
            if read_only:
                uri = f"file:{quote(str(d / DB_FILE))}?mode=ro&immutable=1"
                h.conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
            else:
                self._prepare_dir(d)
                h.conn = sqlite3.connect(d / DB_FILE, check_same_thread=False, isolation_level=None)
            db = sqlite_utils.Database(h.conn)
            if not read_only:
                db.enable_wal()
                db.execute("PRAGMA synchronous=FULL")
                self._ensure_schema(db)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            self._check_meta(meta)
            flags = os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT
            self._vfd = os.open(d / VEC_FILE, flags, 0o644)
            h.fds.append(self._vfd)
            self._ifd = os.open(d / IDS_FILE, flags, 0o644)
            h.fds.append(self._ifd)
            if os.fstat(self._vfd).st_size < self._n_rows * self._row_bytes:
                raise CorruptFileError(f"{d / VEC_FILE} is shorter than the {self._n_rows} committed rows")
            if not read_only:
                dfd = os.open(d, os.O_RDONLY)  # make the new files' directory entries durable too
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
                self._recover()
            elif os.fstat(self._ifd).st_size < self._n_rows * 8:
                raise CorruptFileError(f"{d / IDS_FILE} is shorter than the {self._n_rows} committed rows")
            self._live = int(db.execute("SELECT count(*) FROM rows").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            self._finalizer()
            raise CorruptFileError(f"{d / DB_FILE} is not a readable disk-bank database ({exc})") from exc
        except BaseException:
            self._finalizer()
            raise

    @property
    def n_rows(self) -> int:
        """Rows committed in the vector file (live and free)."""
        return self._n_rows

    def _prepare_dir(self, d: Path) -> None:
        check_dir_target(d, "disk bank path")  # a file there or on the way: ConfigError, nothing created
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create disk bank directory {str(d)!r}: {exc.strerror or exc}; give a "
                              "writable directory path") from exc
        if (d / MANIFEST).exists():
            raise ConfigError(f"{str(d)!r} is a saved bank (it has a {MANIFEST}); open it with "
                              "memkit.load_bank(path), which works on a copy and keeps the save intact")
        ours = {DB_FILE, VEC_FILE, IDS_FILE, LOCK_FILE, DB_FILE + "-wal", DB_FILE + "-shm"}
        if self._h.tmpdir is not None:
            ours.add(OWNER_FILE)  # the owner record of memkit's private temporary directory
        stray = sorted(p.name for p in d.iterdir() if p.name not in ours)
        if not (d / DB_FILE).exists() and stray:
            raise ConfigError(f"{str(d)!r} is not empty and holds no disk bank (found {stray[:3]}); "
                              "use an empty or new directory, or an existing disk bank")
        fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        self._h.fds.append(fd)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise ConfigError(f"disk bank {str(d)!r} is already open (another process or bank object); "
                                  "close that one first") from exc

    def _ensure_schema(self, db: sqlite_utils.Database) -> None:
        if "meta" in db.table_names():
            return
        conn = db.conn
        conn.execute("BEGIN IMMEDIATE")
        db["meta"].create({"key": str, "value": str}, pk="key")
        db["rows"].create({"id": int, "row": int}, pk="id", not_null={"row"})
        db["rows"].create_index(["row"], unique=True)
        db["free"].create({"row": int}, pk="row")
        conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", [
            ("format", DISK_FORMAT), ("version", str(DISK_VERSION)), ("dim", str(self.dim)),
            ("metric", self.metric), ("n_rows", "0"), ("next_id", "0")])
        conn.execute("COMMIT")

    def _check_meta(self, meta: dict[str, str]) -> None:
        where = str(self.path)
        if meta.get("format") != DISK_FORMAT or meta.get("version") != str(DISK_VERSION):
            raise CorruptFileError(f"{where!r} holds format {meta.get('format')!r} version {meta.get('version')!r}; "
                                   f"this memkit reads {DISK_FORMAT!r} version {DISK_VERSION}")
        if meta.get("dim") != str(self.dim) or meta.get("metric") != self.metric:
            raise ConfigError(f"disk bank {where!r} was created with dim={meta.get('dim')}, "
                              f"metric={meta.get('metric')!r}, but dim={self.dim}, metric={self.metric!r} was "
                              "asked for; pass the matching dim and metric, or use another directory")
        try:
            self._n_rows, self._next_id = int(meta["n_rows"]), int(meta["next_id"])
        except (KeyError, ValueError) as exc:
            raise CorruptFileError(f"{where!r}: the disk bank's meta table is damaged ({exc!r})") from exc

    def _recover(self) -> None:
        """Drop rows past the committed count and re-mark free rows: undoes any interrupted write."""
        n = self._n_rows
        os.ftruncate(self._vfd, n * self._row_bytes)
        if os.fstat(self._ifd).st_size < n * 8:  # only if the file was damaged: rebuild from SQLite
            os.ftruncate(self._ifd, 0)
            os.ftruncate(self._ifd, n * 8)
            self._write_rowids(np.arange(n, dtype=np.int64), np.full(n, -1, np.int64))
            cur = self._h.conn.execute("SELECT row, id FROM rows")  # type: ignore[union-attr]
            while chunk := cur.fetchmany(65536):
                arr = np.asarray(chunk, np.int64)
                self._write_rowids(arr[:, 0], arr[:, 1])
        os.ftruncate(self._ifd, n * 8)
        free = np.asarray([r for (r,) in self._sql("SELECT row FROM free")], np.int64)
        self._write_rowids(free, np.full(len(free), -1, np.int64))

    # ------------------------------------------------------------------ low-level I/O
    @property
    def _row_bytes(self) -> int:
        return self.dim * 4

    def _conn(self) -> sqlite3.Connection:
        if self._h.conn is None:
            raise InvalidInputError("this disk bank is closed; reopen it with memkit.create_bank('disk:///<dir>')")
        return self._h.conn

    def _sql(self, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._db_lock:
            return self._conn().execute(query, args).fetchall()

    def _write_rows(self, fd: int, rows: np.ndarray, data: np.ndarray, width: int) -> None:
        for idx in _runs(rows):
            if not len(idx):
                continue
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            run = data[lo:hi] if (np.diff(idx) == 1).all() else data[idx]  # in-order run: a view, no copy
            _pwrite_all(fd, np.ascontiguousarray(run).data.cast("B"), int(rows[lo]) * width)

    def _write_rowids(self, rows: np.ndarray, ids: np.ndarray) -> None:
        if len(rows):
            self._write_rows(self._ifd, rows, ids.astype(np.int64), 8)

    def _maps(self, n: int) -> tuple[mmap.mmap, mmap.mmap]:
        vm = mmap.mmap(self._vfd, n * self._row_bytes, access=mmap.ACCESS_READ)
        im = mmap.mmap(self._ifd, n * 8, access=mmap.ACCESS_READ)
        return vm, im

    def _id_rows(self, ids: np.ndarray) -> np.ndarray:
        """(k, 2) array of (id, row) for those ``ids`` that are stored."""
        got = self._sql("SELECT id, row FROM rows WHERE id IN (SELECT value FROM json_each(?))",
                        (json.dumps(ids.tolist()),))
        return np.asarray(got, np.int64).reshape(-1, 2)

    # ------------------------------------------------------------------ hooks
    def add(self, vectors: Any, ids: Any = None) -> np.ndarray:
        """As :meth:`BaseBank.add`; replacing existing ids happens in the same transaction as the add."""
        self._tls.replacing, self._tls.pending = True, None
        try:
            return super().add(vectors, ids)
        finally:
            self._tls.replacing, self._tls.pending = False, None

    def _add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        pending = getattr(self._tls, "pending", None)
        self._tls.pending = None
        m, new_next = len(ids), max(self._next_id, int(ids.max()) + 1)
        with self._db_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            assigned = np.empty(0, np.int64)
            try:
                freed = self._unmap(conn, pending) if pending is not None else np.empty(0, np.int64)
                skip = set(freed.tolist())  # rows the committed state still uses: never overwritten
                cand = [r for (r,) in conn.execute("SELECT row FROM free ORDER BY row LIMIT ?", (m + len(skip),))]
                reuse = np.asarray([r for r in cand if r not in skip][:m], np.int64)
                n_new = m - len(reuse)
                assigned = np.concatenate([reuse, np.arange(self._n_rows, self._n_rows + n_new, dtype=np.int64)])
                self._write_rows(self._vfd, assigned, vectors, self._row_bytes)
                self._write_rowids(assigned, ids)
                os.fdatasync(self._vfd)
                os.fdatasync(self._ifd)
                conn.executemany("INSERT INTO rows(id, row) VALUES (?, ?)", zip(ids.tolist(), assigned.tolist()))
                if len(reuse):
                    conn.execute("DELETE FROM free WHERE row IN (SELECT value FROM json_each(?))",
                                 (json.dumps(reuse.tolist()),))
                conn.executemany("UPDATE meta SET value = ? WHERE key = ?",
                                 [(str(self._n_rows + n_new), "n_rows"), (str(new_next), "next_id")])
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                back = assigned[assigned < self._n_rows]  # reused free rows: mark them free again
                self._write_rowids(back, np.full(len(back), -1, np.int64))
                raise
            self._write_rowids(freed, np.full(len(freed), -1, np.int64))
            self._n_rows += n_new
            self._live += m - len(freed)

    def _unmap(self, conn: sqlite3.Connection, ids: np.ndarray) -> np.ndarray:
        """Inside an open transaction: delete ``ids``' mappings and free their rows; returns the rows."""
        arg = (json.dumps(ids.tolist()),)
        rows = [r for (r,) in conn.execute("SELECT row FROM rows WHERE id IN (SELECT value FROM json_each(?))", arg)]
        conn.execute("DELETE FROM rows WHERE id IN (SELECT value FROM json_each(?))", arg)
        conn.executemany("INSERT INTO free(row) VALUES (?)", [(r,) for r in rows])
        return np.asarray(rows, np.int64)

    def _remove(self, ids: np.ndarray) -> int:
        if getattr(self._tls, "replacing", False):
            self._tls.pending = ids  # BaseBank.add is replacing these: _add unmaps them atomically
            return len(ids)
        with self._db_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                freed = self._unmap(conn, ids)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._write_rowids(freed, np.full(len(freed), -1, np.int64))
            self._live -= len(freed)
        return len(freed)

    def _contains(self, ids: np.ndarray) -> np.ndarray:
        return np.isin(ids, self._id_rows(ids)[:, 0])

    def _count(self) -> int:
        self._conn()
        return self._live

    def _all_ids(self) -> np.ndarray:
        return np.asarray([i for (i,) in self._sql("SELECT id FROM rows")], np.int64)

    def _get(self, ids: np.ndarray) -> np.ndarray:
        if not len(ids):
            return np.empty((0, self.dim), np.float32)
        pairs = self._id_rows(ids)
        rows = pairs[np.argsort(pairs[:, 0])]
        where = np.searchsorted(rows[:, 0], ids)
        vm, im = self._maps(self._n_rows)
        try:
            return np.frombuffer(vm, np.float32).reshape(self._n_rows, self.dim)[rows[where, 1]]  # a copy
        finally:
            _close_maps(vm, im)

    def _reset(self) -> None:
        with self._db_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM rows")
                conn.execute("DELETE FROM free")
                conn.execute("UPDATE meta SET value = '0' WHERE key IN ('n_rows', 'next_id')")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._n_rows = self._live = 0
            os.ftruncate(self._vfd, 0)
            os.ftruncate(self._ifd, 0)

    # ------------------------------------------------------------------ search
    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        m = queries.shape[0]
        best_s = np.full((m, k), -np.inf, np.float32)
        best_i = np.full((m, k), -1, np.int64)
        vm, im = self._maps(self._n_rows)
        try:
            self._scan(vm, im, queries, best_s, best_i, k)
        finally:
            _close_maps(vm, im)
        order = np.argsort(-best_s, axis=1, kind="stable")
        return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)

    def _scan(self, vm: mmap.mmap, im: mmap.mmap, queries: np.ndarray, best_s: np.ndarray,
              best_i: np.ndarray, k: int) -> None:
        """Stream the rows in blocks: (q, b) score tiles merged into the running top-k."""
        n, m, B = self._n_rows, queries.shape[0], self.block_rows
        mat = np.frombuffer(vm, np.float32).reshape(n, self.dim)  # (n, dim), on disk
        rid = np.frombuffer(im, np.int64)  # (n,)
        qn = (queries * queries).sum(1) if self.metric == "l2" else None
        qc = max(1, min(m, TILE // B))  # queries per score tile
        page = mmap.PAGESIZE
        drop = n > B and hasattr(mmap, "MADV_DONTNEED")
        for s in range(0, n, B):
            e = min(n, s + B)
            block, bid = mat[s:e], rid[s:e]  # (b, dim), (b,)
            dead = bid < 0
            if not dead.all():
                bn = np.einsum("ij,ij->i", block, block) if qn is not None else None
                for a in range(0, m, qc):
                    z = min(m, a + qc)
                    sc = queries[a:z] @ block.T  # (q, b)
                    if qn is not None and bn is not None:
                        sc = 2 * sc - bn[None, :] - qn[a:z, None]  # -||q - x||^2
                    sc[:, dead] = -np.inf
                    self._merge(sc, bid, best_s[a:z], best_i[a:z], k)
            if drop:  # hand the block's pages back: resident memory stays at about one block
                for mm, w in ((vm, self._row_bytes), (im, 8)):
                    lo = s * w // page * page
                    mm.madvise(mmap.MADV_DONTNEED, lo, e * w - lo)

    @staticmethod
    def _merge(sc: np.ndarray, bid: np.ndarray, bs: np.ndarray, bi: np.ndarray, k: int) -> None:
        """Fold a (q, b) score tile into the running top-k (``bs``/``bi`` are updated in place)."""
        if sc.shape[1] > k:
            part = np.argpartition(sc, sc.shape[1] - k, axis=1)[:, -k:]  # the k largest, unordered
            sc = np.take_along_axis(sc, part, 1)
            ids = bid[part]
        else:
            ids = np.broadcast_to(bid, sc.shape)
        all_s = np.concatenate([bs, sc], 1)
        all_i = np.concatenate([bi, ids], 1)
        top = np.argpartition(-all_s, k - 1, axis=1)[:, :k]
        bs[:] = np.take_along_axis(all_s, top, 1)
        bi[:] = np.take_along_axis(all_i, top, 1)

    # ------------------------------------------------------------------ save / load
    def _save_files(self, directory: Path) -> None:
        out = directory / DB_FILE
        with self._db_lock:
            self._conn().execute("VACUUM INTO ?", (str(out),))
        copy = sqlite3.connect(out, isolation_level=None)
        try:
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, openable immutable
        finally:
            copy.close()
        _copy_prefix(self.path / VEC_FILE, directory / VEC_FILE, self._n_rows * self._row_bytes)
        _copy_prefix(self.path / IDS_FILE, directory / IDS_FILE, self._n_rows * 8)

    @classmethod
    def _opened(cls, path: str | os.PathLike[str], dim: int, metric: str, block_rows: int, *,
                read_only: bool = False, private: bool = False) -> DiskBank:
        """A bank opened on ``path`` whose parameters a manifest already validated (see :meth:`_setup`)."""
        bank = cls.__new__(cls)
        BaseBank.__init__(bank, dim=dim, metric=metric)
        bank._setup(path, block_rows, read_only=read_only, private=private)
        return bank

    @classmethod
    def _load_files(cls, directory: Path, manifest: dict[str, Any], *, mmap: bool = False) -> BaseBank:
        dim, metric, params = manifest["dim"], manifest["metric"], dict(manifest["params"])
        unknown = sorted(set(params) - {"block_rows"})
        block_rows = params.get("block_rows", 16384)
        if unknown or isinstance(block_rows, bool) or not isinstance(block_rows, int) or not 1 <= block_rows <= 1 << 22:
            raise CorruptFileError(f"{directory} manifest has invalid disk parameters {params!r}")
        for name in (DB_FILE, VEC_FILE, IDS_FILE):
            if not (directory / name).is_file():
                raise CorruptFileError(f"{directory / name} is missing; the saved disk bank is incomplete")
        if mmap:  # read-only view of the saved directory itself, nothing copied or written
            bank = cls._opened(directory, dim, metric, int(block_rows), read_only=True)
            bank._verify_saved(directory)
            return bank
        tmp = temp_dir()
        try:
            for name in (DB_FILE, VEC_FILE, IDS_FILE):
                shutil.copyfile(directory / name, Path(tmp) / name)
            bank = cls._opened(tmp, dim, metric, int(block_rows), private=True)  # a private copy: removed on close()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        bank._verify_saved(directory)
        return bank

    def _verify_saved(self, directory: Path) -> None:
        """A loaded save must agree with itself: every id's row in range, the row file naming that id,
        and every live vector finite. O(n) once per load, streamed in blocks (like the sha256 check)."""
        try:
            with self._db_lock:
                conn = self._h.conn
                assert conn is not None  # open until close()
                pairs = np.asarray(conn.execute("SELECT id, row FROM rows").fetchall(), np.int64).reshape(-1, 2)
            n_rows = self._n_rows
            saved_ids = directory / IDS_FILE  # the save itself, not the copy that opening may have repaired
            if saved_ids.stat().st_size < n_rows * 8:
                raise CorruptFileError(f"{saved_ids} is shorter than the {n_rows} committed rows")
            ids_file = np.memmap(saved_ids, dtype=np.int64, mode="r", shape=(n_rows,)) if n_rows else np.empty(0)
            if len(pairs):
                rows = pairs[:, 1]
                if rows.min() < 0 or rows.max() >= n_rows or len(np.unique(rows)) != len(rows):
                    raise CorruptFileError(f"{directory}: the database maps ids to rows outside the vector file")
                if not np.array_equal(np.asarray(ids_file[rows]), pairs[:, 0]):
                    raise CorruptFileError(f"{directory}: the row-id file disagrees with the database")
                vecs = np.memmap(self.path / VEC_FILE, dtype=np.float32, mode="r", shape=(n_rows, self.dim))
                order = np.sort(rows)
                for start in range(0, len(order), self.block_rows):
                    if not np.isfinite(vecs[order[start:start + self.block_rows]]).all():
                        raise CorruptFileError(f"{directory}: stored vectors contain NaN or inf")
                del vecs
            del ids_file
        except BaseException:
            self.close()
            raise
