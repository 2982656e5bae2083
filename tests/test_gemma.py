"""Gemma 3 (sliding-window layers interleaved with global layers): memkit's window meets a layer's own window.

What memkit's window means for a layer that has its own (documented in docs/configuration.md): memkit decides
what a block *may* see (sinks, retrieved chunks, its window, the block); a sliding-window layer then applies its
own window on memkit's positions, exactly as the plain model applies it on true positions. So a sliding layer
sees only the last ``sliding_window`` tokens before each query (never sinks or memory: they sit further back),
and memory is stored and read only by global layers (``memory_layers: all`` means all global layers).

Tiny random Gemma 3 models check the rule exactly; the real Gemma-3-270m (bundled, 18 layers, window 512, 32k
positions) checks that memory off equals the plain model and that a passkey beyond its window is found.
"""

from __future__ import annotations

import pytest
import torch

import memkit
from memkit.testing.tiny_models import one_thread, tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    with one_thread():
        yield


def _ids(n: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_sliding_layers_keep_their_own_window_inside_memkits() -> None:
    """Input longer than the layers' sliding window (24) but inside memkit's window (64): equals the plain model,
    so the sliding layers saw exactly their own 24 tokens and the global layers everything."""
    model = tiny_model("gemma3")
    assert model.config.sliding_window == 24
    ids = _ids(60, 1)
    with torch.no_grad():
        ref = model(ids).logits
        out = memkit.wrap(model, window=64, chunk_size=16, block_size=16, sink_tokens=4, top_k=2,
                          progress=False)(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_memory_lives_in_global_layers_and_sliding_layers_never_see_it() -> None:
    wrapped = memkit.wrap(tiny_model("gemma3", layers=6), window=32, chunk_size=8, block_size=16, sink_tokens=2,
                          top_k=3, progress=False)
    stats = wrapped.memory.stats()
    assert stats["memory_layers"] == [1, 3, 5] and stats["retrieval_layers"] == [1, 3, 5]
    rt = wrapped.memkit_runtime
    seen: dict[int, int] = {}
    orig = rt.attend_context

    def spy(call, module, query, key, value, memory=None, **kw):  # type: ignore[no-untyped-def]
        seen[module.layer_idx] = seen.get(module.layer_idx, 0) + (memory is not None)
        return orig(call, module, query, key, value, memory, **kw)

    rt.attend_context = spy  # type: ignore[method-assign]
    with torch.no_grad():
        wrapped(_ids(160, 2))
    assert all(seen[i] == 0 for i in (0, 2, 4)) and all(seen[i] > 0 for i in (1, 3, 5))


@pytest.mark.slow
def test_real_gemma3_memory_off_equals_plain_and_finds_a_passkey() -> None:
    from memkit.evaluation.haystack import build_haystack
    from memkit.evaluation.passkey import answer
    from memkit.models import load_gemma3

    model, tok = load_gemma3()
    ids = _ids(500, 3, vocab=200_000)  # two blocks, inside memkit's window and the layers' own 512
    with torch.no_grad():
        ref = model(ids).logits
        wrapped = memkit.wrap(model, tokenizer=tok, progress=False)
        out = wrapped(ids).logits
    assert float((out - ref).abs().max()) <= 1e-3 * float(ref.abs().max())
    hay = build_haystack(tok, 4096, 0.3, seed=4)
    rec = answer(wrapped, tok, hay)
    memkit.unwrap(wrapped)
    assert rec["needle_retrieved"] and rec["correct"], rec
