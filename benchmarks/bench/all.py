"""``memkit bench all``: the memory / latency / quality trade-off matrix and ``benchmarks/REPORT.md``.

An orchestrator over the other benchmarks, each stage in its own subprocess (so peak memory and a crash
belong to that stage alone). The matrix is swept one axis at a time around the default config, on the
bundled SmolLM2-135M and real Shakespeare text:

* ``context``  - :mod:`memkit.bench.context`: reading tok/s, decode ms/token and peak RSS with its byte
  breakdown vs context length, for memkit (MemLong style), LongMem style, window-only and full attention;
* ``quality``  - perplexity on tokens ``[start, end)`` of one play, all set-ups reading the same tokens
  (one worker process): ``top_k`` (memory attended per block) from 0 to 16, the same attention budget
  spent on recent text instead (``top_k=0``, window + top_k x chunk), K/V store dtype fp32/fp16/bf16/int8
  (perplexity and page bytes), every MemoryBank backend inside the wrap (tok/s and time spent in
  retrieval per block), LongMem style, and full attention; ``gap closed`` = (ppl window - ppl) /
  (ppl window - ppl full);
* ``backends`` - :mod:`memkit.bench.backends` on a reduced grid (10k real vectors; the full grid up to
  1M is ``memkit bench backends``, ~40 min): build, QPS, recall@10, overhead;
* ``passkey``  - ``memkit eval passkey`` through memory at 16k tokens, three depths.

Writes ``<out>/context.*``, ``<out>/all_quality.*``, ``<out>/all_backends.*``, ``<out>/all_passkey.json``,
``<out>/all.json`` (machine-readable summary: headline, targets, stage times) and the report
(``benchmarks/REPORT.md``; with ``--quick``: ``<out>/REPORT.md`` under ``benchmarks/results/quick``, so a
quick run never replaces the full report). ``--from-results`` rebuilds the report from existing JSON.

    memkit bench all                # ~35-45 min on 2 shared CPU cores
    memkit bench all --quick        # < 5 min: short lengths and ranges, fewer cells
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import report

__all__ = ["add_arguments", "run", "main", "quality_plan", "quality_worker", "build_summary", "write_report"]

STAGES = ("context", "quality", "backends", "passkey")
DTYPES = ("fp32", "fp16", "bf16", "int8")
FULL: dict[str, Any] = {"lengths": "1k,4k,8k,16k,32k,64k,80k", "caps": "window=16k,longmem=16k", "styles": "memlong,longmem",
        "top_ks": "0,4,8,12,16", "dtypes": "fp32,fp16,bf16,int8",
        "backends": "faiss-flat,faiss-hnsw,faiss-ivf,hnswlib,usearch,disk,qdrant,milvus", "ppl_range": "4096:8192",
        "stages": "context,quality,backends,passkey", "backend_sizes": "10000", "passkey_length": "16k",
        "decode_tokens": 16}
QUICK: dict[str, Any] = {"lengths": "1k,2k", "caps": "longmem=1k", "styles": "memlong,longmem", "top_ks": "0,8", "dtypes": "fp16,int8",
         "backends": "faiss-flat,hnswlib,disk", "ppl_range": "1024:1536", "stages": "context,quality,backends",
         "backend_sizes": "5000", "passkey_length": "4k", "decode_tokens": 8}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = lambda key: f"(default: {FULL[key]}; --quick: {QUICK[key]})"  # noqa: E731
    p.add_argument("--quick", action="store_true",
                   help="a < 5 minute run: short lengths and ranges, fewer cells, results under benchmarks/results/quick")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="local HF model folder, folder with a .gguf file, or a .gguf file (default: bundled SmolLM2)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="memkit config (YAML/JSON) every sweep starts from (default: memkit's defaults)")
    p.add_argument("--stages", default=None, metavar="LIST", help=f"stages to run, from {','.join(STAGES)} {d('stages')}")
    p.add_argument("--lengths", default=None, metavar="LIST", help=f"context lengths, k = 1024 tokens {d('lengths')}")
    p.add_argument("--caps", default=None, metavar="LIST",
                   help="longest context length per set-up, e.g. window=16k,longmem=16k: their cost per token does "
                        f"not grow with length, so the long lengths are spent on memkit alone {d('caps')}")
    p.add_argument("--styles", default=None, metavar="LIST",
                   help=f"memory styles for the context and quality stages: memlong, longmem {d('styles')}")
    p.add_argument("--top-ks", default=None, metavar="LIST",
                   help=f"retrieved chunks per block swept in the quality stage (0 = window only) {d('top_ks')}")
    p.add_argument("--dtypes", default=None, metavar="LIST",
                   help=f"K/V store dtypes swept in the quality stage, from {','.join(DTYPES)} {d('dtypes')}")
    p.add_argument("--backends", default=None, metavar="LIST",
                   help=f"MemoryBank backends for the quality (inside the wrap) and backends stages {d('backends')}")
    p.add_argument("--backend-sizes", default=None, metavar="LIST",
                   help=f"vector counts for the backends stage {d('backend_sizes')}")
    p.add_argument("--ppl-text", default="richard_iii", metavar="PLAY|FILE",
                   help="text scored in the quality stage: a bundled play name or a UTF-8 file (default: richard_iii)")
    p.add_argument("--ppl-range", default=None, metavar="START:END",
                   help=f"scored token range of --ppl-text; tokens before START are context only {d('ppl_range')}")
    p.add_argument("--passkey-length", default=None, metavar="LEN",
                   help=f"prompt length of the passkey stage (depths 0.1, 0.5, 0.9) {d('passkey_length')}")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="repeats of each context set-up, interleaved; figures are medians (default: 1)")
    p.add_argument("--decode-tokens", type=int, default=None, metavar="N",
                   help=f"tokens generated after each context length to time decoding {d('decode_tokens')}")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads in each model process (default: torch's choice)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="folder for the JSON, markdown and PNG results (default: benchmarks/results; "
                        "--quick: benchmarks/results/quick)")
    p.add_argument("--report", default=None, metavar="FILE",
                   help="where the markdown report goes (default: benchmarks/REPORT.md; --quick: <out-dir>/REPORT.md)")
    p.add_argument("--from-results", action="store_true",
                   help="measure nothing: rebuild the report and all.json from the JSON files in --out-dir")
    p.add_argument("--stage-timeout", type=float, default=2400.0, metavar="S",
                   help="kill a stage's subprocess after this many seconds (default: 2400)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


# ---------------------------------------------------------------------- argument checks (before anything runs)
def _split(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every option resolved and validated; raises a MemkitError with a one-line reason."""
    from memkit.bank import available_backends
    from memkit.errors import InvalidInputError
    from memkit.evaluation.common import load_config_arg
    from memkit.evaluation.haystack import parse_length, parse_lengths

    from .context import parse_caps, parse_styles

    dflt = QUICK if args.quick else FULL
    def pick(name: str) -> Any:
        return getattr(args, name) if getattr(args, name) is not None else dflt[name]

    s: dict[str, Any] = {"quick": bool(args.quick)}
    s["stages"] = _split(pick("stages"))
    bad = [x for x in s["stages"] if x not in STAGES]
    if bad or not s["stages"]:
        raise InvalidInputError(f"--stages: unknown stage(s) {bad}; choose from {list(STAGES)}")
    s["lengths"] = sorted(set(parse_lengths(pick("lengths"))))
    s["styles"] = parse_styles(pick("styles"))
    parse_caps(pick("caps"))
    s["caps"] = pick("caps")
    try:
        s["top_ks"] = sorted({int(k) for k in _split(pick("top_ks"))})
    except ValueError:
        raise InvalidInputError(f"--top-ks {pick('top_ks')!r}: write whole numbers, e.g. 0,2,4,8") from None
    if not s["top_ks"] or min(s["top_ks"]) < 0:
        raise InvalidInputError(f"--top-ks {pick('top_ks')!r}: give one or more counts >= 0")
    s["dtypes"] = _split(pick("dtypes"))
    bad = [x for x in s["dtypes"] if x not in DTYPES]
    if bad or not s["dtypes"]:
        raise InvalidInputError(f"--dtypes: unknown K/V dtype(s) {bad}; choose from {list(DTYPES)}")
    s["backends"] = _split(pick("backends"))
    known = set(available_backends())
    bad = [x for x in s["backends"] if x not in known]
    if bad or not s["backends"]:
        raise InvalidInputError(f"--backends: unknown backend(s) {bad}; available: {sorted(known)}")
    try:
        s["backend_sizes"] = [int(x) for x in _split(pick("backend_sizes"))]
    except ValueError:
        raise InvalidInputError(f"--backend-sizes {pick('backend_sizes')!r}: write vector counts, e.g. 10000") from None
    if not s["backend_sizes"] or min(s["backend_sizes"]) < 100:
        raise InvalidInputError("--backend-sizes: every size must be >= 100 vectors")
    rng = pick("ppl_range")
    if rng.count(":") != 1:
        raise InvalidInputError(f"--ppl-range {rng!r}: write START:END, e.g. 4096:8192 or 4k:8k")
    a, b = rng.split(":")
    s["ppl_start"], s["ppl_end"] = (parse_length(a) if a.strip() not in ("", "0") else 0), parse_length(b)
    if s["ppl_end"] <= s["ppl_start"] + 1:
        raise InvalidInputError(f"--ppl-range {rng!r}: END must be greater than START + 1")
    s["ppl_text"] = _check_text(args.ppl_text)
    s["passkey_length"] = parse_length(pick("passkey_length"))
    for name in ("repeats", "decode_tokens", "threads"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "decode_tokens" else 1):
            raise InvalidInputError(f"--{name.replace('_', '-')} must be >= {0 if name == 'decode_tokens' else 1}, "
                                    f"got {v}")
    s.update(repeats=args.repeats, decode_tokens=pick("decode_tokens"), threads=args.threads, model=args.model,
             config=args.config, progress=not args.no_progress)
    s["config_dict"] = load_config_arg(args.config).to_dict()
    return s


