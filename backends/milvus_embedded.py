"""The embedded Milvus (milvus-lite) a :class:`~memkit.backends.milvus_bank.MilvusBank` opens in this process.

milvus-lite (Milvus documentation, "Run Milvus Lite Locally") runs one gRPC server per database file inside the
process that opens it, and locks that database per process. This module keeps which collections of each database
are open here, refuses a second open bank on the same collection, stops the server memkit started once the last of
its banks closes, and removes a private temporary database. At interpreter exit it stops what is left without any
RPC (see :func:`_at_exit`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import threading
from typing import Any

from pymilvus import MilvusClient

from memkit.backends import milvus_owner
from memkit.errors import ConfigError
from memkit.paths import check_dir_target, user_path

__all__ = ["db_path", "connect", "release"]

_OPEN_LOCK = threading.Lock()
# embedded db path -> [open collections, whether memkit started its milvus-lite server, private temp dir or None]
_OPEN: dict[str, list[Any]] = {}


def db_path(path: str | os.PathLike[str]) -> str:
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


def release(client: Any, db: str | None, coll: str, tmp: str | None, owner: list[Any] | None = None) -> None:
    """Close a bank's client (dropping its owner record on a server); stop the milvus-lite server memkit started
    once its last bank closes."""
    if owner:  # [record, timeout]: the owner record this bank holds on a server
        milvus_owner.release(client, coll, owner[0], owner[1])
        owner.clear()
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


def connect(db: str, coll: str, collection: str, tmp: str | None) -> MilvusClient:
    """A client of the milvus-lite database ``db`` (absolute, from :func:`db_path`) for collection ``coll`` (its
    Milvus name; ``collection`` as the user gave it), registered as open here until :func:`release`."""
    from milvus_lite.server_manager import server_manager_instance

    with _OPEN_LOCK:
        entry = _OPEN.setdefault(db, [set(), db not in getattr(server_manager_instance, "_servers", {}), tmp])
        if coll in entry[0]:
            raise ConfigError(f"milvus collection {collection!r} in {db} is already open in this process; "
                              "use that bank, or close() it first")
        entry[0].add(coll)
    try:
        return MilvusClient(uri=db)
    except Exception as exc:  # MilvusException, or OSError from milvus-lite's files
        release(_NoClient(), db, coll, tmp)
        raise ConfigError(f"could not open milvus-lite database {db}: {getattr(exc, 'message', exc)}; milvus-lite "
                          "locks a database per process, so close the process or client holding it") from exc


class _NoClient:
    """Stands in for a client that was never created, so a failed open releases its registration."""

    def close(self) -> None:
        pass

    def drop_collection(self, _: str) -> None:
        pass
