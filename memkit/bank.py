"""The MemoryBank protocol, its shared base class, and the lazy backend registry.

A bank stores (id, vector) pairs and answers top-k similarity search. Every backend
(faiss, hnswlib, usearch, disk, qdrant, milvus; see ``backends/``) subclasses :class:`BaseBank`, which
owns everything that must behave identically across libraries: input validation, id
assignment, cosine normalisation, "higher score = closer" for every metric, -1/-inf padding,
a readers-writer lock for thread safety, and the checksummed manifest that ``load_bank`` reads.

The registry is lazy in the style of fsspec's ``known_implementations``: a name maps to
``"module:Class"`` and the library is imported on first use; a missing library raises
:class:`~memkit.errors.MissingDependencyError` naming the pip extra.
"""

from __future__ import annotations

import importlib
import inspect
import os
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
    SaveTargetError,
    UnknownBackendError,
    UnknownParameterError,
)
from memkit.files import (
    MANIFEST,
    atomic_save,
    check_saved_dir,
    check_seal,
    file_digests,
    read_json,
    recover_dir,
    save_path,
    verify_files,
    write_json,
)
from memkit.paths import check_dir_target, expand_text, user_path
from memkit.registry import Registry

__all__ = [
    "MemoryBank",
    "BaseBank",
    "SearchResult",
    "create_bank",
    "load_bank",
    "register_backend",
    "available_backends",
    "get_backend_class",
    "check_bank_config",
    "parse_uri",
    "BACKENDS",
    "MANIFEST",
]

FORMAT = "memkit-bank"
FORMAT_VERSION = 2  # 2: the manifest is sealed (memkit.files.seal)
ENTRY_POINT_GROUP = "memkit.backends"
MAX_DIM = 1 << 16  # 65,536: well above any embedding (LLM hidden sizes reach 16,384); bounds what a file can ask for
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
    # auto ids start above every stored id, so add() may skip checking them (one server round trip on a remote bank)
    auto_ids_unchecked: ClassVar[bool] = False
    # search() asks _count() first to cap k; a remote bank whose _search pads short results itself sets this False
    # (on an instance) and saves a round trip per search
    count_before_search = True
    probe_on_check: ClassVar[bool] = True  # check_bank_config may build one (cheap, in memory) to validate values
    path_is_dir: ClassVar[bool] = False  # its ``path`` parameter names a directory (check_bank_config checks it)

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
            if ids is None and self.auto_ids_unchecked:
                present = np.zeros(n, bool)  # auto ids start above every stored id
            else:
                present = self._contains(new_ids)
            self._store(vecs, new_ids, present)
            with self._id_lock:
                self._next_id = max(self._next_id, int(new_ids.max()) + 1)
            return new_ids

    def _store(self, vecs: np.ndarray, ids: np.ndarray, present: np.ndarray) -> None:
        """Store validated vectors under ``ids``; ``present`` marks the ids already stored, which are replaced.
        Default: remove those, then ``_add`` all. A backend that can replace in one step overrides this."""
        if present.any():
            self._remove(ids[present])
        self._add(vecs, ids)

    def search(self, queries: Any, k: int) -> SearchResult:
        """Top-k neighbours of each query: scores (m, k) float32 (higher = closer), ids (m, k) int64."""
        q = self._prepare(queries, name="queries")
        k = check_k(k)
        m = q.shape[0]
        with self._lock.read():
            count = self._count() if self.count_before_search and m else k
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
        """Save to directory ``path`` atomically: readers see the old or the new save, never half.

        ``path`` must be new, empty, or a previous memkit save (anything else raises SaveTargetError)."""
        with atomic_save(path, f"a {self.name!r} bank") as tmp, self._lock.read():
            try:
                self._save_files(tmp)
            except (MemkitError, OSError):
                raise
            except Exception as exc:  # a native library refused (its own error types): nothing was replaced
                raise SaveTargetError(f"the {self.name!r} library could not write its index ({exc}); nothing was "
                                      "changed at the target") from exc
            write_json(tmp / MANIFEST, dict(self._manifest(), files=file_digests(tmp)))

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