def _check_text(text: str) -> str:
    from memkit.errors import InvalidInputError
    from memkit.resources import shakespeare_texts

    if Path(text).expanduser().is_file():
        return str(Path(text).expanduser().resolve())
    try:
        plays = shakespeare_texts()
    except Exception:  # the corpus package is optional for a file argument
        plays = {}
    if text in plays:
        return text
    raise InvalidInputError(f"--ppl-text {text!r} does not exist as a file and is not a bundled play "
                            "(e.g. richard_iii, hamlet)")


# ---------------------------------------------------------------------- quality stage (one worker process)
def quality_plan(cfg: dict[str, Any], top_ks: list[int], dtypes: list[str], backends: list[str],
                 styles: list[str]) -> list[dict[str, Any]]:
    """The quality runs: config overrides per row, one axis at a time around ``cfg`` (a MemoryConfig dict)."""
    base_k, chunk, window = int(cfg["top_k"]), int(cfg["chunk_size"]), int(cfg["window"])
    base_dtype, base_backend = cfg["kvstore"]["dtype"], cfg["bank"]["backend"]
    runs: list[dict[str, Any]] = []
    for k in sorted(set(top_ks) | {base_k}):
        runs.append({"sweep": "top_k", "label": "window only (top_k=0)" if k == 0 else f"memkit top_k={k}",
                     "set": {"top_k": k}, "base": k == base_k})
    for k in sorted(set(top_ks) - {0}):
        runs.append({"sweep": "recent", "label": f"recent text, window {window + k * chunk} (budget of top_k={k})",
                     "set": {"top_k": 0, "window": window + k * chunk}, "budget": k * chunk})
    runs += [{"sweep": "dtype", "label": f"memkit, K/V {d}", "set": {"kvstore": {"dtype": d}}}
             for d in dtypes if d != base_dtype]
    runs += [{"sweep": "backend", "label": f"memkit, {b}", "set": {"backend": b, "bank": {"backend": b}}}
             for b in backends if b != base_backend]
    if "longmem" in styles:
        runs.append({"sweep": "style", "label": "longmem (untrained gate)", "set": {"style": "longmem"}})
    if "memlong" not in styles:  # the base rows are memlong: drop all but longmem
        runs = [r for r in runs if r["sweep"] == "style"]
    runs.append({"sweep": "full", "label": "full attention"})
    return runs


