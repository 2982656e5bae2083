"""One writing bank per Milvus collection: an owner record that a second writer finds when it opens.

Why: a bank hands out ids itself (``_next_id``, the largest stored id + 1, read once on open), and replaces a
vector whose id is added again. Two writers on one collection would hand out the same ids and overwrite each
other's vectors without an error. Milvus has no compare-and-set on rows, so the record is a *collection*: Milvus
creates a collection atomically, and creating one whose name exists with other parameters fails ("create
duplicate collection with different parameters", Milvus rootcoord's ``createCollectionTask``; an identical
request succeeds, so the record carries a random token and creation is checked by reading the record back).

The record ``<collection>__memkit_owner`` holds, as its description, JSON naming the owner: host, pid, the pid's
start time (so a reused pid is not taken for the owner), a random token and when it was taken. ``close()`` drops
it. A record left by a process that is gone (same host, pid not running or started at another time; or this
process, from a bank that no longer exists) is stale and is replaced on open. A record from a live process, or
from another host, makes the open fail with a ``ConfigError`` that names the owner; ``take_over=True`` replaces
it (for an owner known to be dead on another host). Readers (``read_only=True``) take no record.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from memkit.errors import ConfigError

__all__ = ["owner_collection", "acquire", "release", "new_record"]

SUFFIX = "__memkit_owner"
_HELD_LOCK = threading.Lock()
_HELD: set[str] = set()  # tokens of records held by open banks in this process


def owner_collection(coll: str) -> str:
    """The owner record's collection name (at most 255 characters, Milvus's limit)."""
    name = coll + SUFFIX
    if len(name) <= 255:
        return name
    return f"{coll[:200]}_{hashlib.sha256(coll.encode()).hexdigest()[:16]}{SUFFIX}"


def _start_time(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (/proc/PID/stat field 22), or None if not running."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def new_record(collection: str) -> dict[str, Any]:
    return {"memkit": "owner", "collection": collection, "host": socket.gethostname(), "pid": os.getpid(),
            "pid_start": _start_time(os.getpid()), "token": uuid.uuid4().hex,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _schema(record: dict[str, Any]) -> Any:
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                        description=json.dumps(record, sort_keys=True))
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)  # Milvus 2.3 requires a vector field; never loaded
    return schema


def _read(bank: Any, name: str) -> dict[str, Any] | None:
    info = bank._call("describe_collection (owner record)", "describe_collection", name)
    try:
        rec = json.loads(info.get("description") or "")
    except (TypeError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("memkit") == "owner" else None


def _stale(rec: dict[str, Any]) -> bool:
    if rec.get("host") != socket.gethostname() or not isinstance(rec.get("pid"), int):
        return False
    if rec["pid"] == os.getpid():
        with _HELD_LOCK:
            return rec.get("token") not in _HELD  # a bank of this process that no longer exists
    return _start_time(rec["pid"]) != rec.get("pid_start")


def _who(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "an unreadable owner record"
    return f"process {rec.get('pid')} on host {rec.get('host')!r} (since {rec.get('since')})"


def acquire(bank: Any, *, coll: str, where: str, take_over: bool) -> dict[str, Any]:
    """Take the owner record of ``coll``, or raise ConfigError naming its owner. ``bank._call(what, method, ...)``
    calls the client with the bank's timeout and error translation. Returns the record taken."""
    name = owner_collection(coll)
    for _ in range(4):
        mine = new_record(coll)
        if not bank._call("has_collection", "has_collection", name):  # (pymilvus logs a failed create loudly)
            try:
                bank.client.create_collection(name, schema=_schema(mine), timeout=bank.timeout)
            except Exception as exc:
                if not bank._call("has_collection", "has_collection", name):  # not "taken meanwhile": a failure
                    raise bank._translate(exc, "create_collection (owner record)") from exc
        rec = _read(bank, name)
        if rec is not None and rec.get("token") == mine["token"]:
            with _HELD_LOCK:
                _HELD.add(mine["token"])
            return mine
        if rec is not None and not take_over and not _stale(rec):
            same = rec.get("pid") == os.getpid() and rec.get("host") == socket.gethostname()
            raise ConfigError(
                f"milvus collection {coll!r} at {where} is open for writing by another memkit bank, "
                f"{'in this process' if same else _who(rec)}: memkit allows one writer per collection (two would "
                "hand out the same ids and overwrite each other's vectors). Close that bank first; open this one "
                "with read_only=True to search beside it; or, if that process is gone (on another host), pass "
                f"take_over=True. The owner record is the collection {name!r}")
        _drop_if(bank, name, rec)
    raise ConfigError(f"could not take the owner record {name!r} of milvus collection {coll!r} at {where}: other "
                      "clients keep replacing it; close the other banks on this collection and retry")


def _drop_if(bank: Any, name: str, rec: dict[str, Any] | None) -> None:
    """Drop the record if it is still ``rec`` (a stale or taken-over owner), so a fresh one is not dropped."""
    now = _read(bank, name) if bank._call("has_collection", "has_collection", name) else None
    if now == rec:
        bank._call("drop_collection (owner record)", "drop_collection", name)


def release(client: Any, coll: str, record: dict[str, Any], timeout: float | None) -> None:
    """Drop the owner record if it is still ours (best effort: a server that is down keeps it, and the next
    open on this host sees it as stale)."""
    name = owner_collection(coll)
    with _HELD_LOCK:
        _HELD.discard(record["token"])
    try:
        info = client.describe_collection(name, timeout=timeout)
        if json.loads(info.get("description") or "{}").get("token") == record["token"]:
            client.drop_collection(name, timeout=timeout)
    except Exception:
        pass