# ---------------------------------------------------------------------- manifest
def read_manifest(path: str | os.PathLike[str], *, verify: bool = True) -> dict[str, Any]:
    """Read and validate a bank manifest (its seal, fields and, with ``verify``, every file's size and sha256)."""
    directory = save_path(path, "loading a bank")
    recover_dir(directory)
    mpath = directory / MANIFEST
    check_saved_dir(directory, "bank")
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
    check_seal(manifest, mpath)
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
# name -> "module:Class" with its pip extra; imported on first use (memkit.registry). Third parties add backends
# with register_backend or the `memkit.backends` entry-point group.
BACKENDS: Registry[type[BaseBank]] = Registry("backend", base=BaseBank, entry_point_group=ENTRY_POINT_GROUP,
                                              unknown_error=UnknownBackendError,
                                              hint="or register one with memkit.register_backend")
for _name, _path, _extra in (
    ("faiss-flat", "memkit.backends.faiss_bank:FaissFlatBank", "faiss"),
    ("faiss-hnsw", "memkit.backends.faiss_bank:FaissHNSWBank", "faiss"),
    ("faiss-ivf", "memkit.backends.faiss_bank:FaissIVFBank", "faiss"),
    ("hnswlib", "memkit.backends.hnswlib_bank:HnswlibBank", "hnswlib"),
    ("usearch", "memkit.backends.usearch_bank:UsearchBank", "usearch"),
    ("disk", "memkit.backends.disk_bank:DiskBank", "disk"),
    ("qdrant", "memkit.backends.qdrant_bank:QdrantBank", "qdrant"),
    ("milvus", "memkit.backends.milvus_bank:MilvusBank", "milvus"),
):
    BACKENDS.register(_name, _path, extra=_extra)


def register_backend(name: str, cls: type[BaseBank] | str, *, extra: str | None = None) -> None:
    """Register a backend class (or a lazy ``"module:Class"`` path) under a lowercase name."""
    BACKENDS.register(name, cls, extra=extra)


def available_backends() -> list[str]:
    """Names of every known backend (installed or not)."""
    return BACKENDS.names()


def get_backend_class(name: str) -> type[BaseBank]:
    """The backend class registered under ``name`` (imports its library now)."""
    if not isinstance(name, str):
        raise UnknownBackendError(f"a backend name is a string like 'faiss-flat', got {name!r}")
    return BACKENDS.get(name)