def _timed(manager: Any) -> dict[str, float]:
    """Accumulate seconds spent in the memory manager's retrieval (bank search + page fetch) and embedding, through
    its public timer hook."""
    acc = {"search_s": 0.0, "embed_s": 0.0, "searches": 0}

    def record(event: str, seconds: float) -> None:
        acc[f"{event}_s"] += seconds
        if event == "search":
            acc["searches"] += 1

    manager.add_timer(record)
    return acc


def quality_worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Score tokens [start, end) of the text in every run of ``spec['runs']``; one row per run."""
    import torch

    import memkit
    from memkit.config import load_config
    from memkit.evaluation.common import memory_bytes
    from memkit.evaluation.ppl import full_attention_loss, range_loss
    from memkit.models import load_model

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.set_grad_enabled(False)
    model, tok = load_model(spec.get("model"))
    text = spec["text"]
    raw = Path(text).read_text(encoding="utf-8", errors="replace") if os.path.isfile(text) else \
        __import__("memkit.corpora", fromlist=["play_text"]).play_text(text)
    ids = tok(raw, add_special_tokens=False)["input_ids"]
    bos = getattr(tok, "bos_token_id", None)
    if getattr(tok, "add_bos_token", False) and bos is not None:
        ids = [bos, *ids]
    start, end = int(spec["start"]), int(spec["end"])
    if len(ids) < end:
        raise RuntimeError(f"{Path(text).name} has {len(ids)} tokens, fewer than the range end {end}")
    x = torch.tensor([ids[:end]])
    progress = bool(spec.get("progress", True))
    # Warm-up (untimed): loads the retriever and fills lazy state, so the first timed run is not an outlier.
    warm = memkit.wrap(model, load_config(spec["config"], progress=False), tokenizer=tok)
    range_loss(warm, x[:, : min(end, 2 * warm.memkit_config.block_size)], 1, progress=False)
    memkit.unwrap(warm)
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(spec["runs"]), desc="quality runs", unit="run", leave=False)
    for item in spec["runs"]:
        row: dict[str, Any] = {k: item[k] for k in ("sweep", "label") if k in item}
        row.update(base=bool(item.get("base")), budget=item.get("budget"))
        t0 = time.perf_counter()
        try:
            if item["sweep"] == "full":
                loss = full_attention_loss(model, x, start, block=int(spec["config"]["block_size"]), progress=False)
                row.update(style=None, top_k=None)
            else:
                cfg = load_config(spec["config"], **{**item.get("set", {}), "progress": progress})
                wrapped = memkit.wrap(model, cfg, tokenizer=tok)
                try:
                    acc = _timed(wrapped.memory.manager)
                    t0 = time.perf_counter()
                    loss = range_loss(wrapped, x, start, progress=progress)
                    blocks = math.ceil(end / cfg.block_size)
                    mb = memory_bytes(wrapped)
                    retrieved = cfg.top_k * cfg.chunk_size if cfg.style == "memlong" else cfg.style_block().tokens
                    row.update(style=cfg.style, top_k=cfg.top_k, window=cfg.window, backend=cfg.bank.backend,
                               dtype=cfg.kvstore.dtype, retrieved_tokens=retrieved,
                               search_ms_block=1e3 * acc["search_s"] / blocks, embed_ms_block=1e3 * acc["embed_s"] / blocks,
                               searches=acc["searches"], pages_bytes=mb["pages_bytes"], page_bytes=mb.get("page_bytes"),
                               vectors_bytes=mb["vectors_bytes"], chunks=mb["chunks"])
                finally:
                    memkit.unwrap(wrapped)
            sec = time.perf_counter() - t0
            row.update(loss=loss, ppl=math.exp(loss), seconds=sec, tokens_per_s=end / sec, status="ok")
        except Exception as exc:  # one failing cell (a backend, a dtype) must not end the sweep
            row.update(status="error", note=f"{type(exc).__name__}: {exc}"[:300])
        print(f"[quality] {row['label']}: " + (f"ppl {row['ppl']:.3f}, {row['tokens_per_s']:.0f} tok/s"
                                               if row["status"] == "ok" else row["note"]), file=sys.stderr, flush=True)
        rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows


QUALITY_COLUMNS = [
    report.Column("sweep", "sweep"), report.Column("label", "set-up"),
    report.Column("retrieved_tokens", "memory tokens / block", ","), report.Column("window", "window", ","),
    report.Column("ppl", "perplexity", ".3f"), report.Column("gap_closed", "gap closed", ".0%"),
    report.Column("tokens_per_s", "tok/s", ".0f"), report.Column("search_ms_block", "search+fetch ms / block", ".2f"),
    report.Column("embed_ms_block", "embed ms / block", ".2f"),
    report.Column("page_bytes", "bytes / page", lambda v: f"{v / 1024:,.0f} KiB"),
    report.Column("pages_bytes", "pages", lambda v: f"{v / 2**20:,.1f} MiB"), report.Column("note", "note")]


def _quality_plots(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r.get("status") == "ok"]

    def ppl(plt: Any) -> Any:
        mem = sorted((r["retrieved_tokens"], r["ppl"]) for r in ok if r["sweep"] == "top_k")
        if not mem:
            return None
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax.plot(*zip(*mem), marker="o", label="memkit: top_k retrieved chunks")
        rec = sorted((r["budget"], r["ppl"]) for r in ok if r["sweep"] == "recent")
        if rec:
            w0 = next((r["ppl"] for r in ok if r["sweep"] == "top_k" and r["top_k"] == 0), None)
            pts = ([(0, w0)] if w0 is not None else []) + rec
            ax.plot(*zip(*pts), marker="s", linestyle="--", label="same budget on recent text (larger window)")
        for r in ok:
            if r["sweep"] == "full":
                ax.axhline(r["ppl"], color="k", linestyle=":", label="full attention")
            if r["sweep"] == "style":
                ax.scatter([r["retrieved_tokens"]], [r["ppl"]], marker="^", color="tab:red", label=r["label"], zorder=3)
        ax.set_xlabel("memory attended per block (tokens = top_k x chunk)")
        ax.set_ylabel("perplexity")
        ax.set_title("Perplexity vs memory size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return fig

    def matrix(plt: Any) -> Any:
        base = [r for r in ok if r.get("base")]
        dt = base + [r for r in ok if r["sweep"] == "dtype"]
        bk = base + [r for r in ok if r["sweep"] == "backend"]
        if not base:
            return None
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        a1.bar([r["dtype"] for r in dt], [r["ppl"] for r in dt], color="tab:blue")
        for i, r in enumerate(dt):
            a1.annotate(f"{(r.get('page_bytes') or 0) / 1024:,.0f} KiB/page", (i, r["ppl"]), ha="center", fontsize=8,
                        xytext=(0, 3), textcoords="offset points")
        a1.set(ylabel="perplexity", title="K/V store dtype: quality and page size")
        lo = min(r["ppl"] for r in dt)
        a1.set_ylim(lo * 0.98, max(r["ppl"] for r in dt) * 1.01)
        a2.bar([r["backend"] for r in bk], [r["tokens_per_s"] for r in bk], color="tab:green")
        a2.set(ylabel="tokens/s (reading with memory)", title="Backend inside the wrap")
        a2.tick_params(axis="x", rotation=30)
        for i, r in enumerate(bk):
            a2.annotate(f"{r['search_ms_block']:.1f} ms", (i, r["tokens_per_s"]), ha="center", fontsize=8,
                        xytext=(0, 3), textcoords="offset points")
        return fig

    return {"ppl": ppl, "matrix": matrix}


# ---------------------------------------------------------------------- stages
def _python(module: str, *argv: str) -> list[str]:
    return [sys.executable, "-m", module, *argv]


def _common(s: dict[str, Any]) -> list[str]:
    out = []
    if s["model"]:
        out += ["--model", s["model"]]
    if s["config"]:
        out += ["--config", s["config"]]
    if s["threads"]:
        out += ["--threads", str(s["threads"])]
    if not s["progress"]:
        out.append("--no-progress")
    return out


def _stage(name: str, s: dict[str, Any], out: Path, timeout: float) -> dict[str, Any]:
    """Run one stage in a subprocess; {'status', 'seconds', 'error'?}."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    lengths = ",".join(str(L) for L in s["lengths"])
    capture = False
    if name == "context":
        cmd = _python("memkit.bench.context", "--lengths", lengths, "--styles", ",".join(s["styles"]),
                      "--modes", "memkit,window,full", "--repeats", str(s["repeats"]),
                      "--decode-tokens", str(s["decode_tokens"]), "--out-dir", str(out), *_common(s))
        if s["caps"]:
            cmd += ["--caps", s["caps"]]
    elif name == "quality":
        spec = {"model": s["model"], "config": s["config_dict"], "text": s["ppl_text"], "start": s["ppl_start"],
                "end": s["ppl_end"], "threads": s["threads"], "progress": s["progress"],
                "runs": quality_plan(s["config_dict"], s["top_ks"], s["dtypes"], s["backends"], s["styles"])}
        cmd, capture = _python("memkit.bench.all", "--quality-worker", json.dumps(spec)), True
    elif name == "backends":
        cmd = _python("memkit.bench.backends", "--datasets", "minilm" if s["quick"] else "minilm,smollm2-keys",
                      "--sizes", ",".join(map(str, s["backend_sizes"])), "--backends", ",".join(s["backends"]),
                      "--seconds", "1" if s["quick"] else "3", "--rounds", "50" if s["quick"] else "200",
                      "--queries", "200" if s["quick"] else "1000", "--name", "all_backends", "--out", str(out))
    else:
        cmd = _python("memkit.cli", "eval", "passkey", "--lengths", str(s["passkey_length"]), "--depths",
                      "0.1,0.5,0.9", "--modes", "memkit", "--out", str(out / "all_passkey.json"), *_common(s))
    print(f"\n[bench all] stage {name}: {' '.join(cmd[2:4])} ...", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, text=True, stdout=subprocess.PIPE if capture else None)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": time.perf_counter() - t0, "error": f"exceeded {timeout:.0f}s"}
    res: dict[str, Any] = {"status": "ok" if proc.returncode == 0 else "error", "seconds": time.perf_counter() - t0}
    if proc.returncode != 0:
        res["error"] = f"exit code {proc.returncode}"
    elif name == "quality":
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
        _finish_quality(rows, s, out)
    print(f"[bench all] stage {name}: {res['status']} in {res['seconds']:.0f}s", flush=True)
    return res


