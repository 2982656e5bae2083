"""Peak RAM while ingesting N chunk vectors into the ``disk`` backend, then searching them.

    python benchmarks/disk_ram.py --n 1000000 --dim 384 --out benchmarks/results/disk_ram.json

Runs in its own process so the figures are this workload's: ``baseline`` is the resident set after
imports and bank creation, ``peak`` is the kernel's high-water mark (``VmHWM``) over ingest and search.
The vectors are generated batch by batch (never all in RAM), as a streaming ingest would receive them.
Bounded RAM means ``peak - baseline`` stays near one batch plus one search block, whatever N is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    try:  # Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def run(n: int, dim: int, batch: int, directory: str | None = None) -> dict:
    import memkit

    work = Path(directory or tempfile.mkdtemp(prefix="memkit-ram-"))
    bank = memkit.create_bank("disk", dim=dim, path=str(work / "bank"))
    warm = np.random.default_rng(0).standard_normal((batch, dim)).astype(np.float32)
    bank.add(warm[:1])  # first add and search load numpy/sqlite code paths: not part of the growth
    bank.search(warm[:1], 1)
    bank.remove([0])
    del warm
    _reset_peak()
    baseline = _status("VmRSS")
    t0 = time.perf_counter()
    rss_samples = []
    for s in range(0, n, batch):
        m = min(batch, n - s)
        v = np.random.default_rng(s + 1).standard_normal((m, dim)).astype(np.float32)
        bank.add(v, ids=np.arange(s, s + m))
        del v
        if (s // batch) % max(1, (n // batch) // 20) == 0:
            rss_samples.append(_status("VmRSS"))
    ingest_s = time.perf_counter() - t0
    peak_ingest = _status("VmHWM")
    q = np.random.default_rng(99).standard_normal((16, dim)).astype(np.float32)
    t0 = time.perf_counter()
    _, ids = bank.search(q, 10)
    search_s = time.perf_counter() - t0
    assert len(bank) == n and (ids >= 0).all()
    peak = _status("VmHWM")
    data_bytes = n * dim * 4
    out = {
        "n": n, "dim": dim, "batch": batch, "vector_bytes_on_disk": data_bytes,
        "baseline_rss_mb": round(baseline / 2**20, 1), "peak_rss_mb": round(peak / 2**20, 1),
        "peak_growth_mb": round((peak - baseline) / 2**20, 1),
        "peak_growth_during_ingest_mb": round((peak_ingest - baseline) / 2**20, 1),
        "growth_vs_data": round((peak - baseline) / data_bytes, 4),
        "max_sampled_rss_mb": round(max(rss_samples) / 2**20, 1),
        "ingest_s": round(ingest_s, 1), "ingest_vectors_per_s": round(n / ingest_s),
        "search_16_queries_s": round(search_s, 2),
    }
    bank.close()
    if directory is None:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--dir", default=None, help="where the bank is written (default: a temporary directory)")
    ap.add_argument("--out", default=None, help="also write the JSON result here")
    a = ap.parse_args()
    res = run(a.n, a.dim, a.batch, a.dir)
    res["pid"] = os.getpid()
    print(json.dumps(res))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
