"""Where and when a number was measured: machine facts for result headers, and matplotlib without a display.

Every table memkit writes (``memkit eval``, ``memkit bench``) carries the date, CPU, cores, RAM, load and library
versions of the run, so a number is never separated from the machine it came from.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Sequence
from importlib import metadata
from typing import Any

__all__ = ["VERSIONED", "machine_info", "machine_line", "pyplot"]

VERSIONED = ("numpy", "torch", "transformers", "faiss-cpu", "hnswlib", "usearch", "qdrant-client", "sqlite-utils",
             "pymilvus", "milvus-lite")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def machine_info(packages: Sequence[str] = VERSIONED) -> dict[str, Any]:
    """CPU model, cores, RAM, load, OS, Python and library versions, and the date (UTC)."""
    versions: dict[str, str | None] = {}
    for pkg in packages:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        usable = os.cpu_count()
    ram = _ram_bytes()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": usable,
        "ram_gib": round(ram / 2**30, 1) if ram else None,
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions,
    }


def machine_line(info: dict[str, Any]) -> str:
    """One line for a markdown header: date, CPU, cores, RAM, load, key versions."""
    vers = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items() if v)
    load = info.get("load_avg")
    load_s = f", load avg {load[0]:.1f} at start" if load else ""
    return (f"{info['date']} — {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM{load_s}; "
            f"Python {info['python']}; {vers}" + (f"; memkit @ {info['git']}" if info.get("git") else ""))


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt
