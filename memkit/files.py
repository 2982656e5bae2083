"""Files memkit writes: atomic directory saves, sealed manifests, checksums, and never touching the user's files.

Every save (a bank, the K/V store, a memory manager) is a directory written into a hidden temporary sibling and
swapped into place in one step (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames that
:func:`recover_dir` completes after a crash), so a reader sees the old save or the new one, never half.

Before anything is written, :func:`check_save_target` makes sure the target is memkit's to replace: a path
that does not exist, an empty directory, or a directory holding a memkit save and only the files its manifest
lists. A regular file, a link, a non-empty directory without a memkit manifest, or a save with extra files in
it is refused with :class:`~memkit.errors.SaveTargetError`: memkit never deletes, moves or hides a file it
did not write.

Manifests are sealed: ``"seal"`` holds the sha256 of the manifest's canonical JSON without the seal, and every
other file in the directory is listed with its size and sha256. A reader checks both before any native loader
sees a byte, so a hand edit of any field (``metric: ip`` -> ``l2``) is refused like a flipped bit.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from memkit.errors import CorruptFileError, InvalidInputError, SaveTargetError
from memkit.paths import user_path

__all__ = ["MANIFEST", "MAX_JSON_BYTES", "SEAL", "atomic_save", "check_save_target", "check_saved_dir", "file_digests",
           "fsync_dir", "make_tmp_dir", "owner_tag", "read_json", "read_versioned_json", "recover_dir", "replace_dir", "seal",
           "check_seal", "save_path", "sha256_file", "verify_files", "write_json"]

MANIFEST = "manifest.json"
MAX_JSON_BYTES = 64 << 20  # a manifest larger than this is refused before it is parsed
SEAL = "seal"  # manifest field: sha256 of the manifest's canonical JSON without this field
# Index files that mark a directory as a memkit save: name -> the "format" values that file may carry.
MARKERS = {MANIFEST: ("memkit-bank", "memkit-memory"), "kvstore.json": ("memkit-kvstore",)}


# ---------------------------------------------------------------------- checksums and seals
def sha256_file(path: Path) -> str:
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
            out[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def _canonical(data: dict[str, Any]) -> bytes:
    body = {k: v for k, v in data.items() if k != SEAL}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def seal(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` plus its seal (sha256 of the canonical JSON of every other field)."""
    return dict(data, **{SEAL: hashlib.sha256(_canonical(data)).hexdigest()})


def check_seal(data: dict[str, Any], path: Path) -> None:
    """Refuse a manifest whose fields were changed after it was written."""
    try:
        ok = isinstance(data.get(SEAL), str) and hashlib.sha256(_canonical(data)).hexdigest() == data[SEAL]
    except (TypeError, ValueError):  # a value JSON cannot hold canonically
        ok = False
    if not ok:
        raise CorruptFileError(f"{path} fails its seal: a field was edited after memkit wrote it (or the file is "
                               "damaged); memkit trusts no field of it. Re-save from the original object")


