"""A wrapped model behaves like the Hugging Face model it wraps: generate reads each prompt token once,
``.logits`` has one row per position, peft models wrap, pipelines run, and memkit's own calls raise no
deprecation warnings. Run at both ends of the tested transformers range (``make test-compat``)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

import memkit
from memkit.integrations.generate import MemkitCache
from memkit.integrations.hf_compat import TESTED_TRANSFORMERS
from memkit.testing.tiny_models import one_thread, tiny_hf_folder, tiny_model

CFG = dict(window=32, chunk_size=8, block_size=16, top_k=3, sink_tokens=2, progress=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    with one_thread():
        yield


def _ids(n: int, seed: int, batch: int = 1, vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def _stored_chunks_expected(tokens: int, flush: bool = True) -> int:
    """Chunks stored after ``tokens`` distinct tokens were read once each: every token when the window is flushed
    at the end of the call (the last chunk partial), else only the chunks that left a window of W tokens."""
    W, C = CFG["window"], CFG["chunk_size"]
    return -(-tokens // C) if flush else max(0, (tokens - W) // C)


# ---------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_generate_reads_every_prompt_token_once(arch: str) -> None:
    """A prompt of ~10 blocks: each chunk is stored once, spans are distinct and inside what was read."""
    wrapped = memkit.wrap(tiny_model(arch), **CFG)
    N, new = 163, 25
    with torch.no_grad():
        out = wrapped.generate(_ids(N, 11), max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert out.shape == (1, N + new)
    read = N + new - 1  # the last generated token is returned, never fed back
    assert wrapped.memory.num_chunks() == _stored_chunks_expected(read)
    spans = sorted(wrapped.memory.manager.spans("default"))
    C = CFG["chunk_size"]
    assert spans == [(s, min(s + C, read)) for s in range(0, read, C)]  # each token once, the last chunk partial


def test_generate_twice_reads_the_second_prompt_once() -> None:
    wrapped = memkit.wrap(tiny_model("llama"), **CFG)
    with torch.no_grad():
        wrapped.generate(_ids(100, 12), max_new_tokens=5, do_sample=False, pad_token_id=0)
        wrapped.generate(_ids(90, 13), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert wrapped.memory.num_chunks() == _stored_chunks_expected(104) + _stored_chunks_expected(94)


def test_a_token_handed_over_twice_raises_naming_the_version() -> None:
    """The run-time check: a step that re-reads prompt tokens raises instead of answering wrongly."""
    import transformers

    wrapped = memkit.wrap(tiny_model("llama"), **CFG)
    rt = wrapped.memkit_runtime
    ids = _ids(60, 14)
    cache = {rt.cache_kwarg: MemkitCache(rt)}
    with pytest.raises(memkit.IncompatibleLibraryError, match=transformers.__version__) as err:
        with rt.calling(1, None, mode="generate", prompt_cols=60, prompt_ids=ids), torch.no_grad():
            wrapped.hf_model(input_ids=ids[:, :40], **cache)
            wrapped.hf_model(input_ids=ids, **cache)  # the whole prompt again, as 5.24 did
    assert TESTED_TRANSFORMERS in str(err.value)
    assert wrapped.memory.num_chunks() == _stored_chunks_expected(40, flush=False)  # the refused step stored nothing


def test_generate_raises_when_transformers_stops_slicing_the_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate a transformers that re-feeds the whole prompt (as 5.24 did when it took memkit's cache for a
    linear-attention cache): memkit raises instead of reading the prompt twice."""
    monkeypatch.setattr(MemkitCache, "get_seq_length", lambda self, layer_idx=0: 0)
    wrapped = memkit.wrap(tiny_model("llama"), **CFG)
    with pytest.raises(memkit.IncompatibleLibraryError, match="already read"):
        wrapped.generate(_ids(100, 15), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert wrapped.memory.num_chunks() == _stored_chunks_expected(100 - CFG["chunk_size"], flush=False)  # prefill


def test_memkit_calls_raise_no_deprecation_warnings() -> None:
    wrapped = memkit.wrap(tiny_model("llama"), **CFG)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with torch.no_grad():
            wrapped.generate(_ids(70, 16), max_new_tokens=4, do_sample=False, pad_token_id=0)
            wrapped(_ids(70, 17), labels=_ids(70, 17), logits_to_keep=1)
            wrapped.memory.ingest(_ids(40, 18))
    bad = [w for w in seen if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not bad, [str(w.message) for w in bad]


# ---------------------------------------------------------------------------------------------- logits
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_logits_have_one_row_per_position_like_the_plain_model(arch: str) -> None:
    model = tiny_model(arch)
    ids = _ids(30, 19)  # several blocks, never beyond the window: equals the plain model
    with torch.no_grad():
        ref = model(ids).logits
        wrapped = memkit.wrap(model, **CFG)
        out = wrapped(ids).logits
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        long = wrapped(_ids(301, 20)).logits
    assert long.shape == (1, 301, model.config.vocab_size)


def test_logits_to_keep_follows_hugging_face() -> None:
    wrapped = memkit.wrap(tiny_model("llama"), **CFG)
    ids = _ids(150, 21)
    with torch.no_grad():
        full = wrapped(ids).logits
        wrapped.memory.reset()
        last = wrapped(ids, logits_to_keep=1).logits
        wrapped.memory.reset()
        tail = wrapped(ids, logits_to_keep=20).logits
        wrapped.memory.reset()
        pick = torch.tensor([149, 3, 77, 3, -1])
        some = wrapped(ids, logits_to_keep=pick).logits
        wrapped.memory.reset()
        loss_full = wrapped(ids, labels=ids).loss
        wrapped.memory.reset()
        loss_kept = wrapped(ids, labels=ids, logits_to_keep=1)
        wrapped.memory.reset()
        all_n = wrapped(ids, logits_to_keep=150).logits
    assert last.shape == (1, 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:])
    torch.testing.assert_close(tail, full[:, -20:])
    torch.testing.assert_close(all_n, full)  # logits_to_keep=N: every position, as HF
    torch.testing.assert_close(some, full[:, [149, 3, 77, 3, 149]])
    torch.testing.assert_close(loss_kept.loss, loss_full)
    assert loss_kept.logits.shape[1] == 1
    for bad in (-1, 151, 10**9, 2.5, "all", torch.tensor([[1]]), torch.tensor([150])):
        with pytest.raises(memkit.InvalidInputError):
            wrapped(ids, logits_to_keep=bad)


def test_logits_that_cannot_fit_are_refused_with_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    wrapped = memkit.wrap(tiny_model("llama", vocab_size=256), **CFG)

    class Tiny:
        available = 1 << 16  # 64 KiB free: (1, N, 256) float32 logits of a long input do not fit

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    monkeypatch.setattr("memkit.integrations.long_forward._LARGE_LOGITS", 1 << 10)
    with pytest.raises(memkit.CapacityError, match="logits_to_keep=1"):
        wrapped(_ids(200, 22))
    assert wrapped(_ids(200, 22), logits_to_keep=1).logits.shape == (1, 1, 256)


# ---------------------------------------------------------------------------------------------- peft
def _peft_model(arch: str = "llama") -> torch.nn.Module:
    peft = pytest.importorskip("peft")
    base = tiny_model(arch)
    torch.manual_seed(3)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(base, cfg).eval()


def test_peft_forward_and_generate_equal_the_peft_model_inside_the_window() -> None:
    pm = _peft_model()
    ids = _ids(28, 23)
    with torch.no_grad():
        ref_logits = pm(input_ids=ids).logits
        ref_gen = pm.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        with pm.disable_adapter():
            plain = pm(input_ids=ids).logits
    assert not torch.allclose(ref_logits, plain, atol=1e-3)  # the adapter matters
    wrapped = memkit.wrap(pm, **CFG)
    with torch.no_grad():
        out = wrapped(ids).logits
        wrapped.memory.reset()
        gen = wrapped.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(out, ref_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(gen, ref_gen)


def test_peft_long_generate_uses_memory_and_reads_once() -> None:
    wrapped = memkit.wrap(_peft_model(), **CFG)
    with torch.no_grad():
        out = wrapped.generate(_ids(160, 24), max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 190)
    assert wrapped.memory.num_chunks() == _stored_chunks_expected(189)
    assert wrapped.memory.trace()  # retrieval happened
    assert len(set(out[0, 160:].tolist())) > 3  # not one token repeated


def test_prompt_learning_peft_is_refused() -> None:
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(tiny_model("llama"), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(memkit.UnsupportedModelError, match="LoRA"):
        memkit.wrap(pm, **CFG)


# ---------------------------------------------------------------------------------------------- pipeline
def test_text_generation_pipeline_runs_quietly(tmp_path: object) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    folder, _ = tiny_hf_folder(tmp_path, chars=4000)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    model.generation_config.eos_token_id = None
    wrapped = memkit.wrap(model, tokenizer=None, **CFG)
    logged: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record.getMessage())

    handler = Grab(level=logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    try:
        pipe = pipeline("text-generation", model=wrapped, tokenizer=tok)
        text = "To be, or not to be, that is the question. " * 12
        got = pipe(text, max_new_tokens=5, do_sample=False)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert got[0]["generated_text"].startswith(text)
    assert not [m for m in logged if "not supported" in m], logged
    assert wrapped.memory.num_chunks() > 0  # the prompt was longer than the window: memory was used
