"""memkit's private temporary directories: made with an owner record, removed at exit or at the next start.

Two kinds (:class:`Kind`): the K/V store's spill directories (described below) and temporary disk banks
(``backends/disk_bank.py``: a bank made without a path, and the private copy ``load_bank`` opens), which live in the
system's temporary directory as ``memkit-disk-XXXXXXXX`` and follow the same rules with their own files (the next
temporary disk bank sweeps those of killed processes).

Each store that spills pages makes one private directory ``<disk_dir>/memkit-kv-XXXXXXXX`` holding ``owner.json``
(sealed: host, boot id, pid and start time of the process, :mod:`memkit.owners`) and its page files
``seg-NNNNN.bin``. It is removed when the store closes, when the store is garbage collected, and at normal
interpreter exit (a ``weakref.finalize``, which ``atexit`` runs). A process killed by a signal (SIGKILL, or SIGTERM
without a handler: memkit installs none) cannot remove it; the next store that starts on the same ``disk_dir``
does (:func:`sweep`), once the owner record proves the process that made it is gone.

:func:`sweep` removes a directory only when all of these hold: its name has the kind's prefix (``memkit-kv-*``), it
is a real directory (not a link), its ``owner.json`` is a sealed memkit record of that kind naming a process of
this host that is gone (not running, or its pid now belongs to a process started later), and it holds nothing but
that record and the kind's regular files (``seg-NNNNN.bin``). It unlinks those files one by one and then removes
the empty directory, so anything else (a file of yours, a directory, a link, a directory of a live process or another host's process)
is left alone.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memkit.errors import CorruptFileError
from memkit.files import check_seal, read_json, write_json
from memkit.owners import owner_gone, owner_record

__all__ = ["KV", "Kind", "PREFIX", "OWNER_FILE", "make_spill_dir", "remove_spill_dir", "sweep", "segment_name"]

OWNER_FILE = "owner.json"


@dataclass(frozen=True)
class Kind:
    """One kind of private directory: its name prefix, its owner record's format and the only files it holds
    besides that record (anything else found inside keeps the directory from being swept)."""

    prefix: str
    format: str
    files: re.Pattern[str]


KV = Kind("memkit-kv-", "memkit-kv-spill", re.compile(r"seg-\d{5}\.bin"))
PREFIX, FORMAT = KV.prefix, KV.format


def segment_name(index: int) -> str:
    return f"seg-{index:05d}.bin"


def make_spill_dir(root: Path, kind: Kind = KV) -> str:
    """A new private directory of ``kind`` under ``root`` (created if missing) holding this process's owner
    record; leftovers of processes that are gone are removed first."""
    root.mkdir(parents=True, exist_ok=True)
    sweep(root, kind)
    directory = tempfile.mkdtemp(prefix=kind.prefix, dir=root)
    write_json(Path(directory) / OWNER_FILE, {"format": kind.format, "version": 1, **owner_record()})
    return directory


def _only_ours(directory: Path, kind: Kind) -> list[Path] | None:
    """The files to remove (segments, then the owner record) when ``directory`` holds nothing else; else None."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return None
    files = []
    for entry in entries:
        if not (kind.files.fullmatch(entry.name) or entry.name == OWNER_FILE):
            return None
        try:
            if not stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                return None
        except OSError:
            return None
        files.append(Path(entry.path))
    return sorted(files, key=lambda p: p.name == OWNER_FILE)  # the owner record goes last


def remove_spill_dir(directory: str | Path, kind: Kind = KV) -> bool:
    """Remove a private directory holding only memkit's files (those of ``kind`` and the owner record); True when
    gone."""
    directory = Path(directory)
    files = _only_ours(directory, kind)
    if files is None:
        return False
    for f in files:
        try:
            f.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            return False
    try:
        directory.rmdir()  # fails, leaving it, if anything appeared meanwhile
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _stale(directory: Path, kind: Kind) -> bool:
    """True when ``directory``'s owner record is a memkit record of ``kind`` whose process is certainly gone."""
    try:
        if not stat.S_ISDIR(os.lstat(directory).st_mode):
            return False
        record: Any = read_json(directory / OWNER_FILE, "K/V spill owner record")
        if not isinstance(record, dict) or record.get("format") != kind.format:
            return False
        check_seal(record, directory / OWNER_FILE)
    except (CorruptFileError, OSError):
        return False
    return owner_gone(record)


def sweep(root: Path, kind: Kind = KV) -> list[str]:
    """Remove the directories of ``kind`` under ``root`` left by processes that are gone; returns those removed."""
    try:
        candidates = sorted(p for p in root.iterdir() if p.name.startswith(kind.prefix))
    except OSError:
        return []
    return [str(p) for p in candidates if _stale(p, kind) and remove_spill_dir(p, kind)]
