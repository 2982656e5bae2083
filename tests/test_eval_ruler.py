"""``memkit eval ruler`` (RULER through lm-evaluation-harness) on a tiny real HF folder.

The tiny model is a random-weight Llama with a 320-token BPE tokenizer trained on Hamlet, so answers are wrong
but every piece runs for real: lm-eval's RULER generators build the samples (at 512 tokens), the cache is
written and read back, lm-eval's prompts and metric are used, and each answer is located in the prompt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'memkit[eval]'")

TINY_CONFIG = "window: 128\nblock_size: 64\nchunk_size: 32\ntop_k: 2\nsink_tokens: 4\nretriever: keys\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from memkit.testing.tiny_models import tiny_hf_folder

    root = tmp_path_factory.mktemp("ruler")
    folder, _ = tiny_hf_folder(root)
    (root / "memkit.yaml").write_text(TINY_CONFIG)
    return folder, root / "memkit.yaml", root / "cache"


def ruler_cli(*args, cache, cwd, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MEMKIT_CACHE=str(cache),
               TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "memkit.cli", "eval", "ruler", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_ruler_end_to_end_and_cached_rerun(tiny, tmp_path):
    from memkit.evaluation.ruler import LOCATIONS

    folder, cfg, cache = tiny
    args = ["--model", str(folder), "--config", str(cfg), "--lengths", "512", "--tasks",
            "niah_single_1,niah_multikey_2", "--limit", "2", "--modes", "memkit,window,full", "--threads", "1",
            "--out", "res", "--no-progress"]
    r = ruler_cli(*args, cache=cache, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "built (500 samples" in r.stdout
    data = json.loads((tmp_path / "res" / "ruler.json").read_text())
    assert {v["cache"] for v in data["samples"].values()} == {"built"}
    res = data["results"]
    assert len(res) == 2 * 3 * 2
    for rec in res:
        assert 0.0 <= rec["score"] <= 1.0 and isinstance(rec["prediction"], str)
        assert rec["prompt_tokens"] + 128 <= 512  # lm-eval leaves 128 tokens for the answer
        if rec["mode"] == "full":
            assert "locations" not in rec
            continue
        assert len(rec["locations"]) == len(rec["answers"]) == 1
        loc = rec["locations"][0]
        assert loc["location"] in LOCATIONS and loc["occurrences"] >= 1
        a, b = loc["spans"][0]
        assert 0 <= a < b <= rec["prompt_tokens"]
        assert rec["window_start"] <= rec["prompt_tokens"] - 32 - 128  # tail (one chunk) + at least `window`
        if rec["mode"] == "window":
            assert rec["retrieved"] == [] and loc["location"] in ("window", "sinks", "missed", "partial")
        else:
            assert len(rec["retrieved"]) <= 2
            assert all(s[1] > 4 for s in (x["span"] for x in rec["retrieved"]))  # no chunk inside the sinks
    assert any(rec["mode"] == "memkit" and rec["stored_chunks"] > 0 for rec in res)
    md = (tmp_path / "res" / "ruler.md").read_text()
    assert "| niah_single_1" in md and "memkit 512" in md and "retrieved" in md
    assert (tmp_path / "res" / "ruler.png").stat().st_size > 10_000
    journal = (tmp_path / "res" / "ruler.jsonl").read_text().splitlines()
    assert len(journal) == 1 + len(res) and "header" in json.loads(journal[0])
    # the same command again refuses to replace the journal of hours of work ...
    r2 = ruler_cli(*args, cache=cache, cwd=tmp_path)
    assert r2.returncode == 2 and "--resume" in r2.stderr and "already holds 12 samples" in r2.stderr
    # ... and with --resume and one more sample per cell runs only that sample, reading the cached samples (lm-eval's
    # generators are never imported); a torn last line (a crash while writing) is dropped and rerun
    (tmp_path / "res" / "ruler.jsonl").write_text("\n".join(journal[:-1]) + "\n" + journal[-1][:40])
    r3 = ruler_cli(*[a if a != "2" else "3" for a in args], "--resume", cache=cache, cwd=tmp_path)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert "hit (500 samples" in r3.stdout and "built" not in r3.stdout
    assert "11 samples reused" in r3.stdout
    again = json.loads((tmp_path / "res" / "ruler.json").read_text())
    assert len(again["results"]) == 3 * 3 * 2 and again["reused_samples"] == 11
    by_key = {(x["task"], x["mode"], x["index"]): x["prediction"] for x in again["results"]}
    assert all(by_key[(x["task"], x["mode"], x["index"])] == x["prediction"] for x in res)  # the rerun one too
    assert len((tmp_path / "res" / "ruler.jsonl").read_text().splitlines()) == 1 + 3 * 3 * 2
    # another config cannot resume this journal (its table would mix two set-ups)
    other = tmp_path / "other.yaml"
    other.write_text(TINY_CONFIG.replace("top_k: 2", "top_k: 1"))
    r4 = ruler_cli(*[a if a != str(cfg) else str(other) for a in args], "--resume", cache=cache, cwd=tmp_path)
    assert r4.returncode == 2 and "config differ" in r4.stderr


def test_samples_and_prompts_equal_lm_eval_own_task(tiny, monkeypatch):
    """The cached samples and the prompts memkit builds from them are those lm-eval's TaskManager builds."""
    import random

    import numpy as np
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from memkit.evaluation import ruler

    folder, _, cache = tiny
    monkeypatch.setenv("MEMKIT_CACHE", str(cache))
    tok = AutoTokenizer.from_pretrained(folder)
    s = ruler.load_samples("ruler_fwe", 512, tok, folder, rebuild=True)
    assert s.cache_file.is_file() and len(s.docs) == 500
    mine = ruler.requests_for(ruler.make_task(s, folder), 3)

    random.seed(0)
    np.random.seed(1234)
    tm = TaskManager(include_defaults=False, include_path=str(ruler._ruler_dir()),
                     metadata={"tokenizer": str(folder), "max_seq_lengths": [512]})
    theirs_task = tm.load(["ruler_fwe"])["tasks"]["ruler_fwe"]
    assert [dict(d) for d in theirs_task.test_docs()][:50] == s.docs[:50]
    theirs = ruler.requests_for(theirs_task, 3)
    assert [i.args for i in mine] == [i.args for i in theirs]
    assert mine[0].args[0].endswith(s.docs[0]["gen_prefix"])

    # a corrupt cache file is rebuilt (with a warning), not trusted
    s.cache_file.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        again = ruler.load_samples("ruler_fwe", 512, tok, folder)
    assert again.cache == "rebuilt" and again.docs[0]["input"] == s.docs[0]["input"]
    assert ruler.load_samples("ruler_fwe", 512, tok, folder).cache == "hit"


