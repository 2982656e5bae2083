"""``memkit bench backends``: every MemoryBank backend on real vectors, and memkit's own overhead.

For each dataset (real MiniLM text embeddings, real SmolLM2 attention keys; see
:mod:`memkit.bench.vectors`), size and backend, one fresh subprocess (so RSS is clean and a crash
in a native library cannot take the run down) measures:

* build time (bulk ``add`` in batches of 10,000) and streaming add throughput (the last
  vectors added 64 at a time, the way memory fills during generation);
* single-query latency p50/p99 and QPS for batches of 64 queries;
* recall@10 against exact search (numpy, computed once per dataset and size);
* RAM (RSS growth of the process while building) and disk bytes (size of ``bank.save()``);
* overhead: ``bank.search`` against calling the backend's library directly on the same index
  with the same queries and settings (``index.search`` for faiss, ``knn_query`` for hnswlib,
  ``index.search`` for usearch, the same block-streamed numpy scan over the memory-mapped file
  for disk, ``query_points`` for qdrant, pymilvus ``MilvusClient.search`` for milvus), interleaved call by
  call; ratio of medians.

A backend may be a server URI (``milvus://user:password@host:19530/collection``, a new collection that the cell
drops again): the row is labelled ``milvus-server`` and credentials never reach the results; ``--bank-params``
passes JSON parameters to URI backends (``index_type``, ``search_params``...). A Milvus server's build time
includes ``flush`` and waiting for its index to cover the bulk-added rows (``flush_s``), since that is when the
server searches them through the index; its RAM is the client's alone (the server is another process).

Cells that cannot run here are kept as rows with the reason (a size larger than the corpus, an
estimated build time over ``--max-build-s`` extrapolated from the previous size, a missing
backend). Results: ``<out>/backends.json``, ``backends.md`` and ``backends_*.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import report

ALL_BACKENDS = ["faiss-flat", "faiss-hnsw", "faiss-ivf", "hnswlib", "usearch", "disk", "qdrant", "milvus"]
QUICK_BACKENDS = ["faiss-flat", "faiss-hnsw", "hnswlib", "usearch", "disk"]
DATASETS = ["minilm", "minilm-tokens", "smollm2-keys"]
GRAPH = {"faiss-hnsw", "hnswlib", "usearch"}  # build grows ~n log n
TARGET = 1.05

COLUMNS = [
    report.Column("dataset", "data"),
    report.Column("n", "n", ","),
    report.Column("backend", "backend"),
    report.Column("build_s", "build s", ".2f"),
    report.Column("add_vps", "stream add vec/s", ",.0f"),
    report.Column("p50_ms", "1-query p50 ms", ".3f"),
    report.Column("p99_ms", "1-query p99 ms", ".3f"),
    report.Column("qps", "QPS (batch 64)", ",.0f"),
    report.Column("recall", "recall@10", ".3f"),
    report.Column("ram_mb", "RAM MB", ",.1f"),
    report.Column("disk_mb", "disk MB", ",.1f"),
    report.Column("ratio_1", "overhead 1q", ".3f"),
    report.Column("ratio_64", "overhead 64q", ".3f"),
    report.Column("overhead_us_1", "+µs per 1q call", ".0f"),
    report.Column("note", "note"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"10k MiniLM vectors, backends {','.join(QUICK_BACKENDS)}; about a minute")
    parser.add_argument("--backends", default=None, help=f"comma list (default: all of {','.join(ALL_BACKENDS)})")
    parser.add_argument("--datasets", default=None, help=f"comma list from {DATASETS} (default: minilm,smollm2-keys)")
    parser.add_argument("--bank-params", default=None, metavar="JSON",
                        help="parameters for URI backends, e.g. '{\"index_type\": \"HNSW\", \"search_params\": {\"ef\": 64}}'")
    parser.add_argument("--sizes", default=None,
                        help="comma list of base sizes (default 10000,100000,1000000; --quick: 10000). MiniLM sizes "
                             "beyond the corpus are reported as impossible and the largest possible size is run")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries per dataset (default 1000)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64, help="queries per batch for QPS (default 64)")
    parser.add_argument("--rounds", type=int, default=400, help="interleaved overhead rounds, at most (default 400)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="time cap per timing loop (single / batch), per cell (default 6; --quick: 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per search/build (OMP/BLAS, hnswlib num_threads, usearch threads); 0 = library "
                             "defaults. Default 1: on a shared 2-core machine extra threads only add scheduling noise")
    parser.add_argument("--max-build-s", type=float, default=300.0,
                        help="skip a cell whose build, extrapolated from the previous size, would take longer")
    parser.add_argument("--cell-timeout", type=float, default=1200.0, help="kill a cell's subprocess after this")
    parser.add_argument("--out", default="benchmarks/results", help="output folder (default benchmarks/results)")
    parser.add_argument("--name", default="backends", help="file name stem of the results (default backends)")
    parser.add_argument("--from-json", default=None, metavar="PATH",
                        help="measure nothing: redraw the markdown table and plots from a results JSON")


# ---------------------------------------------------------------------- parent: planning
def _exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids by inner product, in numpy (blocks of 100k rows to bound memory)."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.full((len(queries), 0), -1, np.int64)
    for s in range(0, len(base), 100_000):
        sc = queries @ base[s : s + 100_000].T  # (q, b)
        kk = min(k, sc.shape[1])
        part = np.argpartition(-sc, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(sc, part, 1)], 1)
        best_i = np.concatenate([best_i, part + s], 1)
    order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(best_i, order, 1)


def _parse_list(text: str | None, default: list[str]) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()] if text else list(default)


def _plan_sizes(dataset: str, sizes: list[int], n_query: int) -> list[tuple[int, str | None]]:
    """(size, reason it cannot run or None); MiniLM sizes are capped by the corpus."""
    if dataset != "minilm":
        return [(n, None) for n in sizes]
    from .vectors import minilm_available, minilm_cached

    cap = minilm_available() - n_query
    out: list[tuple[int, str | None]] = [
        (n, None if n <= cap else f"impossible here: the corpus holds {cap + n_query:,} distinct paragraphs "
         f"({cap:,} + {n_query} queries); 1M would also need ~2.3 h of MiniLM at ~120 paragraphs/s") for n in sizes]
    largest_ok = max([n for n in sizes if n <= cap], default=0)
    if any(n > cap for n in sizes):
        # Instead of 100k / 1M: the largest set the corpus allows, or the largest already embedded.
        sub = min(cap, minilm_cached() - n_query)
        if sub > largest_ok:
            out.append((sub, None))
    return sorted(out)


def _stand_in_note(n: int, n_query: int) -> str:
    from .vectors import minilm_available

    total = minilm_available()
    if n + n_query >= total:
        return f"stands in for 100k / 1M: the whole corpus ({total:,} paragraphs)"
    return (f"stands in for 100k / 1M: the largest MiniLM prefix embedded so far ({n + n_query:,} of {total:,} "
            "paragraphs; run minilm_prefix() longer to cache more)")


def _estimate(prev: dict[str, Any] | None, n: int, backend: str) -> float | None:
    if not prev or not prev.get("build_s"):
        return None
    f = n / prev["n"]
    if backend in GRAPH:
        f *= math.log(n) / math.log(prev["n"])
    return prev["build_s"] * f


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], machine: dict[str, Any], notes: list[str],
           extra: dict[str, Any]) -> dict[str, Path]:
    return report.write_results(
        args.name, rows, COLUMNS, "MemoryBank backends on real vectors", machine, out_dir=args.out, notes=notes,
        plots={"recall_qps": lambda plt: _plot_recall_qps(plt, rows), "latency": lambda plt: _plot_latency(plt, rows),
               "overhead": lambda plt: _plot_overhead(plt, rows)}, extra=extra)


def run(args: argparse.Namespace) -> int:
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        extra = {k: doc[k] for k in ("elapsed_s", "settings", "datasets", "target_overhead", "command") if k in doc}
        paths = _write(args, doc["rows"], doc["machine"], doc.get("notes", []), extra)
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
        return 0
    t_start = time.perf_counter()
    backends = _parse_list(args.backends, QUICK_BACKENDS if args.quick else ALL_BACKENDS)
    datasets = _parse_list(args.datasets, ["minilm"] if args.quick else ["minilm", "smollm2-keys"])
    try:
        extra_params = json.loads(args.bank_params) if args.bank_params else {}
        assert isinstance(extra_params, dict)
    except (ValueError, AssertionError):
        print(f"memkit bench backends: --bank-params must be a JSON object, got {args.bank_params!r}", file=sys.stderr)
        return 2
    sizes = [int(s) for s in _parse_list(args.sizes, ["10000"] if args.quick else ["10000", "100000", "1000000"])]
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 6.0
        args.rounds = min(args.rounds, 200) if args.quick else args.rounds
    for d in datasets:
        if d not in DATASETS:
            print(f"memkit bench backends: unknown dataset {d!r}; choose from {DATASETS}", file=sys.stderr)
            return 2
    machine = report.machine_info()
    print(f"memkit bench backends — {report.machine_line(machine)}", flush=True)
    rows: list[dict[str, Any]] = []
    sources: dict[str, str] = {}
    work = Path(tempfile.mkdtemp(prefix="memkit-bench-"))
    try:
        for dataset in datasets:
            prev: dict[str, dict[str, Any]] = {}
            for n, reason in _plan_sizes(dataset, sizes, args.queries):
                if reason:
                    rows.append({"dataset": dataset, "n": n, "backend": "all", "status": "impossible", "note": reason})
                    print(f"[{dataset} n={n:,}] {reason}", flush=True)
                    continue
                from .vectors import load_set

                t0 = time.perf_counter()
                vs = load_set(dataset, n, args.queries, log=lambda m: print(m, flush=True))
                sources[dataset] = vs.source
                gt = _exact_topk(vs.base, vs.queries, args.k)
                cell_dir = work / f"{dataset}-{n}"
                cell_dir.mkdir()
                for key, arr in (("base", vs.base), ("queries", vs.queries), ("gt", gt)):
                    np.save(cell_dir / f"{key}.npy", arr)
                print(f"[{dataset} n={n:,}] data + exact ground truth ready in {time.perf_counter() - t0:.1f}s", flush=True)
                del vs
                for backend in backends:
                    row = {"dataset": dataset, "n": n, "backend": label(backend)}
                    est = _estimate(prev.get(backend), n, backend)
                    if est is not None and est > args.max_build_s:
                        p = prev[backend]
                        row.update(status="skipped", note=f"skipped: build estimated at {est / 60:.0f} min from "
                                   f"{p['build_s']:.0f}s at n={p['n']:,} (> --max-build-s {args.max_build_s:.0f})")
                    elif backend in prev and prev[backend].get("status") != "ok":
                        row.update(status="skipped", note=f"skipped: {prev[backend].get('status')} at n={prev[backend]['n']:,}")
                    else:
                        row.update(_run_cell(backend, cell_dir, args, metric="ip", params=extra_params))
                        if n not in sizes and row.get("status") == "ok" and not row.get("note"):
                            row["note"] = _stand_in_note(n, args.queries)
                    rows.append(row)
                    prev[backend] = {**row}
                    _print_row(row)
                shutil.rmtree(cell_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    notes = _notes(rows, sources, args, elapsed)
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    settings["backends"] = ",".join(scrub_uri(b) for b in backends)  # never a password in the results
    command = " ".join(["memkit" if Path(sys.argv[0]).name == "__main__.py" else Path(sys.argv[0]).name,
                        *(",".join(scrub_uri(x) for x in a.split(",")) for a in sys.argv[1:])])
    paths = _write(args, rows, machine, notes,
                   {"elapsed_s": elapsed, "settings": settings, "command": command,
                    "datasets": sources, "target_overhead": TARGET})
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {elapsed:.0f}s", flush=True)
    return 0


def label(backend: str) -> str:
    """The row name of a backend: a server URI becomes ``<scheme>-server`` (no address, no credentials)."""
    scheme, _, rest = backend.partition("://")
    return f"{scheme}-server" if rest.split("/")[0] else backend


def scrub_uri(backend: str) -> str:
    """A backend spec without the user:password of a URI."""
    if "://" not in backend or "@" not in backend.split("://", 1)[1].split("/")[0]:
        return backend
    scheme, rest = backend.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def _run_cell(backend: str, cell_dir: Path, args: argparse.Namespace, *, metric: str,
              params: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = {"backend": backend, "dir": str(cell_dir), "k": args.k, "batch": args.batch, "rounds": args.rounds,
            "seconds": args.seconds, "metric": metric, "threads": args.threads,
            "params": params if "://" in backend else {}}
    cmd = [sys.executable, "-m", "memkit.bench.backends", "--worker", json.dumps(spec)]
    env = dict(os.environ)
    if args.threads > 0:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(args.threads)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cell_timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"cell exceeded --cell-timeout {args.cell_timeout:.0f}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"status": "error", "note": f"exit {proc.returncode}: {err}"}
    return json.loads(lines[-1])


def _print_row(row: dict[str, Any]) -> None:
    if row.get("status") != "ok":
        print(f"  {row['backend']:<11} {row.get('note') or row.get('status')}", flush=True)
        return
    print(f"  {row['backend']:<11} build {row['build_s']:7.2f}s  p50 {row['p50_ms']:8.3f}ms  QPS {row['qps']:9,.0f}  "
          f"recall {row['recall']:.3f}  RAM {row['ram_mb']:8.1f}MB  disk {row['disk_mb']:8.1f}MB  "
          f"overhead 1q {row['ratio_1']:.3f} 64q {row['ratio_64']:.3f}", flush=True)


def _notes(rows: list[dict[str, Any]], sources: dict[str, str], args: argparse.Namespace, elapsed: float) -> list[str]:
    notes = [f"**{d}**: {s}." for d, s in sources.items()]
    notes += [
        f"recall@{args.k} against exact inner-product search in numpy over the same vectors; every backend runs with "
        "its memkit defaults and metric `ip`.",
        "build s: bulk `bank.add` in batches of 10,000; stream add: the last vectors (up to 2,000) added 64 at a time. "
        "RAM: RSS growth of a fresh process while building; disk: bytes written by `bank.save()`.",
        f"overhead = median over interleaved rounds (up to {args.rounds}; each round calls `bank.search` and the "
        f"library's own search on the same index, query and settings back to back, in shuffled order) of the ratio "
        f"bank time / library time, for 1 query and for a batch of {args.batch}; target <= {TARGET}. The JSON also "
        "holds the ratio of the two medians. +µs: median bank minus median library time for one query. The machine "
        f"is shared and noisy (2 cores, other jobs): medians, not means; {args.threads or 'default'} thread(s).",
        f"Whole run: {elapsed / 60:.1f} min.",
    ]
    worst = [r for r in rows if r.get("status") == "ok" and max(r.get("ratio_1") or 0, r.get("ratio_64") or 0) > TARGET]
    if worst:
        notes.append("Over the 5% target: " + ", ".join(
            f"{r['backend']} ({r['dataset']} n={r['n']:,}: {r['ratio_1']:.3f} / {r['ratio_64']:.3f})" for r in worst) + ".")
    return notes


# ---------------------------------------------------------------------- plots
def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def _colors(names: list[str]) -> dict[str, Any]:
    """One fixed colour per backend, the same in every plot."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    order = ALL_BACKENDS + sorted(set(names) - set(ALL_BACKENDS))
    return {b: cmap(order.index(b) % 10) for b in names}


def _plot_recall_qps(plt: Any, rows: list[dict[str, Any]]) -> Any:
    ok = _ok(rows)
    if not ok:
        return None
    datasets = sorted({r["dataset"] for r in ok})
    colors = _colors(sorted({r["backend"] for r in ok}))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        sizes = sorted({r["n"] for r in ok if r["dataset"] == d})
        for r in (r for r in ok if r["dataset"] == d):
            ms = 30 + 90 * sizes.index(r["n"])
            ax.scatter(r["recall"], r["qps"], s=ms, color=colors[r["backend"]], alpha=0.8, edgecolor="k")
            ax.annotate(f"{r['n'] // 1000}k", (r["recall"], r["qps"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set(xlabel="recall@10", ylabel="QPS (batches of 64)", yscale="log", title=d)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=b) for b, c in colors.items()]
    axes[0][-1].legend(handles=handles, fontsize=8, loc="best")
    fig.suptitle("Recall@10 vs throughput per backend (marker size = n)")
    return fig


def _plot_latency(plt: Any, rows: list[dict[str, Any]]) -> Any:
    ok = _ok(rows)
    if not ok:
        return None
    groups = sorted({(r["dataset"], r["n"]) for r in ok})
    backends = [b for b in ALL_BACKENDS if any(r["backend"] == b for r in ok)] + \
        sorted({r["backend"] for r in ok} - set(ALL_BACKENDS))
    colors = _colors(backends)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(groups)), 4.5))
    w = 0.8 / len(backends)
    for j, b in enumerate(backends):
        xs, p50, p99 = [], [], []
        for i, g in enumerate(groups):
            r = next((r for r in ok if (r["dataset"], r["n"]) == g and r["backend"] == b), None)
            if r:
                xs.append(i + (j - (len(backends) - 1) / 2) * w)
                p50.append(r["p50_ms"])
                p99.append(r["p99_ms"])
        ax.bar(xs, p50, w, color=colors[b], label=b)
        ax.errorbar(xs, p50, yerr=[np.zeros(len(p50)), np.subtract(p99, p50)], fmt="none", ecolor="k", lw=0.8, capsize=2)
    ax.set_xticks(range(len(groups)), [f"{d}\n{n:,}" for d, n in groups], fontsize=8)
    ax.set(ylabel="single-query latency, ms (bar p50, whisker p99)", yscale="log",
           title="Single-query search latency through memkit")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _plot_overhead(plt: Any, rows: list[dict[str, Any]]) -> Any:
    ok = [r for r in _ok(rows) if r.get("ratio_1") is not None]
    if not ok:
        return None
    labels = [f"{r['backend']}\n{r['dataset'][:6]} {r['n'] // 1000}k" for r in ok]
    fig, ax = plt.subplots(figsize=(max(7, 0.55 * len(ok)), 4.2))
    x = np.arange(len(ok))
    ax.bar(x - 0.2, [r["ratio_1"] for r in ok], 0.4, label="1 query")
    ax.bar(x + 0.2, [r["ratio_64"] for r in ok], 0.4, label="batch of 64")
    ax.axhline(TARGET, color="r", ls="--", lw=1, label=f"target {TARGET}")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xticks(x, labels, fontsize=6, rotation=90)
    ax.set(ylabel="bank.search / direct library call (median)", title="memkit layer overhead, same index and queries")
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------- worker (one cell, own process)
def _direct_search(bank: Any, backend: str, k: int, batch: int) -> Any:
    """The backend library's own search on the bank's index, with the bank's settings, as ``f(q)``."""
    if backend.startswith("faiss"):
        index = bank.index
        if backend == "faiss-hnsw":
            import faiss

            faiss.downcast_index(index.index).hnsw.efSearch = max(bank.ef_search, k)  # type: ignore[attr-defined]
        return lambda q: index.search(q, k)
    if backend == "hnswlib":
        index, threads = bank.index, bank.native_threads()
        return lambda q: index.knn_query(q, k=k, num_threads=threads)
    if backend == "usearch":
        index, tmap = bank.index, {m: bank.native_threads(m) for m in (1, batch)}
        return lambda q: index.search(q, k, threads=tmap[len(q)])
    if backend == "disk":
        return _disk_direct(bank, k)
    if backend == "qdrant":
        return _qdrant_direct(bank, k)
    if backend == "milvus":
        return _milvus_direct(bank, k)
    return None