def _finish_quality(rows: list[dict[str, Any]], s: dict[str, Any], out: Path) -> None:
    ok = {r["sweep"]: r for r in rows if r.get("status") == "ok" and r["sweep"] in ("full",)}
    win = next((r for r in rows if r.get("status") == "ok" and r["sweep"] == "top_k" and r.get("top_k") == 0), None)
    full = ok.get("full")
    for r in rows:
        if r.get("status") == "ok" and win and full and win["ppl"] != full["ppl"] and r["sweep"] != "full":
            r["gap_closed"] = (win["ppl"] - r["ppl"]) / (win["ppl"] - full["ppl"])
    name = Path(s["ppl_text"]).name
    cd, keys = s["config_dict"], ("top_k", "window", "block_size", "chunk_size", "sink_tokens", "retriever")
    notes = [f"Text: {name}, tokens {s['ppl_start']}-{s['ppl_end'] - 1} scored; every set-up reads tokens 0-"
             f"{s['ppl_end'] - 1} block by block in one process, one axis changed at a time from the base config "
             "(the row marked base). gap closed = (ppl window - ppl) / (ppl window - ppl full).",
             "recent text: top_k=0 with the window enlarged by top_k x chunk tokens - the same attention budget "
             "spent on the most recent text instead of retrieved chunks.",
             "search+fetch: time in the memory manager's retrieval call (bank search + K/V page fetch) per block; "
             "embed: time embedding queries and stored chunks (MiniLM text retriever or mean keys) per block.",
             f"Base config: {json.dumps({k: cd[k] for k in keys})}, backend {cd['bank']['backend']}, "
             f"K/V {cd['kvstore']['dtype']}."]
    for r in rows:
        if r.get("base"):
            r["label"] += " (base)"
    report.write_results("all_quality", rows, QUALITY_COLUMNS, "Quality matrix: perplexity vs memory, dtype, backend, style",
                         out_dir=out, notes=notes, plots=_quality_plots(rows),
                         extra={"text": name, "start": s["ppl_start"], "end": s["ppl_end"], "config": s["config_dict"]})


