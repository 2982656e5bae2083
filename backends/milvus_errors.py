"""What a Milvus server's failures mean for a memkit bank, as typed :class:`~memkit.errors.MemkitError` s.

What it follows: gRPC status codes (grpc.io "Status codes and their use in gRPC": ``UNAVAILABLE`` = the server
cannot be reached now and the call may be retried, ``DEADLINE_EXCEEDED`` = no answer within the deadline,
``UNAUTHENTICATED`` = bad credentials) and the Milvus error messages that pymilvus passes on in
``MilvusException`` (Milvus "Error codes": ``database not found``, ``collection not found`` / ``can't find
collection``, ``collection not loaded``). pymilvus raises either a ``MilvusException`` or, for some calls, the
raw ``grpc.RpcError``; both, and the exceptions chained under them, are read here.

Secrets (the token, a password given in the URI) are removed from every message.
"""

from __future__ import annotations

import re

from memkit.errors import BackendUnavailableError, ConfigError, MemkitError

__all__ = ["translate", "scrub", "is_rpc_error"]

UNREACHABLE = ("fail connecting", "server unavailable", "unavailable", "deadline exceeded", "deadline_exceeded",
               "connection refused", "failed to connect", "retry timeout", "timed out", "timeout")
LOADING = ("not loaded", "not fully loaded", "loading")
DROPPED = ("collection not found", "can't find collection", "collection not exist", "collection does not exist")


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen and len(out) < 8:
        out.append(e)
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return out


def _describe(exc: BaseException) -> tuple[str, str, str]:
    """(gRPC status name or '', the text of the whole chain, the first exception's message) of an exception."""
    status, texts = "", []
    for e in _chain(exc):
        code = getattr(e, "code", None)
        if callable(code):  # grpc.RpcError: code() is a grpc.StatusCode
            try:
                status = status or str(getattr(code(), "name", ""))
            except Exception:
                pass
        details = getattr(e, "details", None)
        if callable(details):
            try:
                texts.append(str(details()))
            except Exception:
                pass
        texts.append(str(getattr(e, "message", "") or e))
    details = getattr(exc, "details", None)
    first = str(details() if callable(details) else getattr(exc, "message", "") or exc)
    first = first.splitlines()[0] if first.strip() else type(exc).__name__
    return status, " | ".join(t for t in texts if t)[:2000], first


def scrub(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def translate(exc: BaseException, *, what: str, collection: str, where: str, timeout: float | None,
              secrets: list[str], db_name: str | None = None) -> MemkitError:
    """The MemkitError that says what went wrong with ``what`` (an operation) and what to do about it."""
    status, text, first = _describe(exc)
    low = text.lower()
    detail = scrub(first, secrets)[:300]
    head = f"milvus {what} on collection {collection!r} at {where} failed"
    if status == "UNAUTHENTICATED" or "auth" in low or "credential" in low or "password" in low:
        return ConfigError(f"{head}: the server refused the credentials; pass token='user:password' (or an API key) "
                           "of a user allowed to use this database. The token is not shown here")
    if re.search(r"database\b[^|]*\bnot (found|exist)", low):
        return ConfigError(f"{head}: database {db_name!r} does not exist on the server; pass an existing db_name "
                           "(or create it with pymilvus MilvusClient.create_database first)")
    if any(s in low for s in DROPPED):
        return ConfigError(f"{head}: the collection is gone (another client dropped it; what it held is lost on "
                           "the server). Open the bank again to create an empty collection, or restore a save with "
                           "MilvusBank.restore(dir, uri=...)")
    if any(s in low for s in LOADING):
        return BackendUnavailableError(f"{head}: the server is still loading the collection (as after a restart); "
                                       f"retry in a few seconds ({detail})")
    if status in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED") or any(s in low for s in UNREACHABLE):
        limit = f" within {timeout:g}s" if timeout else ""
        return BackendUnavailableError(
            f"{head}: the server could not be reached or did not answer{limit} ({detail}). Check that the Milvus "
            f"server at {where} is running and reachable, then retry (raise timeout= if it is only slow); "
            "everything the bank acknowledged before is kept on the server")
    return ConfigError(f"{head}: {detail}; check that the server is reachable and nothing else changed the "
                       "collection")


def is_rpc_error(exc: BaseException) -> bool:
    """Whether ``exc`` came from pymilvus or gRPC (not a bug in memkit)."""
    from pymilvus.exceptions import MilvusException

    try:
        import grpc

        rpc: tuple[type[BaseException], ...] = (grpc.RpcError,)
    except ImportError:  # pragma: no cover - pymilvus depends on grpcio
        rpc = ()
    return isinstance(exc, (MilvusException, *rpc, ConnectionError, TimeoutError))