def _disk_direct(bank: Any, k: int) -> Any:
    """Plain numpy over the bank's own memory-mapped vector file: block matmul + argpartition merge."""
    from memkit.backends import disk_bank

    n = bank.n_rows
    mat = np.memmap(bank.path / disk_bank.VEC_FILE, np.float32, "r", shape=(n, bank.dim))  # (n, dim)
    rid = np.memmap(bank.path / disk_bank.IDS_FILE, np.int64, "r", shape=(n,))
    B = bank.block_rows

    def search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bs = np.full((len(q), 0), -np.inf, np.float32)
        bi = np.full((len(q), 0), -1, np.int64)
        for s in range(0, n, B):
            sc = q @ mat[s : s + B].T  # (q, b)
            kk = min(k, sc.shape[1])
            part = np.argpartition(-sc, kk - 1, axis=1)[:, :kk]
            all_s = np.concatenate([bs, np.take_along_axis(sc, part, 1)], 1)
            all_i = np.concatenate([bi, np.asarray(rid[s : s + B])[part]], 1)
            top = np.argpartition(-all_s, min(k, all_s.shape[1]) - 1, axis=1)[:, :k]
            bs, bi = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_i, top, 1)
        order = np.argsort(-bs, axis=1, kind="stable")
        return np.take_along_axis(bs, order, 1), np.take_along_axis(bi, order, 1)

    return search


