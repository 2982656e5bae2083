"""The wrap API: configs, passthrough, the memory facade, errors, paged == unpaged K/V, layer specs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

import memkit
from memkit.testing.tiny_models import one_thread, tiny_model

CFG = dict(window=32, chunk_size=8, block_size=16, top_k=3, sink_tokens=2, progress=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    with one_thread():
        yield


def _ids(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_config_sources_and_passthrough(tmp_path: Path) -> None:
    model = tiny_model("llama")
    path = tmp_path / "memkit.yaml"
    memkit.MemoryConfig(**CFG).save(path)
    wrapped = memkit.wrap(model, str(path), top_k=5)
    assert wrapped.memkit_config.top_k == 5 and wrapped.memkit_config.window == 32
    assert wrapped.config is model.config and wrapped.device == model.device
    assert wrapped.model is model.model and wrapped.lm_head is model.lm_head  # attribute passthrough
    assert "MemkitModel" in repr(wrapped)
    memkit.unwrap(wrapped)
    wrapped = memkit.wrap(model, {**CFG, "memlong": {"memory_layers": "all"}})
    assert wrapped.memory.stats()["memory_layers"] == [0, 1, 2, 3]
    memkit.unwrap(wrapped)
    with pytest.raises(memkit.ConfigError):
        memkit.wrap(model, window=4, chunk_size=8)
    with pytest.raises(memkit.UnknownParameterError):
        memkit.wrap(model, windw=32)


def test_bad_inputs_raise_memkit_errors() -> None:
    model = tiny_model("llama")
    wrapped = memkit.wrap(model, **CFG)
    bad = [
        dict(input_ids=torch.tensor([[1, 2, 999]])),  # beyond the vocabulary
        dict(input_ids=torch.tensor([[1.0, 2.0]])),  # float ids
        dict(input_ids=torch.zeros(1, 0, dtype=torch.long)),  # empty
        dict(input_ids=torch.zeros(1, 2, 3, dtype=torch.long)),  # 3-D
        dict(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 4)),  # mask shape
        dict(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2]])),  # labels shape
        dict(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=object()),
        dict(input_ids="hello"),
    ]
    for kwargs in bad:
        with pytest.raises(memkit.MemkitError) as info:
            wrapped(**kwargs)
        assert len(str(info.value)) > 20
    with pytest.raises(memkit.MemkitError, match="vocabulary"):
        wrapped.generate(torch.tensor([[1, 300]]), max_new_tokens=2)
    with pytest.raises(memkit.MemkitError):
        memkit.wrap(wrapped)
    with pytest.raises(memkit.MemkitError):
        memkit.wrap(model)  # the HF model is already wrapped
    with pytest.raises(memkit.MemkitError):
        memkit.unwrap(model)
    with pytest.raises(memkit.MemkitError):
        wrapped.memory.ingest("text needs a tokenizer")
    # A failed call leaves the model usable.
    out = wrapped(_ids(40))
    assert out.logits.shape == (1, 40, 256)


def test_unsupported_models_are_refused() -> None:
    from transformers import MambaConfig, MambaForCausalLM

    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, state_size=4))
    with pytest.raises(memkit.UnsupportedModelError, match="attention"):
        memkit.wrap(mamba)
    with pytest.raises(memkit.UnsupportedModelError):
        memkit.wrap(torch.nn.Linear(2, 2))
    with pytest.raises(memkit.ConfigError, match="positions"):
        memkit.wrap(tiny_model("gpt2", max_positions=64), **CFG)  # learned positions cannot hold the context


def _logits_with(model: torch.nn.Module, ids: torch.Tensor, **cfg: object) -> torch.Tensor:
    wrapped = memkit.wrap(model, **{**CFG, **cfg})
    try:
        with torch.no_grad():
            return wrapped(ids).logits
    finally:
        memkit.unwrap(wrapped)


def test_paged_and_unpaged_kv_agree(tmp_path: Path) -> None:
    """Pages forced through host and disk tiers give the same logits as pages kept on the device."""
    model = tiny_model("qwen2")
    ids = _ids(200, 1)
    page = 2 * 2 * 2 * 8 * 16 * 4  # (L=2, K/V, H=2, C=8, D=16) fp32 bytes
    unpaged = _logits_with(model, ids, kvstore={"dtype": "fp32"})
    paged = _logits_with(model, ids, kvstore={"dtype": "fp32", "device_bytes": 2 * page, "host_bytes": 3 * page,
                                              "disk_dir": str(tmp_path / "spill")})
    torch.testing.assert_close(paged, unpaged, atol=1e-6, rtol=1e-6)
    half = _logits_with(model, ids, kvstore={"dtype": "fp16"})
    torch.testing.assert_close(half, unpaged, atol=5e-2, rtol=5e-2)


def test_memlong_paper_layers_and_schemes() -> None:
    """MemLong's own set-up: one middle layer stored, the upper layers retrieve from it."""
    model = tiny_model("llama")
    wrapped = memkit.wrap(model, **CFG, memlong={"memory_layers": [1], "retrieval_layers": [2, 3]})
    with torch.no_grad():
        wrapped(_ids(120))
    stats = wrapped.memory.stats()
    assert stats["memory_layers"] == [1] and stats["retrieval_layers"] == [2, 3]
    assert stats["page_shape"][0] == 1 and stats["chunks"] > 0
    memkit.unwrap(wrapped)
    ids = _ids(150, 2)
    outs = {s: _logits_with(model, ids, position_scheme=s) for s in ("contiguous", "zero", "original")}
    assert not torch.allclose(outs["contiguous"], outs["zero"])
    assert torch.isfinite(outs["original"]).all()


