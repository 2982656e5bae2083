"""Real-model checks on the bundled SmolLM2-135M-Instruct (slow: about two minutes on an idle 2-core CPU).

* the plain model finds a passkey in 4k tokens (full attention, inside its 8k positions) — the prompt
  format the passkey evaluation uses is one the model can answer;
* wrapped by memkit with the default config, it finds a passkey in 16k tokens (twice its positions),
  and the chunk holding the key is among those retrieved.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    import torch

    from memkit.models import load_smollm2

    previous = torch.is_grad_enabled()
    torch.set_grad_enabled(False)  # inference only; restored so later test modules can train
    yield load_smollm2()
    torch.set_grad_enabled(previous)


def test_plain_model_answers_passkey_at_4k(smollm2):
    from memkit.evaluation.haystack import build_haystack
    from memkit.evaluation.passkey import answer

    model, tok = smollm2
    hay = build_haystack(tok, 4096, 0.5, seed=1)
    assert abs(len(hay) - 4096) <= 1
    rec = answer(model, tok, hay)
    assert rec["correct"], rec


def test_memkit_answers_passkey_at_16k(smollm2):
    import memkit
    from memkit.evaluation.haystack import build_haystack
    from memkit.evaluation.passkey import answer

    model, tok = smollm2
    hay = build_haystack(tok, 16 * 1024, 0.3, seed=2)
    wrapped = memkit.wrap(model, tokenizer=tok, progress=False)
    try:
        rec = answer(wrapped, tok, hay)
    finally:
        memkit.unwrap(wrapped)
    assert rec["needle_retrieved"], rec
    assert rec["correct"], rec
