"""generate() through transformers' own generate matches a step-by-step forward argmax."""

from __future__ import annotations

import pytest
import torch

import memkit
from memkit.integrations.generate import MemkitCache
from memkit.testing.tiny_models import ARCHITECTURES, one_thread, tiny_model

CFG = dict(window=32, chunk_size=8, block_size=16, top_k=3, sink_tokens=2, progress=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    with one_thread():
        yield


def _ids(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_short_prompt_generate_equals_plain_greedy(arch: str) -> None:
    """Nothing leaves the window: memkit generate == the plain model's greedy generate."""
    model = tiny_model(arch)
    ids = _ids(10, 1)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        out = memkit.wrap(model, **CFG).generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def _manual_greedy(wrapped: memkit.integrations.wrap.MemkitModel, ids: torch.Tensor, mask: torch.Tensor | None,
                   steps: int) -> torch.Tensor:
    """Reference loop: the same memkit steps generate takes (prefill in blocks, the prompt's last chunk, then
    one token at a time)."""
    rt = wrapped.memkit_runtime
    hf = wrapped.hf_model
    B, N = ids.shape
    bs = rt.config.block_size
    seq, m = ids, mask if mask is not None else torch.ones_like(ids)
    cache = {rt.cache_kwarg: MemkitCache(rt)}
    with rt.calling(B, None, mode="generate", prompt_cols=N, prompt_ids=ids), torch.no_grad():
        tail = min(N, rt.config.chunk_size)  # generate reads the prompt's last chunk in one step
        for s in range(0, N - tail, bs):
            e = min(N - tail, s + bs)
            hf(input_ids=ids[:, s:e], attention_mask=m[:, :e], **cache)
        out = hf(input_ids=ids[:, N - tail:], attention_mask=m, **cache)
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            seq = torch.cat([seq, nxt], 1)
            m = torch.cat([m, torch.ones_like(nxt)], 1)
            out = hf(input_ids=nxt, attention_mask=m, **cache)
    return seq


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_long_prompt_generate_equals_stepwise_argmax(arch: str) -> None:
    model = tiny_model(arch)
    ids = _ids(150, 2)
    wrapped = memkit.wrap(model, **CFG)
    with torch.no_grad():
        out = wrapped.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)
    wrapped.memory.reset()
    ref = _manual_greedy(wrapped, ids, None, 40)
    assert torch.equal(out, ref)
    assert wrapped.memory.num_chunks() > 0


def test_batched_left_padded_generate_equals_stepwise_and_solo() -> None:
    model = tiny_model("llama")
    a, b = _ids(130, 3), _ids(98, 4)
    pad = 32  # whole blocks, so row 1 is processed like its solo run
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    wrapped = memkit.wrap(model, **CFG)
    with torch.no_grad():
        out = wrapped.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
        wrapped.memory.reset()
        ref = _manual_greedy(wrapped, ids, mask, 20)
        wrapped.memory.reset()
        solo = wrapped.generate(b, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    assert torch.equal(out[1, pad:], solo[0])


def test_sampling_streamer_and_stopping_work() -> None:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Collect:
        def __init__(self) -> None:
            self.tokens: list[int] = []

        def put(self, value: torch.Tensor) -> None:
            self.tokens.extend(value.reshape(-1).tolist())

        def end(self) -> None:
            self.tokens.append(-1)

    class StopAt(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: object) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 160, dtype=torch.bool)

    wrapped = memkit.wrap(tiny_model("qwen2"), **CFG)
    streamer = Collect()
    torch.manual_seed(0)
    out = wrapped.generate(_ids(150, 5), max_new_tokens=30, do_sample=True, top_k=20, streamer=streamer,
                           stopping_criteria=StoppingCriteriaList([StopAt()]), pad_token_id=0)
    assert out.shape == (1, 160)
    assert streamer.tokens[-1] == -1 and streamer.tokens[-11:-1] == out[0, 150:].tolist()


def test_generate_refuses_beams() -> None:
    wrapped = memkit.wrap(tiny_model("llama"), **CFG)
    with pytest.raises(memkit.MemkitError):
        wrapped.generate(_ids(20, 6), max_new_tokens=3, num_beams=2)
    with pytest.raises(memkit.MemkitError):
        wrapped.generate(_ids(20, 6), max_new_tokens=3, do_sample=True, num_return_sequences=2)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_answer_sees_what_the_question_saw(arch: str) -> None:
    """generate's answer steps keep the window of the prompt's last step for a block's worth of tokens: a token
    the question attended (a needle near the end of the prompt) is never dropped from under the answer. The
    window never exceeds the bound of a prompt step (window + chunk_size - 1 + block_size)."""
    wrapped = memkit.wrap(tiny_model(arch), **CFG)
    rt = wrapped.memkit_runtime
    W, C, bs = CFG["window"], CFG["chunk_size"], CFG["block_size"]
    steps: list[tuple[int, int, int]] = []  # (columns read before the step, step tokens, window tokens)


    def record(module, args, out):  # type: ignore[no-untyped-def]
        call = rt.current_call()
        assert call is not None
        steps.append((call.cols, int(args[0].shape[1]), int(call.stats()["window"][0])))  # args[0]: (1, T, D)

    N = 101
    handle = rt.base.layers[0].register_forward_hook(record)  # inside each step
    try:
        with torch.no_grad():
            wrapped.generate(_ids(N, 5), max_new_tokens=3 * bs, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    last = next(i for i, (c, t, _) in enumerate(steps) if c + t == N)  # the prompt's last step
    q_cols, _, q_win = steps[last]
    assert q_cols - q_win > CFG["sink_tokens"]  # the window has already slid: there is something to lose
    answers = steps[last + 1:]
    assert len(answers) == 3 * bs - 1
    for _, t, win in steps:
        assert win + t <= W + C - 1 + bs
    for cols, t, win in answers:
        start = cols - win  # the first window token
        if cols + t - q_cols <= bs:  # the question's block continues: its window is all kept
            assert start == q_cols - q_win, (cols, win, q_cols, q_win)
        else:
            assert start > q_cols - q_win  # later blocks slide on (each keeps its own start for a block)
