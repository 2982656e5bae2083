"""The evaluation and benchmark CLI end to end (``eval ppl|passkey``, ``bench context|all``), in subprocesses, on a
tiny random model and real text.

The tiny model is a random-weight Llama saved with a small byte-level BPE tokenizer trained on a play,
so ``--model`` reads a real local HF folder; the text is the first lines of Hamlet.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from memkit.testing.cli import memkit_cli

ROOT = Path(__file__).resolve().parents[1]


def test_eval_ppl_end_to_end(tiny, tmp_path):
    model, text, cfg = tiny
    r = memkit_cli("eval", "ppl", "--model", str(model), "--text", str(text), "--config", str(cfg),
                   "--start", "512", "--end", "1k", "--out", "ppl.json", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| text" in r.stdout and "ppl window" in r.stdout and "gap closed" in r.stdout
    data = json.loads((tmp_path / "ppl.json").read_text())
    by_mode = {x["mode"]: x for x in data["results"]}
    assert set(by_mode) == {"window", "memkit", "full"}
    for rec in by_mode.values():
        assert math.isfinite(rec["ppl"]) and rec["ppl"] > 1
        assert rec["scored_tokens"] == 1024 - 512 and rec["peak_rss_bytes"] > 0
    assert data["config"]["window"] == 128 and data["config"]["top_k"] == 2
    assert data["mean_gap_closed"] is not None


def test_eval_ppl_window_override_and_full_skip(tiny, tmp_path):
    """--window overrides the config; full attention is skipped beyond the model's positions (2048)."""
    model, text, cfg = tiny
    r = memkit_cli("eval", "ppl", "--model", str(model), "--text", str(text), "--config", str(cfg),
                   "--window", "256", "--modes", "window,full", "--start", "2k", "--end", "2100", "--out", "-",
                   "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])
    assert data["config"]["window"] == 256
    full = next(x for x in data["results"] if x["mode"] == "full")
    assert "skipped" in full and "2048" in full["skipped"]


def test_eval_passkey_end_to_end(tiny, tmp_path):
    model, _text, _cfg = tiny
    r = memkit_cli("eval", "passkey", "--model", str(model), "--lengths", "1k", "--depths", "0.2,0.8",
                   "--modes", "memkit,full", "--out", "pk.json", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout
    data = json.loads((tmp_path / "pk.json").read_text())
    assert len(data["results"]) == 4
    for rec in data["results"]:
        assert rec["length"] == 1024 and len(rec["key"]) == 5 and isinstance(rec["correct"], bool)
        assert abs(rec["tokens"] - 1024) <= 1
        if rec["mode"] == "memkit":
            assert isinstance(rec["needle_retrieved"], bool)  # the trace is read for every memkit answer



def test_eval_passkey_fixed_key(tiny, tmp_path):
    """--key puts the same digits in every cell (a miss at one length can be asked again at another)."""
    model, _text, _cfg = tiny
    r = memkit_cli("eval", "passkey", "--model", str(model), "--lengths", "512,1k", "--depths", "0.3",
                   "--modes", "full", "--key", "98798", "--out", "pk.json", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "pk.json").read_text())
    assert data["key"] == "98798"
    assert [rec["key"] for rec in data["results"]] == ["98798", "98798"]


@pytest.fixture(scope="module")
def bench_all(tiny, tmp_path_factory):
    """One ``memkit bench all`` run on the tiny model and text: (completed process, results folder)."""
    model, text, cfg = tiny
    work = tmp_path_factory.mktemp("bench-all")
    out = work / "res"
    r = memkit_cli("bench", "all", "--model", str(model), "--config", str(cfg), "--lengths", "512,1k",
                   "--caps", "window=512", "--styles", "memlong,longmem", "--top-ks", "0,2", "--dtypes", "fp16,int8",
                   "--backends", "faiss-flat,disk", "--backend-sizes", "300", "--ppl-text", str(text),
                   "--ppl-range", "512:1k", "--stages", "context,quality,backends", "--decode-tokens", "4",
                   "--threads", "1", "--out-dir", str(out), "--report", str(work / "REPORT.md"), "--no-progress",
                   cwd=work, timeout=600)
    return r, out


def test_bench_all_context_stage(tiny, bench_all):
    """Reading speed, decode latency and the byte breakdown vs length, per set-up (memkit, longmem, window, full)."""
    r, out = bench_all
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "context.json").read_text())
    rows = {row["length"]: row for row in data["rows"]}
    assert set(rows) == {512, 1024}
    for row in rows.values():
        for m in ("memkit", "longmem", "full"):
            assert row[f"tps_{m}"] > 0 and row[f"rss_{m}"] > 0
            assert row[f"decode_{m}"] > 0 and row[f"first_{m}"] > 0
        assert row["memkit_over_full"] > 0
        assert row["pages_memkit"] > 0 and row["other_memkit"] == row["rss_memkit"] - row["pages_memkit"] - \
            row["vectors_memkit"]
    # --caps window=512: the window set-up stops at 512 tokens
    assert rows[512]["tps_window"] > 0 and rows[512]["memkit_over_window"] > 0 and "tps_window" not in rows[1024]
    # memory grows with what was read: at 1k the store holds more pages and vectors than at 512
    assert rows[1024]["pages_memkit"] > rows[512]["pages_memkit"]
    assert rows[1024]["vectors_memkit"] > rows[512]["vectors_memkit"]
    assert rows[1024]["decode_ratio_memkit"] == pytest.approx(1.0)  # the base length is 1k
    assert rows[512]["decode_ratio_memkit"] == pytest.approx(rows[512]["decode_memkit"] / rows[1024]["decode_memkit"])
    runs = data["runs"]
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny[0], local_files_only=True, dtype=torch.float32)
    weights = sum(p.numel() * p.element_size() for p in hf.parameters()) + \
        sum(b.numel() * b.element_size() for b in hf.buffers())
    layers, kv, hd = hf.config.num_hidden_layers, hf.config.num_key_value_heads, hf.config.head_dim
    mem = runs["memkit"][0]
    assert mem["weights_bytes"] == weights
    # local K/V: (sinks 4 + window 128 + block 128) tokens x all layers x K and V x kv heads x head dim x fp32
    assert mem["local_kv_bytes"] == (4 + 128 + 128) * layers * 2 * kv * hd * 4
    assert mem["retrieved_kv_bytes"] == 2 * 32 * layers * 2 * kv * hd * 4  # top_k 2 x chunk 32, all layers
    for cp in mem["checkpoints"]:
        assert cp["decode_steps"] == 3 and cp["pages_bytes"] == cp["chunks"] * cp["page_bytes"]
    full = runs["full"][0]["checkpoints"]
    assert [c["kv_cache_bytes"] for c in full] == [L * layers * 2 * kv * hd * 4 for L in (512, 1024)]
    assert runs["longmem"][0]["style"] == "longmem" and runs["memkit"][0]["style"] == "memlong"
    for png in ("context_speed.png", "context_decode.png", "context_memory.png"):
        assert (out / png).stat().st_size > 1000
    md = (out / "context.md").read_text()
    assert "memkit/window" in md and "decode ms/tok" in md and "RSS - memory" in md


