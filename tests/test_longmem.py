"""LongMem style (Wang et al. 2023): equivalence with the plain model, causality, row isolation, retrieval, gate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import memkit
from memkit.testing.tiny_models import ARCHITECTURES, one_thread, tiny_model

CFG: dict = dict(style="longmem", window=32, chunk_size=8, block_size=16, sink_tokens=2,
                 longmem={"chunk": 4, "tokens": 8}, progress=False, flush_window=False)
BLOCK_KEYS = {"sidenet": "sidenet", "longmem_positions": "positions", "longmem_layer": "layer", "gate_init": "gate_init"}


def _cfg(**kw: object) -> dict:
    """CFG with overrides; LongMem settings go into the style's block."""
    out = dict(CFG, longmem=dict(CFG["longmem"]))
    for k, v in kw.items():
        if k in BLOCK_KEYS:
            out["longmem"][BLOCK_KEYS[k]] = v
        else:
            out[k] = v
    if out["style"] != "longmem":
        out.pop("longmem")
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    with one_thread():
        yield


def _ids(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def _open_gate(wrapped: memkit.integrations.wrap.MemkitModel, logit: float = 4.0) -> None:
    with torch.no_grad():
        wrapped.memkit_modules["gate"].logits.fill_(logit)


def _run(model: torch.nn.Module, ids: torch.Tensor, gate: float | None = 4.0, **cfg: object) -> torch.Tensor:
    wrapped = memkit.wrap(model, **_cfg(**cfg))
    if gate is not None:
        _open_gate(wrapped, gate)
    try:
        with torch.no_grad():
            return wrapped(ids).logits
    finally:
        memkit.unwrap(wrapped)


@pytest.mark.parametrize("sidenet", [False, True])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_empty_memory_equals_plain(arch: str, sidenet: bool) -> None:
    """Nothing leaves the window (3 blocks): logits and loss equal the plain model's, SideNet on or off."""
    model = tiny_model(arch)
    ids = _ids(30)
    with torch.no_grad():
        ref = model(ids, labels=ids)
        wrapped = memkit.wrap(model, **_cfg(sidenet=sidenet))
        _open_gate(wrapped, 10.0)  # even a wide-open gate: no memory, no change
        out = wrapped(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    assert wrapped.memory.num_chunks() == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_memory_off_equals_window_only_memlong(arch: str) -> None:
    """top_k=0 turns LongMem memory off: identical to the MemLong path's window-only run."""
    model = tiny_model(arch)
    ids = _ids(100, 1)
    off = _run(model, ids, top_k=0)
    window = _run(model, ids, gate=None, style="memlong", top_k=0)
    torch.testing.assert_close(off, window, atol=1e-5, rtol=1e-5)


def test_initial_gate_is_nearly_window_only_and_open_gate_uses_memory() -> None:
    model = tiny_model("llama")
    ids = _ids(120, 2)
    window = _run(model, ids, top_k=0)
    init = _run(model, ids, gate=None)  # gate_init=-8: sigmoid = 3.4e-4
    opened = _run(model, ids, gate=4.0)
    torch.testing.assert_close(init[:, :40], window[:, :40], atol=1e-5, rtol=1e-5)  # before any eviction
    assert (init - window).abs().max() < 2e-2
    assert (opened[:, 64:] - window[:, 64:]).abs().max() > 0.1  # memory is really attended


@pytest.mark.parametrize("layers", [4, 5])
def test_untrained_sidenet_equals_window_only_and_its_memory_layer_copies_the_memory_layer(layers: int) -> None:
    """Residual scales at 0: the untrained SideNet reproduces the backbone bit for bit even with memory full and
    the gate wide open; the side layer that attends memory is a copy of the backbone layer memory comes from."""
    model = tiny_model("llama", layers=layers)
    ids = _ids(120, 3)
    window = _run(model, ids, top_k=0)
    wrapped = memkit.wrap(model, **_cfg(sidenet=True))
    rt = wrapped.memkit_runtime
    style = rt.style
    side = style.sidenet
    assert style.aug_layer >= rt.L and len(side.layers) == layers // 2
    assert side.sources[style.aug_layer - rt.L] == style.mem_layer
    assert all(b - a == 2 for a, b in zip(side.sources, side.sources[1:]))  # every second backbone layer
    _open_gate(wrapped, 10.0)
    with torch.no_grad():
        out = wrapped(ids).logits
    assert wrapped.memory.num_chunks() > 0
    memkit.unwrap(wrapped)
    torch.testing.assert_close(out, window, atol=0, rtol=0)


@pytest.mark.parametrize(("arch", "sidenet", "positions", "scheme"), [
    ("llama", False, "none", "contiguous"), ("llama", True, "none", "contiguous"),
    ("llama", False, "scheme", "contiguous"), ("qwen2", False, "scheme", "zero"),
    ("mistral", False, "scheme", "original"), ("gemma3", True, "none", "contiguous"),
    ("gpt2", True, "none", "contiguous"),
])
def test_future_token_never_changes_earlier_predictions(arch: str, sidenet: bool, positions: str, scheme: str) -> None:
    model = tiny_model(arch)
    ids = _ids(128, 3)
    cfg = dict(sidenet=sidenet, longmem_positions=positions, position_scheme=scheme)
    base = _run(model, ids, **cfg)
    for j in (45, 100):
        changed = ids.clone()
        changed[0, j] = (changed[0, j] + 101) % 253 + 3
        out = _run(model, changed, **cfg)
        torch.testing.assert_close(out[:, :j], base[:, :j], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[:, j:], base[:, j:], atol=1e-4)


@pytest.mark.parametrize("sidenet", [False, True])
def test_batch_rows_match_their_solo_runs(sidenet: bool) -> None:
    model = tiny_model("llama")
    a, b = _ids(112, 4), _ids(96, 5)
    pad = 112 - 96
    batch = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)], 0)
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    wrapped = memkit.wrap(model, **_cfg(sidenet=sidenet))
    _open_gate(wrapped)
    with torch.no_grad():
        both = wrapped(batch, attention_mask=mask).logits
        counts = [wrapped.memory.num_chunks(n) for n in ("row0", "row1")]
        wrapped.memory.reset()
        solo_a = wrapped(a, namespaces=["solo"]).logits
        wrapped.memory.reset()
        solo_b = wrapped(b, namespaces=["solo"]).logits
    torch.testing.assert_close(both[0], solo_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1, pad:], solo_b[0], atol=1e-5, rtol=1e-5)
    assert counts[0] > counts[1] > 0