# ---------------------------------------------------------------------- summary and report
def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt_bytes(n: float | None) -> str:
    from .context import report_bytes

    return report_bytes(n)


def build_summary(out: Path) -> dict[str, Any]:
    """Headline and target rows from the stage JSON files in ``out`` (missing stages give '—')."""
    ctx, qual = _load(out / "context.json"), _load(out / "all_quality.json")
    bk, pk = _load(out / "all_backends.json"), _load(out / "all_passkey.json")
    setups = [m for m in ("window", "memkit", "longmem", "full")]
    head: list[dict[str, Any]] = []
    targets: list[dict[str, Any]] = []
    if qual:
        rows = [r for r in qual["rows"] if r.get("status") == "ok"]
        pick = {"window": next((r for r in rows if r["sweep"] == "top_k" and r.get("top_k") == 0), None),
                "memkit": next((r for r in rows if r.get("base")), None),
                "longmem": next((r for r in rows if r["sweep"] == "style"), None),
                "full": next((r for r in rows if r["sweep"] == "full"), None)}
        cell = {m: (f"{r['ppl']:.2f}" + (f" ({r['gap_closed']:.0%} of the gap)" if r.get("gap_closed") is not None
                                         and m in ("memkit", "longmem") else "")) for m, r in pick.items() if r}
        head.append({"measure": f"perplexity, tokens {qual['start']}-{qual['end'] - 1} of {qual['text']}", **cell})
        best = min((r for r in rows if r["sweep"] == "top_k"), key=lambda r: r["ppl"], default=None)
        if best:
            head.append({"measure": "best perplexity over the top_k sweep", "memkit": f"{best['ppl']:.2f} ({best['label']})"})
    if ctx:
        crow = {r["length"]: r for r in ctx["rows"]}
        lens = sorted(crow)
        hi, base = max(lens), ctx.get("decode_base_length", min(lens))
        lo = 8192 if 8192 in lens and 8192 < hi else min(lens)
        for L in dict.fromkeys([lo, hi]):
            head.append({"measure": f"reading tok/s at {L:,} tokens",
                         **{m: f"{crow[L][f'tps_{m}']:.0f}" for m in setups if crow[L].get(f"tps_{m}")}})
        dec = {}
        for m in setups:
            a, b = crow.get(base, {}).get(f"decode_{m}"), crow[hi].get(f"decode_{m}")
            if a and b:
                dec[m] = f"{a:.1f} → {b:.1f} ({b / a:.2f}x)"
            elif a:
                L = max(L for L in lens if crow[L].get(f"decode_{m}"))
                dec[m] = f"{a:.1f} at {base:,}" if L == base else f"{a:.1f} → {crow[L][f'decode_{m}']:.1f} at {L:,}"
        head.append({"measure": f"decode ms/token at {base:,} → {hi:,} tokens", **dec})
        rss = {}
        for m in setups:
            a, b = crow[lo].get(f"rss_{m}"), crow[hi].get(f"rss_{m}")
            if a and b and lo != hi:
                rss[m] = f"{_fmt_bytes(a)} → {_fmt_bytes(b)}"
            elif a:
                rss[m] = f"{_fmt_bytes(a)} at {lo:,}"
        head.append({"measure": f"peak RSS at {lo:,} → {hi:,} tokens", **rss})
        head.append({"measure": f"memory pages + vectors at {hi:,} tokens",
                     **{m: _fmt_bytes(crow[hi][f"pages_{m}"] + (crow[hi].get(f"vectors_{m}") or 0))
                        for m in ("memkit", "longmem") if crow[hi].get(f"pages_{m}") is not None}})
        m_dec = crow[hi].get("decode_ratio_memkit")
        targets.append({"target": f"decoding one token with a {hi:,}-token memory costs <= 1.5x decoding at {base:,}",
                        "measured": f"{m_dec:.2f}x" if m_dec else "—", "met": None if not m_dec else m_dec <= 1.5})
        acct = next((a for a in ctx.get("accounting", []) if a["setup"] == "memkit"), None)
        if acct:
            rlo = crow[acct["from"]]["rss_memkit"]
            targets.append({"target": f"peak RSS flat in length: at {acct['to']:,} it exceeds the {acct['from']:,} "
                                      "figure only by the memory's pages and vectors (check: rest < 5% of the "
                                      f"{acct['from']:,} peak)",
                            "measured": f"RSS +{_fmt_bytes(acct['rss_diff'])}, pages + vectors "
                                        f"+{_fmt_bytes(acct['memory_diff'])}, rest {_fmt_bytes(acct['excess'])}",
                            "met": acct["excess"] <= 0.05 * rlo})
        both = [L for L in lens if crow[L].get("memkit_over_window")]
        ratio = (crow[both[-1]].get("memkit_over_window_at") or crow[both[-1]]["memkit_over_window"]) if both else None
        if ratio:
            targets.append({"target": f"reading speed with memory >= 0.85x window-only (blocks at {both[-1]:,} tokens)",
                            "measured": f"{ratio:.2f}x", "met": ratio >= 0.85})
    if pk:
        res = [r for r in pk.get("results", []) if not r.get("skipped")]
        if res:
            ok, hit = sum(r["correct"] for r in res), sum(bool(r.get("needle_retrieved")) for r in res)
            depths = ", ".join(format(r["depth"], "g") for r in res)
            head.append({"measure": f"passkey at {res[0]['length']:,} tokens, depths {depths}",
                         "memkit": f"{ok}/{len(res)} correct (needle chunk retrieved {hit}/{len(res)})"})
    if bk:
        approx = [r for r in bk["rows"] if r.get("status") == "ok" and r["dataset"] == "minilm"
                  and r["backend"] in ("faiss-hnsw", "faiss-ivf", "hnswlib", "usearch")]
        if approx:
            worst = min(approx, key=lambda r: r["recall"])
            targets.append({"target": "approximate backends reach recall@10 >= 0.95 on real MiniLM embeddings",
                            "measured": f"lowest {worst['recall']:.3f} ({worst['backend']}, n={worst['n']:,})",
                            "met": worst["recall"] >= 0.95})
    return {"headline": head, "targets": targets, "setups": setups}