def require(module: str, extra: str) -> Any:
    """Import an optional library or raise MissingDependencyError naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is not installed; install it with: pip install 'memkit[{extra}]'"
        ) from exc


URI_SCHEMES = ("disk", "qdrant", "milvus")


def parse_uri(spec: str) -> tuple[str, dict[str, Any]]:
    """'disk:///data/mem' -> ('disk', {path}); 'qdrant://host:6333/coll' -> ('qdrant', {url, collection}).

    A local path may start with ``~`` or ``$VARIABLE`` (``disk://~/mem``, ``disk:///~/mem``, ``milvus://$DATA/m.db``),
    expanded by :mod:`memkit.paths`; it must be absolute once expanded. A query (``?``) or fragment (``#``) is
    refused: memkit would otherwise drop it silently."""
    parsed = urlparse(spec)
    scheme = parsed.scheme.lower()
    if scheme in URI_SCHEMES and ("?" in spec or "#" in spec):
        raise ConfigError(f"{spec!r}: memkit URIs take no query (?...) or fragment (#...), which would be dropped; "
                          "pass backend parameters as params, e.g. {'backend': 'disk', 'params': {'path': ...}}")
    local = _local_path(spec) if scheme in URI_SCHEMES else None
    if scheme == "disk":
        if local is None:
            raise ConfigError(f"{spec!r}: disk URIs name an absolute path after three slashes, "
                              "disk:///data/mem (or disk://~/mem); for a relative directory pass "
                              "{'backend': 'disk', 'params': {'path': 'relative/dir'}}")
        return "disk", {"path": local}
    if scheme == "qdrant":
        if local is not None:
            return "qdrant", {"path": local}
        if parsed.netloc:
            collection = parsed.path.strip("/")
            if not collection:
                raise ConfigError("qdrant server URIs look like qdrant://host:6333/collection")
            return "qdrant", {"url": f"http://{parsed.netloc}", "collection": collection}
        return "qdrant", {"path": ":memory:"}
    if scheme == "milvus":  # milvus://host:19530/collection (a server); milvus:///data/mem.db (milvus-lite)
        if local is not None:
            return "milvus", {"path": local}
        if not parsed.netloc:  # "milvus://" alone: a private temporary milvus-lite database
            return "milvus", {}
        collection = parsed.path.strip("/")
        if not collection or "/" in collection or parsed.netloc.endswith(".db") or parsed.netloc.startswith("."):
            raise ConfigError(f"{spec!r}: milvus server URIs look like milvus://host:19530/collection; a milvus-lite "
                              "file is milvus:///data/mem.db (three slashes, an absolute path)")
        return "milvus", {"uri": f"http://{parsed.netloc}", "collection": collection}
    if scheme in ("http", "https"):
        raise ConfigError(f"{spec!r}: use qdrant://host:port/collection for a Qdrant server")
    raise UnknownBackendError(f"unknown URI scheme {scheme!r} in {spec!r}; use disk:///, qdrant:// or milvus://")


def _local_path(spec: str) -> str | None:
    """The expanded local path a ``scheme:///abs``, ``scheme://~/...`` or ``scheme://$VAR/...`` URI names; None
    when it names a server or nothing (``qdrant://``)."""
    rest = spec.split("://", 1)[1]
    if rest.startswith("/") and rest[1:2] in ("~", "$"):
        rest = rest[1:]  # disk:///~/mem: the home directory, never a directory called "~" at the root
    if rest == "/":
        example = {"milvus": "milvus:///data/mem.db"}.get(spec.split(":")[0].lower(), "disk:///data/mem")
        raise ConfigError(f"{spec!r} names the root directory; local URIs name a path of their own after three "
                          f"slashes, e.g. {example}")
    if not rest.startswith(("/", "~", "$")):
        return None
    path = expand_text(rest, repr(spec), error=ConfigError)
    if not os.path.isabs(path):
        raise ConfigError(f"{spec!r} expands to {path!r}, which is not an absolute path; URIs name absolute paths "
                          "(host names are not expanded)")
    return path


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
    try:
        return cls(dim=dim, metric=metric, **params)
    except MemkitError:
        raise
    except OSError as exc:  # a directory the backend could not create or open: a bad path, never a crash
        where = params.get("path", params.get("url", params.get("uri", "")))
        raise ConfigError(f"could not create the {cls.name!r} bank at {str(where)!r}: {exc.strerror or exc}; give a "
                          "directory path that can be created and written") from exc


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
        name, uri_params = parse_uri(name)
        cfg_params.update(uri_params)
    cfg_params.update(params)
    cls = get_backend_class(name)
    return _construct(cls, dim, metric or "ip", cfg_params)


def check_bank_config(spec: BankConfig, dim: int) -> None:
    """Fail now on what ``create_bank(spec, dim=dim)`` would refuse later: an unknown backend, a missing library, a
    misspelt parameter, a bad value. Backends that keep everything in memory are built once and closed; one whose
    parameters name a place (a path, a server) is checked by its signature only, so checking writes nothing."""
    name, params = spec.backend, dict(spec.params)
    if "://" in name:
        name, uri_params = parse_uri(name)
        params.update(uri_params)
    cls = get_backend_class(name)
    accepted = {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "dim", "metric")}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise UnknownParameterError(f"backend {cls.name!r} does not accept parameter(s) {unknown}; it accepts "
                                    f"{sorted(accepted)}")
    if cls.path_is_dir and params.get("path") not in (None, ":memory:"):  # read-only: nothing is created here
        check_dir_target(user_path(params["path"], f"{cls.name} bank path", error=ConfigError),
                         f"the {cls.name!r} bank path")
    if not set(params) & LOCATION_PARAMS and cls.probe_on_check:
        cls(dim=dim, metric=spec.metric, **params).close()


def load_bank(path: str | os.PathLike[str], *, mmap: bool = False) -> BaseBank:
    """Restore a bank written by ``bank.save(path)``: the right backend, parameters and ids.

    ``mmap=True`` memory-maps the index where the backend can (faiss-flat, usearch) and returns a
    read-only view that refuses writes with :class:`ReadOnlyError`.
    """
    directory = save_path(path, "loading a bank")
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
