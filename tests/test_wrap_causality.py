"""Strict causality with memory active: changing token j never changes a prediction before j."""

from __future__ import annotations

import pytest
import torch

import memkit
from memkit.testing.tiny_models import ARCHITECTURES, one_thread, tiny_model

CFG = dict(window=32, chunk_size=8, block_size=16, top_k=3, sink_tokens=2, progress=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    with one_thread():
        yield


def _run(model: torch.nn.Module, ids: torch.Tensor, **cfg: object) -> torch.Tensor:
    wrapped = memkit.wrap(model, **{**CFG, **cfg})
    try:
        with torch.no_grad():
            return wrapped(ids).logits
    finally:
        memkit.unwrap(wrapped)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_future_token_never_changes_earlier_predictions(arch: str) -> None:
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 256, (1, 160), generator=g)  # 10 blocks, memory retrieved from block 4 on
    base = _run(model, ids)
    for j in (20, 71, 100, 150):  # mid-block, block starts / ends, late
        changed = ids.clone()
        changed[0, j] = (changed[0, j] + 101) % 253 + 3
        out = _run(model, changed)
        torch.testing.assert_close(out[:, :j], base[:, :j], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[:, j:], base[:, j:], atol=1e-4)  # the change does reach later positions


@pytest.mark.parametrize("scheme", ["contiguous", "zero", "original"])
def test_causality_for_every_position_scheme(scheme: str) -> None:
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 256, (1, 128), generator=g)
    base = _run(model, ids, position_scheme=scheme)
    changed = ids.clone()
    changed[0, 90] = 7 if ids[0, 90] != 7 else 8
    out = _run(model, changed, position_scheme=scheme)
    torch.testing.assert_close(out[:, :90], base[:, :90], atol=1e-5, rtol=1e-5)


def test_memory_changes_predictions_and_is_used() -> None:
    """With memory on, retrieval happens and the logits differ from window-only (memory is really attended)."""
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 160), generator=torch.Generator().manual_seed(5))
    with_mem = _run(model, ids)
    window_only = _run(model, ids, top_k=0)
    # Before anything was evicted both are identical; afterwards memory changes the result.
    torch.testing.assert_close(with_mem[:, :48], window_only[:, :48], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_mem[:, 64:], window_only[:, 64:], atol=1e-3)