def test_answer_spans_and_classification(tiny):
    from transformers import AutoTokenizer

    from memkit.evaluation.ruler import answer_token_spans, best_location, classify

    folder, _, _ = tiny
    tok = AutoTokenizer.from_pretrained(folder)
    text = ("The grass is green. " * 20 + "One of the special magic numbers for lucky-cat is: 4096123. "
            + "The sky is blue. " * 10 + "again 4096123. but not 140961234 nor 4096123x")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    spans = answer_token_spans(tok, text, ids, "4096123")
    assert len(spans) == 2  # whole-word matches only
    for a, b in spans:
        assert "4096123" in tok.decode(ids[a:b])
        assert "4096123" not in tok.decode(ids[a + 1:b]) and "4096123" not in tok.decode(ids[a:b - 1])
    with_bos = [tok.bos_token_id, *ids]
    assert answer_token_spans(tok, text, with_bos, "4096123") == [(a + 1, b + 1) for a, b in spans]
    assert answer_token_spans(tok, text, ids[:-1], "4096123") == []  # ids that are not this text's: no guess

    kw = {"window_start": 100, "sinks": 4}
    assert classify((120, 125), retrieved=[], **kw) == "window"
    assert classify((98, 103), retrieved=[], **kw) == "partial"
    assert classify((1, 3), retrieved=[], **kw) == "sinks"
    assert classify((40, 45), retrieved=[(32, 64)], **kw) == "retrieved"
    assert classify((60, 70), retrieved=[(32, 64), (64, 96)], **kw) == "retrieved"  # across two retrieved chunks
    assert classify((60, 70), retrieved=[(32, 64)], **kw) == "partial"
    assert classify((40, 45), retrieved=[(64, 96)], **kw) == "missed"
    assert best_location(["missed", "retrieved", "partial"]) == "retrieved" and best_location([]) == "not found"


def test_tail_capture_is_the_prompt_end_step(tiny):
    """The captured trace is the retrieval of the step that read the prompt's end, and the window it saw holds
    `window` to `window + chunk_size - 1` tokens before the tail (integrations/context.py)."""
    from memkit.evaluation.lm_eval_model import MemkitLM
    from memkit.evaluation.ruler import TailCapture
    from memkit.testing.tiny_models import one_thread

    folder, cfg, _ = tiny
    text = (folder.parent / "text.txt").read_text()[:1500]
    with one_thread():
        lm = MemkitLM(pretrained=str(folder), config=str(cfg))
        try:
            n = len(lm.tok_encode(text))
            assert n > 600
            with TailCapture(lm.model, n) as cap:
                lm.generate_one(text, {"until": [], "max_gen_toks": 1})
            after = lm.model.memory.trace()
        finally:
            lm.close()
    assert cap.done and cap.trace == after and len(after) >= 1
    tail, window, chunk = 32, 128, 32
    assert n - tail - window - chunk < cap.window_start <= n - tail - window
    assert cap.stored[-1][1] == cap.window_start
    assert len(cap.trace) <= 2 and all(t["span"][1] > 4 for t in cap.trace)  # top_k, none inside the sinks


def test_bad_tasks_and_impossible_lengths_fail_fast(tiny, tmp_path):
    folder, cfg, cache = tiny
    r = ruler_cli("--model", str(folder), "--tasks", "niah_single_2", cache=cache, cwd=tmp_path)
    assert r.returncode == 2 and "essays" in r.stderr and "niah_single_1" in r.stderr
    r = ruler_cli("--model", str(folder), "--tasks", "nope", cache=cache, cwd=tmp_path)
    assert r.returncode == 2 and "unknown RULER task 'nope'" in r.stderr
    r = ruler_cli("--model", str(folder), "--limit", "0", cache=cache, cwd=tmp_path)
    assert r.returncode == 2 and "--limit" in r.stderr
    # lm-eval's vt generator would retry forever with this tokenizer at 512 tokens: refused up front
    r = ruler_cli("--model", str(folder), "--config", str(cfg), "--tasks", "ruler_vt", "--lengths", "512",
                  "--no-progress", cache=cache, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "ruler_vt cannot be built at 512 tokens" in r.stderr