def test_bench_all_quality_stage(bench_all):
    r, out = bench_all
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "all_quality.json").read_text())["rows"]
    assert all(row["status"] == "ok" for row in rows), [row.get("note") for row in rows]
    by = {(row["sweep"], row.get("top_k"), row.get("dtype"), row.get("backend"), row.get("style")): row for row in rows}
    window = by[("top_k", 0, "fp16", "faiss-flat", "memlong")]
    base = by[("top_k", 2, "fp16", "faiss-flat", "memlong")]
    full = next(row for row in rows if row["sweep"] == "full")
    int8 = by[("dtype", 2, "int8", "faiss-flat", "memlong")]
    disk = by[("backend", 2, "fp16", "disk", "memlong")]
    longmem = next(row for row in rows if row["sweep"] == "style")
    recent = next(row for row in rows if row["sweep"] == "recent")
    assert base["base"] and base["retrieved_tokens"] == 64 and window["retrieved_tokens"] == 0
    assert recent["window"] == 128 + 2 * 32 and recent["top_k"] == 0
    for row in rows:
        assert math.isfinite(row["ppl"]) and row["ppl"] > 1 and row["tokens_per_s"] > 0
    assert base["gap_closed"] == pytest.approx((window["ppl"] - base["ppl"]) / (window["ppl"] - full["ppl"]))
    assert window["gap_closed"] == 0
    assert int8["page_bytes"] < base["page_bytes"]  # int8 pages are smaller than fp16 ones
    assert disk["ppl"] == pytest.approx(base["ppl"], rel=1e-4)  # exact backends retrieve the same chunks
    assert base["search_ms_block"] > 0 and base["searches"] > 0 and window["searches"] == 0
    assert longmem["style"] == "longmem" and longmem["search_ms_block"] > 0
    assert (out / "all_quality_ppl.png").stat().st_size > 1000


