"""Per-token losses behind ``memkit eval ppl --ranges``: one read scores several ranges exactly; its --text is read safely.

Checked on a tiny random Llama: range means from per-token losses equal the streaming ``.loss`` of the
same range, a longer read leaves earlier tokens' losses unchanged (causality), and the full-attention
per-token losses equal the plain model's cross-entropy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import memkit
from memkit.errors import InvalidInputError
from memkit.evaluation.common import read_text_file
from memkit.evaluation.ppl import full_attention_token_losses, parse_ranges, range_loss, token_losses
from memkit.testing.tiny_models import one_thread, tiny_model

SMALL = dict(window=64, chunk_size=16, block_size=32, top_k=2, sink_tokens=4, retriever="keys", progress=False)


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    with one_thread():
        yield tiny_model("llama")


def _ids(n: int) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(1))


def test_range_means_equal_the_streaming_loss_and_ignore_later_tokens(model) -> None:  # type: ignore[no-untyped-def]
    ids = _ids(400)
    with torch.no_grad():
        wrapped = memkit.wrap(model, **SMALL)
        try:
            long = token_losses(wrapped, ids, progress=False)  # read 400 tokens
            short = token_losses(wrapped, ids[:, :200], progress=False)  # read 200
            ref = range_loss(wrapped, ids[:, :200], 100, progress=False)
        finally:
            memkit.unwrap(wrapped)
    assert long.shape == (400,) and torch.isnan(long[0]) and not torch.isnan(long[1:]).any()
    torch.testing.assert_close(long[:200], short, atol=1e-5, rtol=1e-5, equal_nan=True)  # later tokens: no effect
    assert float(long[100:200].mean()) == pytest.approx(ref, abs=1e-5)


def test_full_attention_token_losses_equal_the_plain_model(model) -> None:  # type: ignore[no-untyped-def]
    ids = _ids(300)
    with torch.no_grad():
        got = full_attention_token_losses(model, ids, block=64, progress=False)
        logits = model(ids).logits[0, :-1].float()
    ref = F.cross_entropy(logits, ids[0, 1:], reduction="none")
    torch.testing.assert_close(got[1:], ref, atol=1e-4, rtol=1e-4)


def test_parse_ranges() -> None:
    assert parse_ranges("4k-8k, 16k-20k") == [(4096, 8192), (16384, 20480)]
    assert parse_ranges("0-100") == [(0, 100)]
    for bad in ("4k", "8k-4k", "", "a-b"):
        with pytest.raises(InvalidInputError):
            parse_ranges(bad)


@pytest.mark.skipif(not Path("/proc/self/mem").is_file(), reason="needs Linux /proc (a file that cannot be read)")
def test_an_unreadable_or_empty_text_file_is_a_memkit_error(tmp_path: Path) -> None:
    """`eval ppl`, `eval styles` and `train` read a user's --text through read_text_file: a file that exists
    but cannot be read (here /proc/self/mem, whose read fails with EIO even for root) or is empty names itself."""
    with pytest.raises(InvalidInputError, match="cannot be read"):
        read_text_file(Path("/proc/self/mem"), "text file")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    with pytest.raises(InvalidInputError, match="is empty"):
        read_text_file(empty, "text file")
    fine = tmp_path / "t.txt"
    fine.write_bytes(b"caf\xe9 ok")  # undecodable byte replaced, not an error
    assert read_text_file(fine, "text file") == "caf\ufffd ok"