def _table_of(md: Path) -> str:
    try:
        lines = md.read_text().splitlines()
    except OSError:
        return "*(not run)*"
    return "\n".join(ln for ln in lines if ln.startswith("|")) or "*(empty)*"


def _notes_of(doc: dict[str, Any] | None) -> list[str]:
    return [f"- {n}" for n in (doc or {}).get("notes", [])]


def headline_table(summary: dict[str, Any]) -> str:
    """The headline as markdown: one row per measurement, one column per set-up that has a value."""
    names = {"window": "window-only (top_k=0)", "memkit": "memkit (MemLong style, default)",
             "longmem": "LongMem style (untrained)", "full": "full attention"}
    cols = [report.Column("measure", "measurement")] + [
        report.Column(m, names[m]) for m in summary["setups"] if any(r.get(m) for r in summary["headline"])]
    return report.markdown_table(summary["headline"], cols)


def targets_table(summary: dict[str, Any]) -> str:
    rows = [{**t, "met": "—" if t["met"] is None else ("yes" if t["met"] else "**no**")} for t in summary["targets"]]
    return report.markdown_table(rows, ["target", "measured", "met"])


def write_report(out: Path, report_path: Path, summary: dict[str, Any], info: dict[str, Any]) -> Path:
    """benchmarks/REPORT.md: date, machine, command, headline, targets, each stage's table and plots."""
    rel = lambda p: os.path.relpath(p, report_path.parent)  # noqa: E731
    stages = info.get("stages", {})
    quick = " (quick run: short lengths, fewer cells)" if info.get("quick") else ""
    md = ["# memkit benchmark report", "",
          f"*Generated by `{info.get('command', 'memkit bench all')}`{quick}"
          f" — {report.machine_line(info['machine'])}.*", "",
          "Stages: " + ", ".join(f"{k} {v['status']} in {v['seconds'] / 60:.1f} min" for k, v in stages.items())
          + f"; total {info.get('elapsed_s', 0) / 60:.1f} min." if stages else "", "",
          *(["**Quick run**: short lengths and ranges, fewer cells; it checks the machinery, not the trade-offs at "
             "80k tokens. `make bench` (`memkit bench all`, ~40 min here) runs the full matrix.", ""] if quick else []),
          "## Headline", "", headline_table(summary), "", "## Targets", "", targets_table(summary), ""]
    sections = [("Context length: reading speed, decode latency, peak memory", "context",
                 ["context_decode.png", "context_memory.png", "context_speed.png"]),
                ("Quality: perplexity vs memory size, K/V dtype, backend, style", "all_quality",
                 ["all_quality_ppl.png", "all_quality_matrix.png"]),
                ("MemoryBank backends (reduced grid)", "all_backends",
                 ["all_backends_recall_qps.png", "all_backends_latency.png"])]
    for title, stem, pngs in sections:
        md += [f"## {title}", "", f"[`{stem}.md`]({rel(out / (stem + '.md'))}) · [`{stem}.json`]({rel(out / (stem + '.json'))})",
               "", _table_of(out / f"{stem}.md"), ""]
        md += [*_notes_of(_load(out / f"{stem}.json")), ""]
        md += [f"![{p}]({rel(out / p)})" for p in pngs if (out / p).is_file()] + [""]
    pk = _load(out / "all_passkey.json")
    if pk:
        md += ["## Passkey through memory", "", "```", pk.get("table", ""), "```", ""]
    others = []
    for stem in ("backends", "kv", "train", "train_longmem"):
        doc = _load(report_path.parent / "results" / f"{stem}.json") or _load(out / f"{stem}.json")
        where = out / f"{stem}.md" if (out / f"{stem}.md").is_file() else report_path.parent / "results" / f"{stem}.md"
        if where.is_file():
            mach = (doc or {}).get("machine")
            date = (mach.get("date") if isinstance(mach, dict) else None) or (doc or {}).get("date") or "date unknown"
            others.append(f"- [`{stem}.md`]({rel(where)}) — {date} (its own command, not re-run by `memkit bench all`)")
    if others:
        md += ["## Other results (separate commands)", "", *others, ""]
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text("\n".join(md).rstrip() + "\n")
    return report_path