def test_bench_all_backends_report_and_rebuild(bench_all, tmp_path):
    r, out = bench_all
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "all_backends.json").read_text())["rows"]
    assert {(row["dataset"], row["backend"]) for row in rows} == {
        (d, b) for d in ("minilm", "smollm2-keys") for b in ("faiss-flat", "disk")}
    assert all(row["recall"] >= 0.99 for row in rows)  # exact backends (ties among real keys may swap ids)
    summary = json.loads((out / "all.json").read_text())
    assert {k: v["status"] for k, v in summary["stages"].items()} == {"context": "ok", "quality": "ok",
                                                                      "backends": "ok"}
    measures = [h["measure"] for h in summary["headline"]]
    assert any(m.startswith("perplexity, tokens 512-1023") for m in measures)
    assert any(m.startswith("decode ms/token") for m in measures)
    decode = next(t for t in summary["targets"] if t["target"].startswith("decoding one token"))
    assert decode["met"] in (True, False) and decode["measured"].endswith("x")
    report = (out.parent / "REPORT.md").read_text()
    for part in ("# memkit benchmark report", "## Headline", "## Targets", "res/context_decode.png",
                 "res/all_quality_ppl.png", "res/all_backends_recall_qps.png", "memkit bench all"):
        assert part in report
    assert "| measurement |" in r.stdout and "report:" in r.stdout
    # --from-results rebuilds the same report without measuring
    rebuilt = tmp_path / "R.md"
    r2 = memkit_cli("bench", "all", "--from-results", "--out-dir", str(out), "--report", str(rebuilt), cwd=tmp_path,
                    timeout=120)
    assert r2.returncode == 0, r2.stderr
    text = rebuilt.read_text()
    assert text.split("## Headline")[1].split("## Context")[0] == report.split("## Headline")[1].split("## Context")[0]


@pytest.mark.parametrize("args, reason", [
    (["eval", "ppl", "--text", "missing.txt"], "does not exist"),
    (["eval", "ppl", "--text", "{text}", "--config", "{badcfg}"], "unknown backend"),
    (["eval", "ppl", "--text", "{text}", "--model", "{empty}"], "no model weights"),
    (["eval", "passkey", "--model", "{empty}", "--lengths", "1k"], "no model weights"),
    (["eval", "passkey", "--lengths", "abc"], "not a token count"),
    (["eval", "passkey", "--depths", "1.5"], "outside [0, 1]"),
    (["eval", "passkey", "--modes", "memkit,banana"], "unknown mode"),
    (["eval", "passkey", "--key", "1234"], "must be five digits"),
    (["eval", "ppl", "--text", "{text}", "--model", "{model}", "--end", "100k"], "fewer than --end"),
    (["bench", "context", "--model", "{empty}", "--lengths", "1k"], "no model weights"),
    (["bench", "context", "--caps", "banana=1k"], "write SETUP=LENGTH"),
    (["bench", "context", "--styles", "memlong,banana"], "unknown style"),
    (["bench", "all", "--model", "{empty}"], "no model weights"),
    (["bench", "all", "--backends", "faiss-flat,no-such-backend"], "unknown backend"),
    (["bench", "all", "--ppl-text", "missing.txt"], "does not exist"),
    (["bench", "all", "--dtypes", "fp16,int4"], "unknown K/V dtype"),
    (["bench", "all", "--stages", "context,banana"], "unknown stage"),
    (["bench", "all", "--ppl-range", "8k"], "START:END"),
    (["bench", "all", "--config", "{badcfg}"], "unknown backend"),
    (["bench", "all", "--from-results", "--out-dir", "{empty}"], "no benchmark results"),
    (["demo", "--model", "{empty}"], "no model weights"),
])
def test_bad_input_one_line_reason(tiny, tmp_path, args, reason):
    model, text, _cfg = tiny
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.yaml").write_text("backend: no-such-backend\n")
    subs = {"{text}": str(text), "{badcfg}": str(tmp_path / "bad.yaml"), "{empty}": str(tmp_path / "empty"),
            "{model}": str(model)}
    r = memkit_cli(*[subs.get(a, a) for a in args], cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("memkit: error:")]
    assert len(lines) == 1 and reason in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_help_explains_every_option():
    """Every option of the commands built here carries a help text; --help prints them."""
    import argparse

    from memkit.cli import build_parser

    parser = build_parser()

    def sub(p: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
        action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        return action.choices[name]

    for path in (["eval", "ppl"], ["eval", "passkey"], ["bench", "context"], ["bench", "all"], ["demo"]):
        p = parser
        for name in path:
            p = sub(p, name)
        for action in p._actions:
            if action.help == argparse.SUPPRESS:
                continue
            assert action.help and len(action.help) > 10, f"{' '.join(path)} {action.option_strings} lacks help"
    r = subprocess.run([sys.executable, "-m", "memkit.cli", "eval", "ppl", "--help"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0
    for opt in ("--model", "--text", "--window", "--config", "--start", "--end", "--modes", "--out"):
        assert opt in r.stdout
    r = subprocess.run([sys.executable, "-m", "memkit.cli", "bench", "all", "--help"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0
    for opt in ("--quick", "--lengths", "--styles", "--top-ks", "--dtypes", "--backends", "--ppl-range", "--report",
                "--from-results"):
        assert opt in r.stdout
