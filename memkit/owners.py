"""Which process owns something memkit left on disk: host, boot, pid and the process's start time.

A pid alone cannot say a process is gone: pids are reused, and a new process with the same pid would make a
leftover look alive (or, worse, a live process's directory look stale if only the pid were compared with a
recorded one). The record here adds the start time of the process (``/proc/<pid>/stat`` field 22, in clock ticks
since boot) and the boot id, so a record matches only the very process that wrote it. :func:`owner_gone` answers
True only when that is certain: the record names this host, and this boot has no process with that pid and
start time (or the machine has rebooted since). Anything it cannot tell (another host, no ``/proc``, a process it
may not inspect) counts as alive, so a caller never removes what might still be in use.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

__all__ = ["owner_record", "owner_gone", "process_start"]

_PROC = Path("/proc")


def _boot_id() -> str | None:
    try:
        return (_PROC / "sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` as a token, ``""`` when no such process exists, None when it cannot be
    told (no ``/proc``: not Linux, or a restricted mount)."""
    if not (_PROC / "self/stat").exists():
        return None
    try:
        stat = (_PROC / str(int(pid)) / "stat").read_text()
    except FileNotFoundError:
        return ""
    except (OSError, ValueError):
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None  # field 22 of stat = index 19 after the first two


def owner_record() -> dict[str, Any]:
    """This process: ``{"host", "boot", "pid", "start"}`` (boot and start None where they cannot be read)."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": pid, "start": process_start(pid) or None}


def owner_gone(record: Any) -> bool:
    """True only when ``record`` (from :func:`owner_record`) certainly names a process that no longer runs."""
    if not isinstance(record, dict):
        return False
    host, boot, pid, start = (record.get(k) for k in ("host", "boot", "pid", "start"))
    if host != socket.gethostname() or isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False  # another machine's process (a shared disk), or a record memkit did not write
    if not isinstance(start, str) or not start:
        return False  # written where the start time could not be read: nothing to tell a reused pid apart
    ours = _boot_id()
    if isinstance(boot, str) and ours is not None and boot != ours:
        return True  # the machine has rebooted since: every process of that boot is gone
    now = process_start(pid)
    if now is None:
        return False
    return now != start  # "" = no such process; another start time = the pid was reused by a new process
