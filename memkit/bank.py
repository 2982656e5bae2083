"""The MemoryBank protocol, its shared base class, and the lazy backend registry.

A bank stores (id, vector) pairs and answers top-k similarity search. Every backend
(faiss, hnswlib, usearch, disk, qdrant; see ``backends/``) subclasses :class:`BaseBank`, which
owns everything that must behave identically across libraries: input validation, id
assignment, cosine normalisation, "higher score = closer" for every metric, -1/-inf padding,
a readers-writer lock for thread safety, and the checksummed manifest that ``load_bank`` reads.

The registry is lazy in the style of fsspec's ``known_implementations``: a name maps to
``"module:Class"`` and the library is imported on first use; a missing library raises
:class:`~memkit.errors.MissingDependencyError` naming the pip extra.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import importlib
import inspect
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable
from urllib.parse import urlparse

import numpy as np

from memkit._arrays import as_ids, as_vectors, check_k
from memkit._rwlock import RWLock
from memkit.config import METRICS, BankConfig
from memkit.errors import (
    ConfigError,
    CorruptFileError,
    InvalidInputError,
    MemkitError,
    MissingDependencyError,
    ReadOnlyError,
    UnknownBackendError,
    UnknownParameterError,
)

__all__ = [
    "MemoryBank",
    "BaseBank",
    "SearchResult",
    "create_bank",
    "load_bank",
    "register_backend",
    "available_backends",
    "MANIFEST",
]

MANIFEST = "manifest.json"
FORMAT = "memkit-bank"
FORMAT_VERSION = 1
ENTRY_POINT_GROUP = "memkit.backends"
MAX_DIM = 1 << 16  # 65,536: well above any embedding (LLM hidden sizes reach 16,384); bounds what a file can ask for
MAX_JSON_BYTES = 64 << 20  # a manifest larger than this is refused before it is parsed
# Constructor parameters that say *where* a bank lives or connects. A saved manifest never contains them
# (backends leave them out of params()), so one that does was crafted: loading it must not open a
# server connection or write to a directory chosen by the file.
LOCATION_PARAMS = frozenset({"path", "url", "host", "port", "location", "uri", "api_key", "https", "prefer_grpc"})


@dataclass(frozen=True)
class SearchResult:
    """Top-k results: ``scores`` (m, k) float32, higher = closer; ``ids`` (m, k) int64, -1 pads."""

    scores: np.ndarray
    ids: np.ndarray

    def __iter__(self) -> Iterator[np.ndarray]:  # allows `scores, ids = bank.search(q, k)`
        yield self.scores
        yield self.ids

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> np.ndarray:
        return (self.scores, self.ids)[i]


@runtime_checkable
class MemoryBank(Protocol):
    """What every bank offers. See :class:`BaseBank` for the shared semantics."""

    dim: int
    metric: str

    def add(self, vectors: Any, ids: Any = None) -> np.ndarray: ...
    def search(self, queries: Any, k: int) -> SearchResult: ...
    def remove(self, ids: Any) -> int: ...
    def __len__(self) -> int: ...
    def save(self, path: str | os.PathLike[str]) -> None: ...
    def reset(self) -> None: ...


class BaseBank(ABC):
    """Shared behaviour of all backends. Subclasses implement the ``_underscore`` hooks.

    Hooks receive validated inputs: float32 C-contiguous ``(n, dim)`` vectors (already
    L2-normalised when ``metric == "cosine"``; backends treat cosine as ``ip``), int64 ids that
    are not present in the bank, and ``k >= 1``. ``_search`` returns scores where higher is
    closer (for ``l2``: the negated squared distance) and may pad with id -1.
    """

    name: ClassVar[str] = "base"
    exact: ClassVar[bool] = True  # exact backends must equal numpy brute force in the conformance suite

    def __init__(self, *, dim: int, metric: str = "ip") -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise ConfigError(f"dim must be a positive integer, got {dim!r}")
        if dim > MAX_DIM:
            raise ConfigError(f"dim={dim} is larger than memkit's limit of {MAX_DIM}; reduce the embedding size")
        if metric not in METRICS:
            raise ConfigError(f"metric={metric!r} is not valid; choose one of {list(METRICS)}")
        self.dim = int(dim)
        self.metric = metric
        self._lock = RWLock()
        self._next_id = 0
        self._id_lock = threading.Lock()
        self.read_only = False  # set by views (memory-mapped loads): writes raise ReadOnlyError

    # ------------------------------------------------------------------ hooks
    @abstractmethod
    def _add(self, vectors: np.ndarray, ids: np.ndarray) -> None: ...
    @abstractmethod
    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...
    @abstractmethod
    def _remove(self, ids: np.ndarray) -> int: ...
    @abstractmethod
    def _contains(self, ids: np.ndarray) -> np.ndarray: ...
    @abstractmethod
    def _count(self) -> int: ...
    @abstractmethod
    def _all_ids(self) -> np.ndarray: ...
    @abstractmethod
    def _get(self, ids: np.ndarray) -> np.ndarray: ...
    @abstractmethod
    def _reset(self) -> None: ...
    @abstractmethod
    def _save_files(self, directory: Path) -> None:
        """Write the native files into an empty ``directory``."""
    @classmethod
    @abstractmethod
    def _load_files(cls, directory: Path, manifest: dict[str, Any], *, mmap: bool = False) -> BaseBank:
        """Rebuild a bank from ``directory`` (checksums already verified).

        With ``mmap=True`` a backend that can memory-map its index returns a read-only view
        (``read_only = True``); one that cannot loads normally.
        """

    def params(self) -> dict[str, Any]:
        """Constructor parameters (besides dim/metric) that ``load_bank`` passes back."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing to release
        """Release files or clients. The bank must not be used afterwards."""

    # ------------------------------------------------------------------ public API
    def _check_writable(self, op: str) -> None:
        if self.read_only:
            raise ReadOnlyError(
                f"this {self.name!r} bank is a read-only memory-mapped view; {op} is refused. "
                "Load it with memkit.load_bank(path) (mmap=False) to modify it"
            )

    def add(self, vectors: Any, ids: Any = None) -> np.ndarray:
        """Add ``(n, dim)`` vectors; returns their ``(n,)`` int64 ids. Re-adding an id replaces it."""
        self._check_writable("add")
        vecs = self._prepare(vectors, name="vectors")
        n = vecs.shape[0]
        with self._lock.write():
            if ids is None:
                with self._id_lock:
                    new_ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
            else:
                new_ids = as_ids(ids, n)
            if n == 0:
                return new_ids
            present = self._contains(new_ids)
            if present.any():
                self._remove(new_ids[present])
            self._add(vecs, new_ids)
            with self._id_lock:
                self._next_id = max(self._next_id, int(new_ids.max()) + 1)
            return new_ids

    def search(self, queries: Any, k: int) -> SearchResult:
        """Top-k neighbours of each query: scores (m, k) float32 (higher = closer), ids (m, k) int64."""
        q = self._prepare(queries, name="queries")
        k = check_k(k)
        m = q.shape[0]
        with self._lock.read():
            count = self._count()
            if m == 0 or count == 0:
                scores, ids = np.empty((m, 0), np.float32), np.empty((m, 0), np.int64)
            else:
                scores, ids = self._search(q, min(k, count))
        return _pad(np.asarray(scores, np.float32), np.asarray(ids, np.int64), m, k)

    def remove(self, ids: Any) -> int:
        """Remove ids; returns how many were present. Unknown ids are ignored."""
        self._check_writable("remove")
        arr = as_ids(ids)
        if arr.size == 0:
            return 0
        with self._lock.write():
            present = self._contains(arr)
            if not present.any():
                return 0
            return int(self._remove(arr[present]))

    def __len__(self) -> int:
        with self._lock.read():
            return int(self._count())

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, (int, np.integer)) or item < 0:
            return False
        with self._lock.read():
            return bool(self._contains(np.array([item], np.int64))[0])

    def ids(self) -> np.ndarray:
        """All stored ids, sorted ascending."""
        with self._lock.read():
            return np.sort(np.asarray(self._all_ids(), np.int64))

    def get(self, ids: Any) -> np.ndarray:
        """Stored vectors for ``ids`` as (n, dim) float32 (normalised if metric is cosine)."""
        arr = as_ids(ids)
        with self._lock.read():
            present = self._contains(arr)
            if not present.all():
                missing = arr[~present][:5].tolist()
                raise InvalidInputError(f"ids {missing} are not in the bank; check bank.ids()")
            return np.asarray(self._get(arr), np.float32).reshape(len(arr), self.dim)

    def reset(self) -> None:
        """Remove everything (the bank stays usable, with the same dim and parameters)."""
        self._check_writable("reset")
        with self._lock.write():
            self._reset()
            with self._id_lock:
                self._next_id = 0

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save to directory ``path`` atomically: readers see the old or the new save, never half."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._lock.read():
            tmp = make_tmp_dir(target)
            try:
                self._save_files(tmp)
                _write_manifest(tmp, self._manifest())
                _replace_dir(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

    def _manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "backend": self.name,
            "dim": self.dim,
            "metric": self.metric,
            "params": self.params(),
            "next_id": self._next_id,
            "count": self._count(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, metric={self.metric!r}, n={len(self)})"

    # ------------------------------------------------------------------ helpers
    def _prepare(self, x: Any, *, name: str) -> np.ndarray:
        vecs = as_vectors(x, self.dim, name=name)
        if self.metric == "cosine" and vecs.size:
            norms = np.linalg.norm(vecs, axis=1, keepdims=True)
            if (norms == 0).any():
                raise InvalidInputError(f"{name} contain all-zero rows, which have no cosine direction")
            vecs = vecs / norms
        return vecs


class IdSetMixin:
    """``_contains``/``_count``/``_all_ids`` for backends that track their live ids in a Python set
    ``self._ids`` (faiss, hnswlib, usearch: their native indexes cannot answer membership cheaply)."""

    _ids: set[int]

    def _contains(self, ids: np.ndarray) -> np.ndarray:
        s = self._ids
        return np.fromiter((int(i) in s for i in ids), bool, count=len(ids))

    def _count(self) -> int:
        return len(self._ids)

    def _all_ids(self) -> np.ndarray:
        return np.fromiter(self._ids, np.int64, count=len(self._ids))


def _pad(scores: np.ndarray, ids: np.ndarray, m: int, k: int) -> SearchResult:
    if ids.shape == (m, k) and scores.shape == (m, k) and (ids.size == 0 or ids.min() >= 0):
        # Fast path (the common case: k hits per query): nothing to pad or mask, just fresh copies.
        return SearchResult(np.array(scores, np.float32, order="C"), np.array(ids, np.int64, order="C"))
    out_s = np.full((m, k), -np.inf, np.float32)
    out_i = np.full((m, k), -1, np.int64)
    kk = min(k, ids.shape[1]) if ids.ndim == 2 else 0
    if kk:
        out_s[:, :kk] = scores[:, :kk]
        out_i[:, :kk] = ids[:, :kk]
        invalid = out_i < 0
        out_s[invalid] = -np.inf
        out_i[invalid] = -1
    return SearchResult(out_s, out_i)


# ---------------------------------------------------------------------- manifest & files
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(directory: Path, skip: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} for every file under ``directory``."""
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel not in skip:
            out[rel] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    return out


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    manifest = dict(manifest, files=file_digests(directory))
    path = directory / MANIFEST
    with path.open("w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())


def _replace_dir(tmp: Path, target: Path) -> None:
    """Swap ``tmp`` into ``target`` so a crash at any instant leaves either the old or the new directory.

    On Linux the two directories are exchanged in one atomic ``renameat2(RENAME_EXCHANGE)``; elsewhere
    the old directory is renamed aside first, and :func:`recover_dir` puts it back if a crash lands
    between the two renames.
    """
    _fsync_tree(tmp)
    if os.path.lexists(target):
        if _exchange(tmp, target):  # tmp now holds the old save
            _fsync_dir(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = target.with_name(f".{target.name}.old-{_owner_tag()}-{threading.get_ident()}")
        os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    _fsync_dir(target.parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2``); False where that is unsupported."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (OSError, AttributeError):  # pragma: no cover - old libc
            _renameat2 = False
    if _renameat2 is False:  # pragma: no cover
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # pragma: no cover - fs without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _owner_tag() -> str:
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}"


def make_tmp_dir(target: Path) -> Path:
    """A fresh hidden sibling of ``target`` to write a save into, after tidying up crashed saves.

    Its name carries this host and pid, so leftovers of a killed save (``.name.tmp-host-pid-*`` and
    ``.name.old-host-pid-*``) are removed by the next save once that process is gone.
    """
    recover_dir(target)
    _remove_stale(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_owner_tag()}-", dir=target.parent))


def _stale_siblings(target: Path, kind: str) -> list[Path]:
    """Leftovers of saves into ``target`` by processes of this host that no longer run."""
    host = _owner_tag().rsplit("-", 1)[0]
    out = []
    try:
        siblings = list(target.parent.glob(f".{target.name}.{kind}-{host}-*"))
    except OSError:  # pragma: no cover
        return []
    for p in siblings:
        pid = p.name[len(f".{target.name}.{kind}-{host}-"):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            out.append(p)
        except OSError:  # exists but not ours to signal: alive
            pass
    return out


def _remove_stale(target: Path) -> None:
    for kind in ("tmp", "old"):
        for p in _stale_siblings(target, kind):
            shutil.rmtree(p, ignore_errors=True)


def recover_dir(target: Path) -> None:
    """If a crash between the two renames of a non-atomic swap left ``target`` missing, restore it."""
    if os.path.lexists(target):
        return
    olds = [p for p in _stale_siblings(target, "old") if (p / MANIFEST).is_file() or (p / "kvstore.json").is_file()]
    if olds:
        newest = max(olds, key=lambda p: p.stat().st_mtime_ns)
        try:
            os.replace(newest, target)
        except OSError:  # pragma: no cover - another process recovered it first
            pass


def _fsync_tree(directory: Path) -> None:
    for p in directory.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif p.is_dir():  # a subdirectory's entries must be durable too (power loss, not only a kill)
            _fsync_dir(p)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path, what: str) -> Any:
    """Parse a small JSON file written by memkit, refusing links, special files, huge or deeply nested input."""
    try:
        st = os.lstat(path)
    except FileNotFoundError as exc:
        raise CorruptFileError(f"{path} is missing; was this {what} written by memkit?") from exc
    if not stat.S_ISREG(st.st_mode):
        raise CorruptFileError(f"{path} is a link or special file, not a regular file; refusing to read this {what}")
    if st.st_size > MAX_JSON_BYTES:
        raise CorruptFileError(f"{path} is {st.st_size} bytes, more than any {what} memkit writes "
                               f"({MAX_JSON_BYTES}); the file is corrupted or crafted")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptFileError(f"{path} is not valid JSON ({str(exc)[:200]}); the {what} is corrupted") from exc


def verify_files(directory: Path, files: Any, where: Path, *, skip: tuple[str, ...] = (MANIFEST,)) -> None:
    """Check that ``files`` ({relative path: {size, sha256}}) is exactly what ``directory`` holds.

    Every listed file must be a regular file inside ``directory`` (no ``..``, absolute paths or symbolic
    links on the way) with the recorded size and sha256, and no file or link may be present that the
    manifest does not list: nothing reaches a native loader unverified.
    """
    if not isinstance(files, dict):
        raise CorruptFileError(f"{where} field 'files' is missing or has the wrong type")
    root = Path(directory)
    listed: set[str] = set()
    for rel, info in files.items():
        parts = Path(rel).parts if isinstance(rel, str) else ()
        if not parts or ".." in parts or Path(rel).is_absolute() or "\0" in rel or rel in skip:
            raise CorruptFileError(f"{where} names a file outside the directory or a reserved name: {rel!r}")
        p = root
        for part in parts:
            p = p / part
            try:
                st = os.lstat(p)
            except FileNotFoundError as exc:
                raise CorruptFileError(f"{p} is missing; the save is incomplete") from exc
            if stat.S_ISLNK(st.st_mode):
                raise CorruptFileError(f"{p} is a symbolic link; a memkit save holds only regular files")
        if not stat.S_ISREG(st.st_mode):
            raise CorruptFileError(f"{p} is not a regular file; the save is corrupted")
        if not isinstance(info, dict) or st.st_size != info.get("size"):
            raise CorruptFileError(f"{p} has the wrong size (truncated?); the save is corrupted")
        if _sha256(p) != info.get("sha256"):
            raise CorruptFileError(f"{p} fails its checksum (bit flip or edit); the save is corrupted")
        listed.add(Path(rel).as_posix())
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if full.is_symlink():
                raise CorruptFileError(f"{full} is a symbolic link; a memkit save holds only regular files")
            if name in filenames and rel not in listed and rel not in skip:
                raise CorruptFileError(f"{full} is not listed in {where.name}; the directory was modified after "
                                       "it was saved, so it is refused")


def read_versioned_json(directory: Path, name: str, *, fmt: str, version: int, what: str, writer: str) -> dict[str, Any]:
    """Recover ``directory`` after a crashed swap, then read ``name`` in it: a JSON object of format ``fmt``
    at ``version`` (the K/V store's and the memory manager's save indexes share this first step)."""
    recover_dir(directory)
    path = directory / name
    if not os.path.lexists(path):
        raise CorruptFileError(f"{str(directory)!r} has no {name}; was it written by {writer}?")
    data = read_json(path, what)
    if not isinstance(data, dict) or data.get("format") != fmt or data.get("version") != version:
        raise CorruptFileError(f"{path} is not a version-{version} {what.rsplit(' ', 1)[0]}; re-save it")
    return data


def read_manifest(path: str | os.PathLike[str], *, verify: bool = True) -> dict[str, Any]:
    """Read and validate a bank manifest; with ``verify``, check every file's size and sha256."""
    directory = Path(path)
    recover_dir(directory)
    mpath = directory / MANIFEST
    if not directory.is_dir():
        raise CorruptFileError(f"{str(directory)!r} is not a saved bank directory (it does not exist)")
    if not os.path.lexists(mpath):
        raise CorruptFileError(f"{str(directory)!r} has no {MANIFEST}; was it written by bank.save()?")
    manifest = read_json(mpath, "bank manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptFileError(f"{mpath} is not a memkit bank manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CorruptFileError(
            f"{mpath} has format version {manifest.get('version')!r}; this memkit reads version "
            f"{FORMAT_VERSION}. Re-save the bank with a matching memkit version"
        )
    for key, kind in (("backend", str), ("dim", int), ("metric", str), ("params", dict), ("files", dict)):
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise CorruptFileError(f"{mpath} field {key!r} is missing or has the wrong type")
    if manifest["metric"] not in METRICS or not 0 < manifest["dim"] <= MAX_DIM:
        raise CorruptFileError(f"{mpath} has an invalid dim or metric (dim must be 1..{MAX_DIM})")
    for key in ("count", "next_id"):
        v = manifest.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**62:
            raise CorruptFileError(f"{mpath} field {key!r} must be an integer in [0, 2**62), got {v!r}")
    where = sorted(set(manifest["params"]) & LOCATION_PARAMS)
    if where:
        raise CorruptFileError(f"{mpath} sets {where}, which a saved bank never does (a crafted file could "
                               "otherwise make loading connect or write elsewhere); refusing it")
    if verify:
        verify_files(directory, manifest["files"], mpath)
    return manifest


# ---------------------------------------------------------------------- registry
# name -> ("module:Class", pip extra). Imported on first use only.
_KNOWN: dict[str, tuple[str, str | None]] = {
    "faiss-flat": ("memkit.backends.faiss_bank:FaissFlatBank", "faiss"),
    "faiss-hnsw": ("memkit.backends.faiss_bank:FaissHNSWBank", "faiss"),
    "faiss-ivf": ("memkit.backends.faiss_bank:FaissIVFBank", "faiss"),
    "hnswlib": ("memkit.backends.hnswlib_bank:HnswlibBank", "hnswlib"),
    "usearch": ("memkit.backends.usearch_bank:UsearchBank", "usearch"),
    "disk": ("memkit.backends.disk_bank:DiskBank", "disk"),
    "qdrant": ("memkit.backends.qdrant_bank:QdrantBank", "qdrant"),
}
_REGISTERED: dict[str, type[BaseBank]] = {}
_entry_points_loaded = False


def register_backend(name: str, cls: type[BaseBank] | str, *, extra: str | None = None) -> None:
    """Register a backend class (or a lazy ``"module:Class"`` path) under a lowercase name."""
    if not isinstance(name, str) or not name or name != name.lower():
        raise ConfigError(f"backend names are non-empty lowercase strings, got {name!r}")
    if isinstance(cls, str):
        if ":" not in cls:
            raise ConfigError(f"lazy backend path must look like 'package.module:Class', got {cls!r}")
        _KNOWN[name] = (cls, extra)
        _REGISTERED.pop(name, None)
    elif isinstance(cls, type) and issubclass(cls, BaseBank):
        _REGISTERED[name] = cls
    else:
        raise ConfigError(f"register_backend needs a BaseBank subclass or 'module:Class', got {cls!r}")


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _KNOWN and ep.name not in _REGISTERED:
            _KNOWN[ep.name] = (ep.value, None)


def available_backends() -> list[str]:
    """Names of every known backend (installed or not)."""
    _load_entry_points()
    return sorted(set(_KNOWN) | set(_REGISTERED))


def get_backend_class(name: str) -> type[BaseBank]:
    key = name.lower() if isinstance(name, str) else name
    if key in _REGISTERED:
        return _REGISTERED[key]
    _load_entry_points()
    if key not in _KNOWN:
        raise UnknownBackendError(
            f"unknown backend {name!r}; known backends: {available_backends()} "
            "(or register one with memkit.register_backend)"
        )
    target, extra = _KNOWN[key]
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except MissingDependencyError:
        raise
    except ImportError as exc:
        hint = f"pip install 'memkit[{extra}]'" if extra else f"install the package providing {module_name}"
        raise MissingDependencyError(f"backend {name!r} needs a library that is not installed ({exc}); {hint}") from exc
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseBank)):
        raise ConfigError(f"{target} is not a memkit BaseBank subclass")
    _REGISTERED[key] = cls
    return cls