def test_gemma3_memory_skips_sliding_layers() -> None:
    wrapped = memkit.wrap(tiny_model("gemma3"), **CFG, memlong={"memory_layers": "all"})
    assert wrapped.memory.stats()["memory_layers"] == [1, 3]  # the global-attention layers


def test_memory_facade_ingest_trace_save_load(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from memkit.resources import minilm_dir

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    model = tiny_model("llama", vocab_size=tok.vocab_size)
    wrapped = memkit.wrap(model, tokenizer=tok, **CFG)
    assert wrapped.memory.stats()["retriever"] == "text"
    text = " ".join(f"Fact number {i}: the secret word of room {i} is amber{i}." for i in range(30))
    info = wrapped.memory.ingest(text, namespace="doc", progress=False)
    assert info["chunks_added"] == wrapped.memory.num_chunks("doc") > 10
    q = tok("the secret word of room 17 is", return_tensors="pt", add_special_tokens=False)["input_ids"]
    wrapped.generate(q, max_new_tokens=2, do_sample=False, namespaces=["doc"], pad_token_id=0)
    trace = wrapped.memory.trace("doc")  # exactly the chunks attended: top_k of them
    assert len(trace) == 3 and all({"id", "score", "span", "text"} <= set(t) for t in trace)
    assert any("17" in (t["text"] or "") for t in trace)  # MiniLM found the chunk about room 17
    stored = wrapped.memory.num_chunks("doc")  # the document, and the question (flush_window)
    assert stored == info["chunks_added"] + 1
    wrapped.save_pretrained(tmp_path / "mk", save_memory=True)
    assert json.loads((tmp_path / "mk" / memkit.integrations.wrap.CONFIG_FILE).read_text())["top_k"] == 3
    memkit.unwrap(wrapped)
    again = memkit.from_pretrained(model, tmp_path / "mk", tokenizer=tok)
    assert again.memory.num_chunks("doc") == stored
    again.memory.reset()
    assert again.memory.num_chunks() == 0
    again.memory.load(tmp_path / "mk" / "memory")
    assert again.memory.num_chunks("doc") == stored


def test_calls_into_one_namespace_keep_time_order() -> None:
    """Spans continue across calls, so chunks of an earlier document come first in time order."""
    wrapped = memkit.wrap(tiny_model("llama"), **CFG)
    with torch.no_grad():
        wrapped.memory.ingest(_ids(100, 1), namespace="s", progress=False)
        wrapped.memory.ingest(_ids(60, 2), namespace="s", progress=False)
        wrapped(_ids(120, 3), namespaces=["s"])
    spaces = wrapped.memory.manager._ns["s"].spans
    ordered = [spaces[i] for i in sorted(spaces)]
    assert all(a[0] < b[0] for a, b in itertools.pairwise(ordered))
    assert ordered[-1][1] <= 100 + 60 + 120
    assert any(s >= 160 for s, _ in ordered)  # the forward call's chunks sit after both documents


def test_reset_restarts_spans_at_zero() -> None:
    """After memory.reset() a new input's chunks (and the trace) use that input's own token positions."""
    wrapped = memkit.wrap(tiny_model("llama"), **CFG)
    with torch.no_grad():
        wrapped(_ids(120, 1))
        first = sorted(map(tuple, wrapped.memory.manager._ns["default"].spans.values()))
        wrapped.memory.reset()
        wrapped(_ids(120, 2))
    again = sorted(map(tuple, wrapped.memory.manager._ns["default"].spans.values()))
    assert first == again and max(e for _, e in again) <= 120
    assert all(0 <= t["span"][0] < t["span"][1] <= 120 for t in wrapped.memory.trace())


@pytest.mark.parametrize("max_sim", [0.85, None])
def test_repeated_text_fills_one_retrieval_slot(max_sim: float | None) -> None:
    """A document of a repeated 7-token sentence (so chunks are shifted copies) plus one fact: the fact and one
    copy of the filler are retrieved with the default near-duplicate collapse; without it shifted copies take the
    other slots. Exact repeats are stored once. (Shifts of a 7-token sentence in 8-token chunks reach MiniLM
    cosine 0.87-0.98, so this uses 0.85; "auto" = 0.9 is tuned on 128-token chunks, where shifts reach >= 0.96.)
    Neighbour filling is off: it would give the free slots to the fact's neighbours (tests/test_memory.py), and the
    question step reads a fixed top_k (the adaptive count would read the fact alone)."""
    from transformers import AutoTokenizer

    from memkit.resources import minilm_dir

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    filler = enc("the grass is green and the sky is blue today")[:7]  # 7 tokens: each 8-token chunk is a shift
    fact = enc("the secret word of the vault is amber")[:8]
    doc = filler * 24 + fact + filler * 24  # the fact is chunk 21 exactly (24 * 7 = 21 * 8)
    wrapped = memkit.wrap(tiny_model("llama", vocab_size=tok.vocab_size), tokenizer=tok,
                          **dict(CFG, retrieval={step: {"dedup": {"max_similarity": max_sim}, "neighbours": {"fill": False},
                                                        **({"select": {"adaptive": False}} if step == "question" else {})}
                                                 for step in ("block", "question")}))
    with torch.no_grad():
        wrapped.memory.ingest(doc, namespace="doc", progress=False)
        assert wrapped.memory.num_chunks("doc") == 8  # 42 filler chunks are 7 distinct shifts, plus the fact
        q = torch.tensor([enc("what is the secret word of the vault")])
        wrapped.generate(q, max_new_tokens=1, do_sample=False, namespaces=["doc"], pad_token_id=0)
    texts = [t["text"] for t in wrapped.memory.trace("doc")]
    assert sum("vault" in t for t in texts) == 1
    copies = sum("grass" in t for t in texts)
    assert copies == 1 if max_sim is not None else copies >= 2
