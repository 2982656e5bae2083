"""The evaluation and benchmark CLI end to end, in subprocesses, on a tiny random model and real text.

The tiny model is a random-weight Llama saved with a small byte-level BPE tokenizer trained on a play,
so ``--model`` reads a real local HF folder; the text is the first lines of Hamlet.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = """\
window: 128
block_size: 128
chunk_size: 32
top_k: 2
sink_tokens: 4
retriever: keys
"""


def memkit_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return subprocess.run([sys.executable, "-m", "memkit.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder with a tiny HF model + tokenizer, text file, memkit config file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from memkit.corpora import play_text
    from memkit.testing.tiny_models import tiny_model

    root = tmp_path_factory.mktemp("tiny")
    text = play_text("hamlet")[:12_000]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([text], trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    folder = root / "model"
    tok.save_pretrained(folder)
    tiny_model("llama", vocab_size=len(tok), max_positions=2048).save_pretrained(folder)
    (root / "text.txt").write_text(text)
    (root / "memkit.yaml").write_text(TINY_CONFIG)
    return folder, root / "text.txt", root / "memkit.yaml"


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


def test_bench_context_end_to_end(tiny, tmp_path):
    model, _text, cfg = tiny
    r = memkit_cli("bench", "context", "--model", str(model), "--config", str(cfg), "--lengths", "512,1k",
                   "--repeats", "1", "--out-dir", str(tmp_path / "res"), "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "res" / "context.json").read_text())
    rows = {row["length"]: row for row in data["rows"]}
    assert set(rows) == {512, 1024}
    for row in rows.values():
        assert row["tps_memkit"] > 0 and row["tps_window"] > 0 and row["tps_full"] > 0
        assert row["memkit_over_window"] > 0 and row["rss_memkit"] > 0
    assert (tmp_path / "res" / "context_speed.png").stat().st_size > 1000
    assert "memkit/window" in (tmp_path / "res" / "context.md").read_text()


@pytest.mark.parametrize("args, reason", [
    (["eval", "ppl", "--text", "missing.txt"], "does not exist"),
    (["eval", "ppl", "--text", "{text}", "--config", "{badcfg}"], "unknown backend"),
    (["eval", "ppl", "--text", "{text}", "--model", "{empty}"], "no model weights"),
    (["eval", "passkey", "--model", "{empty}", "--lengths", "1k"], "no model weights"),
    (["eval", "passkey", "--lengths", "abc"], "not a token count"),
    (["eval", "passkey", "--depths", "1.5"], "outside [0, 1]"),
    (["eval", "passkey", "--modes", "memkit,banana"], "unknown mode"),
    (["eval", "ppl", "--text", "{text}", "--model", "{model}", "--end", "100k"], "fewer than --end"),
    (["bench", "context", "--model", "{empty}", "--lengths", "1k"], "no model weights"),
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

    for path in (["eval", "ppl"], ["eval", "passkey"], ["bench", "context"], ["demo"]):
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
