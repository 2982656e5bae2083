"""lm-evaluation-harness on memkit-wrapped models (``memkit.evaluation.lm_eval_model``), on a tiny real HF folder.

The tiny model is a random-weight Llama with a BPE tokenizer trained on Hamlet (2,048 positions). Inside the first
block memkit attends exactly what the plain model does, so log-likelihoods must equal the plain model's; beyond
the model's positions memkit must still read the whole input (lm-eval's HFLM would truncate it).
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'memkit[eval]'")

TINY_CONFIG = "window: 256\nblock_size: 128\nchunk_size: 32\ntop_k: 2\nsink_tokens: 4\nretriever: keys\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from memkit.testing.tiny_models import tiny_hf_folder

    root = tmp_path_factory.mktemp("lmeval")
    folder, text = tiny_hf_folder(root)
    (root / "memkit.yaml").write_text(TINY_CONFIG)
    return folder, text.read_text(), root / "memkit.yaml"


@pytest.fixture(scope="module")
def lm(tiny):
    from memkit.evaluation.lm_eval_model import MemkitLM
    from memkit.testing.tiny_models import one_thread

    folder, _, cfg = tiny
    with one_thread():
        model = MemkitLM(pretrained=str(folder), config=str(cfg), threads=1)
        yield model
    model.close()


def _instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _plain_loglikelihood(model, ctx, cont):
    """Reference: the plain HF model's log p(cont | ctx) and greedy flag, from one full forward."""
    import torch

    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)  # (N, V)
    rows = logp[len(ctx) - 1:len(ctx) + len(cont) - 1]  # rows predicting the continuation
    target = torch.tensor(cont)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def test_loglikelihood_equals_plain_model_inside_the_block(lm, tiny):
    _, text, _ = tiny
    pairs = [(text[2000:2100], text[2100:2130]), (text[3000:3080], " the"), ("", text[:50])]
    got = lm.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
    assert len(got) == 3
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        c_enc, k_enc = ([lm.prefix_token_id], lm.tok_encode(cont)) if ctx == "" else lm._encode_pair(ctx, cont)
        assert len(c_enc) + len(k_enc) <= 128  # one block: memkit attends exactly what the plain model does
        ref_ll, ref_greedy = _plain_loglikelihood(lm.plain, c_enc, k_enc)
        assert ll == pytest.approx(ref_ll, rel=1e-4, abs=1e-3)
        assert greedy == ref_greedy


def test_the_callers_grad_mode_is_left_alone(lm, tiny):
    """Scoring runs without autograd, but a training loop in the same process keeps its gradients."""
    import torch

    assert torch.is_grad_enabled()
    _, text, _ = tiny
    lm.loglikelihood(_instances("loglikelihood", [(text[:80], text[80:100])]), disable_tqdm=True)
    lm.generate_until(_instances("generate_until", [(text[:80], {"until": ["\n"], "max_gen_toks": 3})]),
                      disable_tqdm=True)
    assert torch.is_grad_enabled()


def test_rolling_loglikelihood_equals_plain_model_inside_the_block(lm, tiny):
    import torch

    _, text, _ = tiny
    doc = text[500:640]  # ~107 tokens
    (got,) = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(doc,)]), disable_tqdm=True)
    ids = [lm.prefix_token_id, *lm.tok_encode(doc)]
    assert len(ids) <= 128
    with torch.no_grad():
        logp = torch.log_softmax(lm.plain(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    ref = float(logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum())
    assert got == pytest.approx(ref, rel=1e-4)


def test_memory_is_reset_between_requests(lm, tiny):
    """A 300-token request scored alone, after a different long request, and again: identical each time."""
    _, text, _ = tiny
    a = (text[:900], text[900:960])
    b = (text[3000:6000], text[6000:6040])
    first, _, again = lm.loglikelihood(_instances("loglikelihood", [a, b, a]), disable_tqdm=True)
    assert len(lm.tok_encode(a[0])) > 3 * 128  # later blocks of `a` retrieve from memory
    assert first == again
    # and without the reset the second read of `a` would have seen `b`'s chunks: memory really is used
    ctx, cont = lm._encode_pair(*a)
    lm.score(*lm._encode_pair(*b))
    import torch

    ids = (ctx + cont)[:-1]
    stale = lm.model(torch.tensor([ids]), logits_to_keep=len(cont)).logits  # no reset: b's memory is still there
    fresh = lm.score(ctx, cont)[0]
    stale_ll = float(torch.log_softmax(stale[0].float(), -1).gather(1, torch.tensor(cont)[:, None]).sum())
    assert stale_ll != pytest.approx(fresh, abs=1e-6)


def test_long_input_beyond_the_model_positions_runs_and_full_mode_refuses(lm, tiny):
    from memkit.errors import InvalidInputError
    from memkit.evaluation.lm_eval_model import MemkitLM

    folder, text, _ = tiny
    ctx = text[:4500]
    ctx_ids = lm.tok_encode(ctx)
    assert len(ctx_ids) > 2048 + 100  # the tiny model has 2,048 positions
    (ll, _), = lm.loglikelihood(_instances("loglikelihood", [(ctx, " the end")]), disable_tqdm=True)
    assert math.isfinite(ll) and ll < 0
    (roll,) = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text[:4500],)]), disable_tqdm=True)
    assert math.isfinite(roll) and roll < 0
    gen = lm.generate_one(ctx, {"until": [], "max_gen_toks": 3})
    assert len(gen.prompt_ids) == len(ctx_ids)  # nothing truncated
    assert isinstance(gen.text, str) and len(gen.new_ids) <= 3

    full = MemkitLM(pretrained=str(folder), mode="full")
    with pytest.raises(InvalidInputError, match="2,048 positions"):
        full.loglikelihood(_instances("loglikelihood", [(ctx, " the end")]), disable_tqdm=True)
    # rolling in full mode uses lm-eval's rolling windows of the model's positions, as HFLM does
    (roll_full,) = full.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text[:4500],)]), disable_tqdm=True)
    assert math.isfinite(roll_full) and roll_full < 0


