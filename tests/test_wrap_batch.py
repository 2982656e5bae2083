"""Batch rows never see each other's memory: each row equals the same row run alone."""

from __future__ import annotations

import pytest
import torch

import memkit
from memkit.testing.tiny_models import one_thread, tiny_model

CFG = dict(window=32, chunk_size=8, block_size=16, top_k=3, sink_tokens=2, progress=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    with one_thread():
        yield


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_rows_match_their_solo_runs(arch: str) -> None:
    model = tiny_model(arch)
    # Blocks are cut by columns, so a padded row matches its solo run when the padding is whole blocks.
    a, b = _ids(150, 1), _ids(118, 2)
    pad = 150 - 118
    batch = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)], 0)
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    wrapped = memkit.wrap(model, **CFG)
    with torch.no_grad():
        both = wrapped(batch, attention_mask=mask).logits
        counts = {ns: wrapped.memory.num_chunks(ns) for ns in ("row0", "row1")}
        wrapped.memory.reset()
        solo_a = wrapped(a, namespaces=["solo"]).logits
        wrapped.memory.reset()
        solo_b = wrapped(b, namespaces=["solo"]).logits
    torch.testing.assert_close(both[0], solo_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1, pad:], solo_b[0], atol=1e-5, rtol=1e-5)
    assert counts["row0"] > 0 and counts["row1"] > 0 and counts["row0"] != counts["row1"]


def test_namespaces_are_isolated_and_traced() -> None:
    model = tiny_model("llama")
    wrapped = memkit.wrap(model, **CFG)
    with torch.no_grad():
        wrapped(torch.cat([_ids(120, 3), _ids(120, 4)]), namespaces=["alice", "bob"])
    mm = wrapped.memory.manager
    assert mm.num_chunks("alice") == mm.num_chunks("bob") > 0
    ids_a, ids_b = set(mm.chunk_ids("alice").tolist()), set(mm.chunk_ids("bob").tolist())
    assert not ids_a & ids_b
    for entry in wrapped.memory.trace("alice"):
        assert entry["id"] in ids_a
    with pytest.raises(memkit.MemkitError):
        wrapped(_ids(20, 5), namespaces=["x", "y"])  # one namespace per row