def _command() -> str:
    name = Path(sys.argv[0]).name
    if name in ("cli.py", "memkit", "__main__.py"):
        return "memkit " + " ".join(sys.argv[1:])
    return "python " + " ".join([sys.argv[0], *sys.argv[1:]])


def run(args: argparse.Namespace) -> int:
    out = Path(args.out_dir or ("benchmarks/results/quick" if args.quick else "benchmarks/results"))
    info: dict[str, Any] = {"command": _command(), "quick": bool(args.quick)}
    if args.from_results:
        if not any((out / f).is_file() for f in ("all.json", "context.json", "all_quality.json", "all_backends.json")):
            from memkit.errors import InvalidInputError

            raise InvalidInputError(f"--from-results: no benchmark results in {str(out)!r}; run memkit bench all first")
        old = _load(out / "all.json") or {}
        info.update({k: old[k] for k in ("stages", "elapsed_s", "settings", "command", "quick") if k in old})
        info["machine"] = old.get("machine") or report.machine_info()
    report_path = Path(args.report or (out / "REPORT.md" if info["quick"] else "benchmarks/REPORT.md"))
    if not args.from_results:
        s = _settings(args)
        from memkit.models import resolve_model_path

        resolve_model_path(args.model)  # a bad --model fails here, before any stage starts
        out.mkdir(parents=True, exist_ok=True)
        info.update(machine=report.machine_info(), settings={k: v for k, v in s.items() if k != "config_dict"})
        print(f"memkit bench all — {report.machine_line(info['machine'])}\nstages: {', '.join(s['stages'])}; "
              f"results in {out}, report {report_path}", flush=True)
        t0 = time.perf_counter()
        info["stages"] = {}
        for name in s["stages"]:
            info["stages"][name] = _stage(name, s, out, args.stage_timeout)
        info["elapsed_s"] = time.perf_counter() - t0
    summary = build_summary(out)
    write_report(out, report_path, summary, info)
    doc = {**info, **summary, "report": str(report_path)}
    (out / "all.json").write_text(json.dumps(report.jsonable(doc), indent=2) + "\n")
    print("\n" + headline_table(summary) + "\n\n" + targets_table(summary))
    print(f"\nreport: {report_path}\nJSON: {out / 'all.json'}")
    failed = [k for k, v in info.get("stages", {}).items() if v.get("status") != "ok"]
    if failed:
        print(f"memkit: error: stage(s) {', '.join(failed)} failed; see the output above", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return report.bench_main("memkit bench all", __doc__ or "", add_arguments, run, "--quality-worker", quality_worker, argv)

if __name__ == "__main__":
    sys.exit(main())