def require(module: str, extra: str) -> Any:
    """Import an optional library or raise MissingDependencyError naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is not installed; install it with: pip install 'memkit[{extra}]'"
        ) from exc


def _parse_uri(spec: str) -> tuple[str, dict[str, Any]]:
    """'disk:///data/mem' -> ('disk', {path}); 'qdrant://host:6333/coll' -> ('qdrant', {url, collection})."""
    parsed = urlparse(spec)
    scheme = parsed.scheme.lower()
    if scheme == "disk":
        if not parsed.path:
            raise ConfigError("disk URIs look like disk:///absolute/path/to/dir")
        return "disk", {"path": parsed.path}
    if scheme == "qdrant":
        collection = parsed.path.strip("/") if parsed.netloc else None
        if parsed.netloc:
            if not collection:
                raise ConfigError("qdrant server URIs look like qdrant://host:6333/collection")
            return "qdrant", {"url": f"http://{parsed.netloc}", "collection": collection}
        return "qdrant", {"path": parsed.path or ":memory:"}
    if scheme in ("http", "https"):
        raise ConfigError(f"{spec!r}: use qdrant://host:port/collection for a Qdrant server")
    raise UnknownBackendError(f"unknown URI scheme {scheme!r} in {spec!r}; use disk:/// or qdrant://")


def _construct(cls: type[BaseBank], dim: Any, metric: str, params: dict[str, Any]) -> BaseBank:
    sig = inspect.signature(cls.__init__)
    accepted = {p for p in sig.parameters if p not in ("self", "dim", "metric")}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise UnknownParameterError(
            f"backend {cls.name!r} does not accept parameter(s) {unknown}; it accepts {sorted(accepted)}"
        )
    if dim is None:
        raise ConfigError(f"creating a {cls.name!r} bank needs dim=..., the vector dimension")
    return cls(dim=dim, metric=metric, **params)


def create_bank(spec: str | dict[str, Any] | BankConfig = "faiss-flat", *, dim: int | None = None,
                metric: str | None = None, **params: Any) -> BaseBank:
    """Create a bank from a registry name, URI, dict or :class:`BankConfig`.

    >>> bank = create_bank("faiss-flat", dim=384)
    >>> bank = create_bank({"backend": "hnswlib", "dim": 384, "params": {"ef_search": 128}})
    >>> bank = create_bank("disk:///tmp/mem", dim=384)
    """
    if isinstance(spec, dict):
        spec = BankConfig.from_dict(spec)
    if isinstance(spec, BankConfig):
        name, cfg_params = spec.backend, dict(spec.params)
        dim = dim if dim is not None else spec.dim
        metric = metric or spec.metric
    elif isinstance(spec, str):
        name, cfg_params = spec, {}
    else:
        raise ConfigError(f"bank spec must be a name, URI, dict or BankConfig, got {type(spec).__name__}")
    if "://" in name:
        name, uri_params = _parse_uri(name)
        cfg_params.update(uri_params)
    cfg_params.update(params)
    cls = get_backend_class(name)
    return _construct(cls, dim, metric or "ip", cfg_params)


def load_bank(path: str | os.PathLike[str], *, mmap: bool = False) -> BaseBank:
    """Restore a bank written by ``bank.save(path)``: the right backend, parameters and ids.

    ``mmap=True`` memory-maps the index where the backend can (faiss-flat, usearch) and returns a
    read-only view that refuses writes with :class:`ReadOnlyError`.
    """
    directory = Path(path)
    manifest = read_manifest(directory)
    cls = get_backend_class(manifest["backend"])
    try:
        bank = cls._load_files(directory, manifest, mmap=mmap)
    except MemkitError:
        raise
    except Exception as exc:
        raise CorruptFileError(f"could not load bank from {str(directory)!r}: {exc}") from exc
    n = len(bank)
    if n != manifest.get("count", n):
        bank.close()
        raise CorruptFileError(f"bank at {str(directory)!r} holds {n} vectors but its manifest says {manifest['count']}")
    ids = bank.ids()
    # never below the largest stored id: an automatic id must not silently replace a stored vector
    bank._next_id = max(int(manifest.get("next_id", 0)), int(ids[-1]) + 1 if len(ids) else 0)
    return bank