def write_json(path: Path, data: dict[str, Any], *, sealed: bool = True) -> None:
    """Write ``data`` (sealed by default) as JSON and fsync it."""
    with path.open("w") as fh:
        json.dump(seal(data) if sealed else data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


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


def read_versioned_json(directory: Path, name: str, *, fmt: str, version: int, what: str, writer: str) -> dict[str, Any]:
    """Recover ``directory`` after a crashed swap, then read ``name`` in it: a sealed JSON object of format
    ``fmt`` at ``version``."""
    recover_dir(directory)
    path = directory / name
    check_saved_dir(directory, what)
    if not os.path.lexists(path):
        raise CorruptFileError(f"{str(directory)!r} has no {name}; was it written by {writer}?")
    data = read_json(path, what)
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise CorruptFileError(f"{path} is not a {what}")
    if data.get("version") != version:
        raise CorruptFileError(f"{path} has format version {data.get('version')!r}; this memkit reads version "
                               f"{version}. Re-save it with a matching memkit version")
    check_seal(data, path)
    return data


def check_saved_dir(directory: Path, what: str) -> None:
    """Refuse to load ``what`` from ``directory`` unless it is a directory, saying what it is instead."""
    if directory.is_dir():
        return
    if not os.path.lexists(directory):
        raise CorruptFileError(f"cannot load the {what}: {str(directory)!r} does not exist; give the directory it was "
                               "saved to")
    kind = "a broken symbolic link" if directory.is_symlink() else "a file"
    raise CorruptFileError(f"cannot load the {what}: {str(directory)!r} is {kind}, not a directory (memkit saves are "
                           "directories); give the directory it was saved to")


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
        if sha256_file(p) != info.get("sha256"):
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


# ---------------------------------------------------------------------- what may be replaced
def save_path(path: Any, what: str) -> Path:
    """``path`` as a Path, ``~`` and ``$VARIABLES`` expanded (:mod:`memkit.paths`), refusing what is not a usable
    path (None, "", bytes with NUL...)."""
    p = user_path(path, what)
    if p.name in ("", ".", ".."):
        raise InvalidInputError(f"{what}: {os.fspath(path)!r} names the current or a parent directory; give the save "
                                "its own directory, e.g. 'memory/'")
    return p


def _marker(directory: Path) -> dict[str, Any] | None:
    for name, formats in MARKERS.items():
        path = directory / name
        if os.path.lexists(path):
            try:
                data = read_json(path, "memkit save index")
            except CorruptFileError:
                return None
            if isinstance(data, dict) and data.get("format") in formats:
                return dict(data, _marker=name)
    return None


def check_save_target(target: Path, what: str) -> None:
    """Refuse to write ``what`` to ``target`` unless replacing it can only remove files memkit wrote."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        parent = target.parent
        if os.path.lexists(parent) and not parent.is_dir():
            raise SaveTargetError(f"cannot save {what} to {str(target)!r}: {str(parent)!r} is a file, not a "
                                  "directory; choose a path inside a directory") from None
        return
    except OSError as exc:
        raise SaveTargetError(f"cannot save {what} to {str(target)!r}: {exc.strerror}; choose another path") from exc
    if stat.S_ISLNK(st.st_mode):
        raise SaveTargetError(f"{str(target)!r} is a symbolic link; memkit does not replace links. Save to the "
                              "directory it points to, or to a new path")
    if not stat.S_ISDIR(st.st_mode):
        raise SaveTargetError(f"{str(target)!r} exists and is a file, not a memkit save; memkit never replaces a "
                              f"file it did not write. Save {what} to a new or empty directory")
    try:
        entries = list(target.iterdir())
    except OSError as exc:
        raise SaveTargetError(f"cannot read {str(target)!r} ({exc.strerror}); choose another path") from exc
    if not entries:
        return
    marker = _marker(target)
    if marker is None:
        shown = ", ".join(sorted(p.name for p in entries)[:3])
        raise SaveTargetError(f"{str(target)!r} is a non-empty directory that is not a memkit save (it holds "
                              f"{shown}...); memkit replaces only its own saves. Save {what} to a new or empty "
                              "directory")
    listed = set(marker.get("files") or {}) | {marker["_marker"]}
    extra = sorted(p.relative_to(target).as_posix() for p in target.rglob("*")
                   if (p.is_file() or p.is_symlink()) and p.relative_to(target).as_posix() not in listed)
    if extra:
        raise SaveTargetError(f"{str(target)!r} holds a memkit save plus files it did not write ({extra[:3]}); "
                              "replacing it would delete them. Move them out or save to another directory")


@contextmanager
def atomic_save(path: Any, what: str) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``path`` atomically, on error it is removed.

    ``path`` must be memkit's to replace (:func:`check_save_target`); OS errors become ``SaveTargetError``.
    """
    target = save_path(path, f"saving {what}")
    check_save_target(target, what)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_tmp_dir(target)
    except OSError as exc:
        raise SaveTargetError(f"cannot save {what} to {str(target)!r}: {exc.strerror or exc}; choose a writable "
                              "directory") from exc
    try:
        yield tmp
        check_save_target(target, what)  # nothing of the user's appeared there while we wrote
        replace_dir(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (CorruptFileError, SaveTargetError)):
            raise
        raise SaveTargetError(f"saving {what} to {str(target)!r} failed: {exc.strerror or exc}; nothing was "
                              "changed there") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------- atomic replace and crash recovery
def replace_dir(tmp: Path, target: Path) -> None:
    """Swap ``tmp`` into ``target`` so a crash at any instant leaves either the old or the new directory.

    On Linux the two directories are exchanged in one atomic ``renameat2(RENAME_EXCHANGE)``; elsewhere
    the old directory is renamed aside first, and :func:`recover_dir` puts it back if a crash lands
    between the two renames.
    """
    _fsync_tree(tmp)
    if os.path.lexists(target):
        if _exchange(tmp, target):  # tmp now holds the old save
            fsync_dir(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = target.with_name(f".{_stem(target)}.old-{owner_tag()}-{threading.get_ident()}")
        os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent)


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


def owner_tag() -> str:
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}"


def _stem(target: Path) -> str:
    """``target``'s name as it appears in its temporary siblings: ASCII-safe, so native libraries can open them."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", target.name)[:48]
    return safe if safe == target.name else f"{safe}-{hashlib.sha256(os.fsencode(target.name)).hexdigest()[:8]}"


def make_tmp_dir(target: Path) -> Path:
    """A fresh hidden sibling of ``target`` to write a save into, after tidying up crashed saves.

    Its name carries this host and pid, so leftovers of a killed save (``.name.tmp-host-pid-*`` and
    ``.name.old-host-pid-*``) are removed by the next save once that process is gone.
    """
    recover_dir(target)
    _remove_stale(target)
    return Path(tempfile.mkdtemp(prefix=f".{_stem(target)}.tmp-{owner_tag()}-", dir=target.parent))


def _stale_siblings(target: Path, kind: str) -> list[Path]:
    """Leftovers of saves into ``target`` by processes of this host that no longer run."""
    host = owner_tag().rsplit("-", 1)[0]
    out = []
    try:
        siblings = list(target.parent.glob(f".{glob.escape(_stem(target))}.{kind}-{host}-*"))
    except OSError:  # pragma: no cover
        return []
    for p in siblings:
        pid = p.name[len(f".{_stem(target)}.{kind}-{host}-"):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or not p.is_dir() or p.is_symlink():
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
    olds = [p for p in _stale_siblings(target, "old") if _marker(p) is not None]
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
            fsync_dir(p)
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