def test_token_to_chunk_retrieval_is_exact_per_head() -> None:
    """One bank search over (tokens x heads) gives each head's exact top chunks by q_h . mean-key_h."""
    model = tiny_model("llama")
    wrapped = memkit.wrap(model, **CFG)
    with torch.no_grad():
        wrapped(_ids(100, 6))
    mm = wrapped.memory.manager
    ids = mm.chunk_ids("default")
    pages = mm.store.get(ids, "cpu")[:, 0]  # (n, 2, H, c, D)
    kbar = pages[:, 0].mean(2)  # (n, H, D)
    H, D = kbar.shape[1], kbar.shape[2]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, H, D, generator=g)
    queries = torch.zeros(5 * H, H, D)
    for h in range(H):
        queries[torch.arange(5) * H + h, h] = q[:, h]
    got, slot, pg, _ = mm.search_many(queries.reshape(5 * H, H * D).numpy(), "default", 3, device=torch.device("cpu"),
                                      dtype=torch.float32)
    pg = pg[:, 0]  # (u, 2, H, c, D): the one stored layer
    for i in range(5):
        for h in range(H):
            scores = kbar[:, h] @ q[i, h]  # (n,)
            want = np.sort(ids[torch.topk(scores, 3).indices].numpy())
            assert got[i * H + h].tolist() == want.tolist()
            assert torch.equal(pg[slot[i * H + h], 0, h], pages[[list(ids.tolist()).index(c) for c in want], 0, h])
    assert wrapped.memory.trace() and all("hits" in t for t in wrapped.memory.trace())


def test_memory_save_load_and_generate() -> None:
    model = tiny_model("llama")
    ids = _ids(100, 7)
    wrapped = memkit.wrap(model, **CFG)
    _open_gate(wrapped)
    with torch.no_grad():
        wrapped.memory.ingest(ids)
        q = _ids(12, 8)
        before = wrapped(q, namespaces=["default"]).logits
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        wrapped.memory.save(d)
        n = wrapped.memory.num_chunks()
        wrapped.memory.reset()
        wrapped.memory.load(d)
        assert wrapped.memory.num_chunks() == n
    with torch.no_grad():
        after = wrapped(q).logits
        out = wrapped.generate(q, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)
    assert out.shape == (1, 18) and torch.equal(out[:, :12], q)
    assert wrapped.memory.stats()["chunks"] == n


def test_bad_configs_raise_memkit_errors() -> None:
    model = tiny_model("llama")
    for bad in (dict(chunk_size=6), dict(longmem_layer=9), dict(bank={"backend": "faiss-flat", "metric": "cosine"}),
                dict(longmem_positions="rope")):
        with pytest.raises(memkit.MemkitError):
            memkit.wrap(model, **_cfg(**bad))
    assert not any(hasattr(m, "_memkit_runtime") for m in model.modules())