def test_generate_until_returns_strings_and_stops_at_until(lm, tiny):
    _, text, _ = tiny
    ctx = text[:400]
    free = lm.generate_one(ctx, {"until": [], "max_gen_toks": 24})
    assert len(free.new_ids) == 24 and isinstance(free.text, str)
    assert free.text == free.raw_text  # no stop string met
    # a stop string from the middle of the free-running answer: generation must end there, and the text is cut
    stop = free.raw_text[len(free.raw_text) // 2:len(free.raw_text) // 2 + 3]
    assert stop and stop in free.raw_text
    cut = free.raw_text[:free.raw_text.index(stop)]
    stopped = lm.generate_one(ctx, {"until": [stop], "max_gen_toks": 24})
    assert stopped.text == cut
    assert len(stopped.new_ids) < 24  # stopped early, not merely cut afterwards
    out = lm.generate_until(_instances("generate_until", [(ctx, {"until": [stop], "max_gen_toks": 24}),
                                                          (text[:100], {"until": ["\n"], "max_gen_toks": 5})]),
                            disable_tqdm=True)
    assert out[0] == cut and isinstance(out[1], str) and "\n" not in out[1]


def test_wrapped_model_object_and_bad_arguments(tiny):
    import memkit
    from memkit.errors import ConfigError, InvalidInputError
    from memkit.evaluation.lm_eval_model import MemkitLM
    from memkit.models import load_model

    folder, text, cfg = tiny
    hf, tok = load_model(str(folder))
    wrapped = memkit.wrap(hf, str(cfg), tokenizer=tok)
    try:
        lm = MemkitLM(wrapped, tokenizer=tok)
        assert lm.model is wrapped
        assert isinstance(lm.generate_one(text[:200], {"until": ["\n"], "max_gen_toks": 4}).text, str)
        with pytest.raises(ConfigError, match="already wrapped"):
            MemkitLM(wrapped, tokenizer=tok, top_k=4)
    finally:
        memkit.unwrap(wrapped)
    with pytest.raises(ConfigError, match="mode"):
        MemkitLM(pretrained=str(folder), mode="fast")
    with pytest.raises(ConfigError):
        MemkitLM(pretrained=str(folder), not_a_memkit_field=3)
    with pytest.raises(InvalidInputError, match="tokenizer"):
        MemkitLM(hf)
    with pytest.raises(InvalidInputError, match="does not exist"):
        MemkitLM(pretrained=str(folder / "missing"))


def test_lm_eval_command_line_runs_a_real_task(tiny, tmp_path):
    """``memkit-lm-eval --model memkit`` (the console script: lm-eval's own CLI) on a local generate_until + multiple-choice task."""
    import os
    import subprocess
    import sys

    folder, text, cfg = tiny
    docs = tmp_path / "docs.jsonl"
    long_ctx = text[:4500]  # ~2,700 tokens: more than the tiny model's 2,048 positions
    rows = [{"q": long_ctx + "\nQ: who?\nA:", "a": "Hamlet", "choices": [" Hamlet", " Horatio"]},
            {"q": "To be, or not to be, that is the", "a": "question", "choices": [" question", " answer"]}]
    docs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {docs}\ntest_split: test\n" \
             "doc_to_text: '{{q}}'\nmetadata:\n  version: 1.0\n"
    (tmp_path / "gen.yaml").write_text("task: memkit_tiny_gen\noutput_type: generate_until\ndoc_to_target: '{{a}}'\n"
                                       "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
                                       "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
                                       "    higher_is_better: true\n" + common)
    (tmp_path / "mc.yaml").write_text("task: memkit_tiny_mc\noutput_type: multiple_choice\ndoc_to_choice: '{{choices}}'\n"
                                      "doc_to_target: 0\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
                                      "    higher_is_better: true\n" + common)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "ds"),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "memkit.evaluation.lm_eval_cli", "--model", "memkit", "--model_args",
                        f"pretrained={folder},config={cfg},threads=1", "--tasks", "memkit_tiny_gen,memkit_tiny_mc",
                        "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"), "--log_samples"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "memkit_tiny_gen" in r.stdout and "memkit_tiny_mc" in r.stdout
    samples = list((tmp_path / "out").rglob("samples_memkit_tiny_mc_*.jsonl"))
    assert samples, list((tmp_path / "out").rglob("*"))
    first = [json.loads(line) for line in samples[0].read_text().splitlines()]
    lls = [x["resps"] for x in first]
    assert all(math.isfinite(float(c[0][0])) for resp in lls for c in resp)