def _qdrant_direct(bank: Any, k: int) -> Any:
    """qdrant-client's own query calls on the bank's client and collection."""
    from qdrant_client import models

    client = getattr(bank, "client", None) or getattr(bank, "_client", None)
    coll = getattr(bank, "collection", None) or getattr(bank, "_collection", None)
    if client is None or coll is None:
        return None

    def search(q: np.ndarray) -> Any:
        if len(q) == 1:
            return client.query_points(coll, query=q[0].tolist(), limit=k, with_payload=False).points
        reqs = [models.QueryRequest(query=v.tolist(), limit=k, with_payload=False, with_vector=False) for v in q]
        return client.query_batch_points(coll, requests=reqs)

    return search


def _milvus_direct(bank: Any, k: int) -> Any:
    """pymilvus's own ``MilvusClient.search`` on the bank's client and collection, with the bank's settings."""
    client, coll = bank.client, bank.collection_name
    params = {"metric_type": bank.milvus_metric(), "params": dict(bank.search_params)}
    return lambda q: client.search(coll, data=q.tolist(), limit=k, anns_field="vector", search_params=params,
                                   output_fields=["id"], consistency_level=bank._level())


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one bank and measure it. Runs in its own process; returns one JSON-able row."""
    import memkit

    d = Path(spec["dir"])
    k, batch, backend = spec["k"], spec["batch"], spec["backend"]
    base = np.load(d / "base.npy")  # (n, dim), in RAM before the baseline RSS is read
    queries = np.load(d / "queries.npy")  # (q, dim)
    gt = np.load(d / "gt.npy")  # (q, k) exact ids = row numbers
    n, dim = base.shape
    tmp = Path(tempfile.mkdtemp(prefix="memkit-cell-"))
    params: dict[str, Any] = {"path": str(tmp / "live")} if backend == "disk" else dict(spec.get("params") or {})
    if spec.get("threads", 0) > 0 and backend in ("hnswlib", "usearch"):
        params["num_threads" if backend == "hnswlib" else "threads"] = spec["threads"]
    try:
        rss0 = report.rss_bytes()
        t0 = time.perf_counter()
        bank: Any = memkit.create_bank(backend, dim=dim, metric=spec["metric"], **params)
        server = not getattr(bank, "local", True)
        if server and (len(bank) or not getattr(bank, "created", False)):
            bank.close()
            return {"status": "error", "note": "the server collection exists already; name a new one in the URI"}
        n_stream = min(2000, n // 10)
        for s in range(0, n - n_stream, 10_000):
            bank.add(base[s : min(s + 10_000, n - n_stream)])
        flush_s = None
        if server:  # searchable through the server's index only once sealed and indexed
            t_f = time.perf_counter()
            bank.flush()
            while (done := bank.index_progress()[0]) < n - n_stream:
                if time.perf_counter() - t_f > 1800:
                    bank.close()
                    return {"status": "error", "note": f"after 30 min only {done:,} rows were searchable through "
                                                      "the server's index"}
                time.sleep(1.0)
            flush_s = time.perf_counter() - t_f
        build_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        for s in range(n - n_stream, n, 64):
            bank.add(base[s : min(s + 64, n)])
        add_s = time.perf_counter() - t1
        ram = report.rss_bytes() - rss0
        if len(bank) != n:
            return {"status": "error", "note": f"bank holds {len(bank)} vectors after adding {n}"}
        # recall over every query, untimed
        found = np.concatenate([bank.search(queries[s : s + batch], k).ids for s in range(0, len(queries), batch)])
        recall = float(np.mean([len(set(f) & set(g)) / k for f, g in zip(found.tolist(), gt.tolist())]))  # -1 never in gt
        direct = _direct_search(bank, bank.name if "://" in backend else backend, k, batch)
        nq = len(queries)
        singles = [np.ascontiguousarray(queries[i : i + 1]) for i in range(nq)]
        batches = [np.ascontiguousarray(queries[s : s + batch]) for s in range(0, nq - batch + 1, batch)]
        fns1 = {"bank": lambda i: bank.search(singles[i % nq], k)}
        fnsb = {"bank": lambda i: bank.search(batches[i % len(batches)], k)}
        if direct is not None:
            fns1["direct"] = lambda i: direct(singles[i % nq])
            fnsb["direct"] = lambda i: direct(batches[i % len(batches)])
        t1q = report.interleaved(fns1, spec["rounds"], max_seconds=spec["seconds"])
        tbq = report.interleaved(fnsb, max(20, spec["rounds"] // 4), max_seconds=spec["seconds"])
        s1, sb = report.summarize(t1q["bank"]), report.summarize(tbq["bank"])
        bank.save(tmp / "saved")
        disk = _dir_bytes(tmp / "saved")
        if server:  # the cell made this collection: leave the server as it was
            bank.client.drop_collection(bank.collection_name, timeout=bank.timeout)
        bank.close()
        row = {
            "status": "ok", "dim": dim, "build_s": build_s, "add_vps": n_stream / add_s if add_s > 0 else None,
            "p50_ms": s1["p50"] * 1e3, "p99_ms": s1["p99"] * 1e3, "qps": batch / sb["p50"],
            "recall": recall, "ram_mb": ram / 2**20, "disk_mb": disk / 2**20, "disk_bytes": disk, "ram_bytes": ram,
            "samples_1q": s1["n"], "samples_64q": sb["n"], "flush_s": flush_s,
            "index": getattr(bank, "index_type", None),
        }
        if direct is not None:
            row.update(direct_p50_ms=report.summarize(t1q["direct"])["p50"] * 1e3,
                       direct_batch_p50_ms=report.summarize(tbq["direct"])["p50"] * 1e3,
                       ratio_1=report.paired_ratio(t1q["bank"], t1q["direct"]),
                       ratio_64=report.paired_ratio(tbq["bank"], tbq["direct"]),
                       ratio_of_medians_1=report.ratio_of_medians(t1q["bank"], t1q["direct"]),
                       ratio_of_medians_64=report.ratio_of_medians(tbq["bank"], tbq["direct"]))
            row["overhead_us_1"] = (row["p50_ms"] - row["direct_p50_ms"]) * 1e3  # fixed cost of the layer, µs
        else:
            row["note"] = "no direct call known for this backend"
        return row
    except memkit.MemkitError as exc:
        kind = "unavailable" if type(exc).__name__ in ("MissingDependencyError", "UnknownBackendError") else "error"
        return {"status": kind, "note": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memkit bench backends", description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(report.jsonable(worker(json.loads(args.worker)))), flush=True)
        return 0
    return run(args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
