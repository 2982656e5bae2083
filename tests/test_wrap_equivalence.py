"""memkit off or memory empty == the plain model, for every tiny architecture; unwrap restores it exactly."""

from __future__ import annotations

import pytest
import torch

import memkit
from memkit.testing.tiny_models import ARCHITECTURES, one_thread, tiny_model

SMALL = dict(window=64, chunk_size=16, block_size=16, top_k=2, sink_tokens=4, progress=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    with one_thread():
        yield


@pytest.fixture(params=ARCHITECTURES)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


def _ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, n), generator=g)


def test_empty_memory_equals_plain_over_several_blocks(arch: str) -> None:
    """Input shorter than the window but spanning 3 blocks: nothing evicted, logits == plain model."""
    model = tiny_model(arch)
    ids = _ids(48)
    with torch.no_grad():
        ref = model(ids).logits
        wrapped = memkit.wrap(model, **SMALL)
        out = wrapped(ids)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)
    assert wrapped.memory.num_chunks() == 48 // 16  # stored when the call ended (flush_window), never read


def test_single_block_logits_and_loss_equal_plain(arch: str) -> None:
    model = tiny_model(arch)
    ids = _ids(16)
    with torch.no_grad():
        ref = model(ids, labels=ids)
        out = memkit.wrap(model, **SMALL)(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_loss_across_blocks_equals_plain(arch: str) -> None:
    model = tiny_model(arch)
    ids = _ids(60)
    with torch.no_grad():
        ref = model(ids, labels=ids).loss
        out = memkit.wrap(model, **SMALL)(ids, labels=ids)
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    assert out.logits.shape == (1, 60, 256)  # one row per position, as the plain model


def test_left_padded_batch_equals_plain(arch: str) -> None:
    model = tiny_model(arch)
    ids = _ids(40, batch=2, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # row 1 is left-padded
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate() numbers a left-padded row (GPT-2 needs it)
        ref = model(ids, attention_mask=mask, position_ids=pos).logits
        out = memkit.wrap(model, **SMALL)(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 13:], ref[1, 13:], atol=1e-5, rtol=1e-5)


def test_memory_disabled_and_unwrap_are_exact(arch: str) -> None:
    model = tiny_model(arch)
    original = model.config._attn_implementation
    ids = _ids(300)
    with torch.no_grad():
        ref = model(ids).logits
        wrapped = memkit.wrap(model, **SMALL)
        wrapped(ids)  # memory now holds chunks
        assert wrapped.memory.num_chunks() > 0
        with wrapped.memory_disabled():
            assert torch.equal(wrapped(ids).logits, ref)
        plain = memkit.unwrap(wrapped)
        assert plain is model and plain.config._attn_implementation == original
        assert torch.equal(plain(ids).logits, ref)
        assert not any(hasattr(m, "_memkit_runtime") for m in plain.modules())
        assert not plain.base_model._forward_pre_hooks and not plain.base_model._forward_hooks
    with pytest.raises(memkit.MemkitError):
        wrapped(ids)


def test_plain_model_untouched_outside_calls() -> None:
    """While wrapped, calling the HF model directly still gives the plain model's logits."""
    model = tiny_model("llama")
    ids = _ids(200)
    with torch.no_grad():
        ref = model(ids).logits
        memkit.wrap(model, **SMALL)
        assert torch.equal(model(ids).logits, ref)
