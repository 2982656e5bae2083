"""Why the K/V store's disk tier reads pages with ``pread`` and does not memory-map its page files.

InfLLM (Xiao et al. 2024) offloads K/V to host memory; memkit adds a disk tier (:mod:`memkit.pages`) so a 1M-token
prompt fits a 24 GiB machine. This script measures the two ways to read a page back from a page file:

* ``pread`` into a buffer (what :class:`memkit.pages.DiskTier` does);
* ``mmap`` the file and copy the page out (numpy slice of a mapping), optionally ``madvise(MADV_DONTNEED)`` after
  each copy so the mapping's pages leave the process.

Each way runs in its own process over the same file (the page cache is warm for all of them) and reports the time per
page and the peak resident memory (VmHWM) and file-backed resident memory (RssFile) it ends with. Pages are the
size of SmolLM2-135M's fp16 page of a 128-token chunk (30 layers x 2 x 3 heads x 128 x 64 x 2 bytes = 2.81 MiB).

    python benchmarks/disk_read.py --gib 4 --reads 3000 --out benchmarks/results/disk_read.json
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAGE_BYTES = 30 * 2 * 3 * 128 * 64 * 2


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssFile", "RssAnon"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def _read(path: str, how: str, reads: int, seed: int) -> dict[str, object]:
    import numpy as np

    n_pages = os.path.getsize(path) // PAGE_BYTES
    order = np.random.default_rng(seed).integers(0, n_pages, reads)
    buf = bytearray(PAGE_BYTES)
    view = memoryview(buf)
    before = _status()
    fd = os.open(path, os.O_RDONLY)
    t0 = time.perf_counter()
    if how == "pread":
        for p in order:
            done = 0
            while done < PAGE_BYTES:
                done += os.preadv(fd, [view[done:]], int(p) * PAGE_BYTES + done)
    else:
        mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        arr = np.frombuffer(mm, dtype=np.uint8)
        out = np.frombuffer(buf, dtype=np.uint8)
        for p in order:
            off = int(p) * PAGE_BYTES
            out[:] = arr[off:off + PAGE_BYTES]
            if how == "mmap+dontneed":
                mm.madvise(mmap.MADV_DONTNEED, off - off % mmap.PAGESIZE, PAGE_BYTES + off % mmap.PAGESIZE)
    seconds = time.perf_counter() - t0
    after = _status()
    os.close(fd)
    return {"how": how, "reads": reads, "distinct_pages": len(set(order.tolist())),
            "ms_per_page": round(1000 * seconds / reads, 3), "gb_per_s": round(reads * PAGE_BYTES / seconds / 1e9, 2),
            "rss_before": before["VmRSS"], "rss_after": after["VmRSS"], "peak_rss": after["VmHWM"],
            "rss_file_after": after.get("RssFile"), "rss_growth": after["VmHWM"] - before["VmRSS"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=4.0, help="size of the page file (default 4 GiB)")
    p.add_argument("--reads", type=int, default=3000, help="random page reads per way (default 3000)")
    p.add_argument("--dir", default=None, help="where the page file is written (default: the temp directory)")
    p.add_argument("--out", default=None, help="JSON result")
    p.add_argument("--child", nargs=3, metavar=("PATH", "HOW", "READS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_read(args.child[0], args.child[1], int(args.child[2]), seed=0)))
        return 0
    n_pages = int(args.gib * (1 << 30) // PAGE_BYTES)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="memkit-disk-read-") as d:
        path = os.path.join(d, "pages.bin")
        block = os.urandom(PAGE_BYTES)
        with open(path, "wb") as f:
            for _ in range(n_pages):
                f.write(block)
        rows = []
        for how in ("pread", "mmap", "mmap+dontneed"):
            out = subprocess.run([sys.executable, __file__, "--child", path, how, str(args.reads)],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out))
    mib = 1 << 20
    print(f"page file {n_pages} pages x {PAGE_BYTES / mib:.2f} MiB = {n_pages * PAGE_BYTES / (1 << 30):.2f} GiB, "
          f"{args.reads} random reads each")
    print("| read | ms per page | GB/s | RSS growth (peak) | file-backed RSS after |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['how']} | {r['ms_per_page']} | {r['gb_per_s']} | {r['rss_growth'] / mib:.0f} MiB | "
              f"{(r['rss_file_after'] or 0) / mib:.0f} MiB |")
    if args.out:
        from memkit.evaluation.machine import machine_info

        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(()),
                                              "page_bytes": PAGE_BYTES, "pages": n_pages, "rows": rows}, indent=1)
                                  + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
