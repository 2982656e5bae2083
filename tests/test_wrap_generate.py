"""generate() through transformers' own generate matches a step-by-step forward argmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import memkit
from memkit.integrations.generate import MemkitCache
from memkit.testing.tiny_models import ARCHITECTURES, one_thread, tiny_model

CFG = dict(window=32, chunk_size=8, block_size=16, top_k=3, sink_tokens=2, progress=False,
           retrieval={"question": {"select": {"adaptive": False}}})  # the question step reads top_k: counts are known


def qcfg(**stages: object) -> dict[str, object]:
    """CFG with the question step's stages changed (a stage: its settings, or False = off)."""
    return dict(CFG, retrieval={"question": {"select": {"adaptive": False}, **stages}})


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
        if call.mode == "probe":  # the question step's re-read of its chunks (the reread stage)
            return
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


def _memory_chunks_per_step(wrapped: memkit.integrations.wrap.MemkitModel, ids: torch.Tensor,
                            new_tokens: int) -> tuple[list[tuple[int, int, int]], int]:
    """(columns read before the step, step tokens, chunks attended) for every step of a greedy generate."""
    rt = wrapped.memkit_runtime
    steps: list[tuple[int, int, int]] = []

    def record(module, args, out):  # type: ignore[no-untyped-def]
        call = rt.current_call()
        assert call is not None
        if call.mode == "probe":  # the question step's re-read of its chunks (the reread stage)
            return
        steps.append((call.cols, int(args[0].shape[1]), len(call.mem_ids[0])))

    handle = rt.base.layers[0].register_forward_hook(record)
    try:
        with torch.no_grad():
            wrapped.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    last = next(i for i, (c, t, _) in enumerate(steps) if c + t == ids.shape[1])  # the prompt's last step
    return steps, last


def test_question_select_k_limits_the_question_step_only() -> None:
    """retrieval.question.select.k: the step that reads the question and the answer steps of its block attend at
    most that many chunks; every earlier block of the prompt still attends top_k; forward is unchanged; the legacy
    key question_top_k still sets it (with a FutureWarning)."""
    ids = _ids(121, 8)
    one = qcfg(select={"k": 1}, neighbours={"of_best": 0})
    steps, last = _memory_chunks_per_step(memkit.wrap(tiny_model("llama"), **one), ids, 4)
    assert [n for _, _, n in steps[:last]][-2:] == [3, 3]  # prompt blocks with a full memory: top_k chunks
    assert [n for _, _, n in steps[last:]] == [1] * 4  # the question and 3 answer steps: one chunk
    base, last0 = _memory_chunks_per_step(memkit.wrap(tiny_model("llama"), **CFG), ids, 4)
    assert last0 == last and [n for _, _, n in base[last:]] == [3] * 4
    bigger, _ = _memory_chunks_per_step(memkit.wrap(tiny_model("llama"), **qcfg(select={"k": 10})), ids, 4)
    assert [n for _, _, n in bigger] == [n for _, _, n in base]  # capped at top_k
    with pytest.warns(FutureWarning, match=r"question_top_k -> retrieval\.question\.select\.k"):
        legacy = memkit.wrap(tiny_model("llama"), **dict(CFG, question_top_k=1, question_neighbors=0))
    assert _memory_chunks_per_step(legacy, ids, 4)[0] == steps
    with torch.no_grad():  # forward reads no question: the setting changes nothing there
        a = memkit.wrap(tiny_model("llama"), **CFG)(ids).logits
        b = memkit.wrap(tiny_model("llama"), **one)(ids).logits
    assert torch.equal(a, b)
    for bad in (0, -2, 1.5, "3"):
        with pytest.raises(memkit.ConfigError, match=r"select\.k"):
            memkit.wrap(tiny_model("llama"), **qcfg(select={"k": bad}))


def _question_memory(wrapped: memkit.integrations.wrap.MemkitModel, ids: torch.Tensor) -> dict[str, object]:
    """What the question step (generate's last prompt step) attends as memory: chunk spans, K/V per stored layer."""
    rt = wrapped.memkit_runtime
    got: dict[str, object] = {}

    def record(module, args, out):  # type: ignore[no-untyped-def]
        call = rt.current_call()
        assert call is not None
        if call.mode == "probe":  # the question step's re-read of its chunks (the reread stage)
            return
        if call.cols + int(args[0].shape[1]) == ids.shape[1] and not got:
            got["k"] = {j: t.clone() for j, t in call.mem_k.items()}
            got["v"] = {j: t.clone() for j, t in call.mem_v.items()}
            got["sinks"] = int(call.sink_valid[0].sum())

    handle = rt.base.layers[0].register_forward_hook(record)
    try:
        with torch.no_grad():
            wrapped.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    got["spans"] = [t["span"] for t in wrapped.memory.trace()]
    return got


def _assert_plain_reading(arch: str, got: dict[str, object], toks: torch.Tensor, S: int) -> None:
    """got's memory K/V (question step) == the plain model's K/V of toks[:, S:] when it reads toks (1, S + M),
    keys rotated at S..S+M-1 as the plain model's are."""
    plain = tiny_model(arch)
    with torch.no_grad():
        cache = plain(toks, use_cache=True).past_key_values
    rt = memkit.wrap(tiny_model(arch), **CFG).memkit_runtime
    rot, layers = rt.rotary, rt.style.memory_layers  # stored index j holds the K/V of model layer layers[j]
    M = toks.shape[1] - S
    pos = torch.arange(S, S + M)[None]
    for j in got["k"]:  # type: ignore[attr-defined]
        layer = cache.layers[layers[j]]
        got_k = rot.rotate(layers[j], got["k"][j][:, :, :M], pos)  # type: ignore[index]
        torch.testing.assert_close(got_k, layer.keys[:, :, S:], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["v"][j][:, :, :M], layer.values[:, :, S:], rtol=1e-4, atol=1e-5)  # type: ignore[index]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_question_reread_reads_chunks_as_the_plain_model_reads_them(arch: str) -> None:
    """The reread stage: at the question step the retrieved chunks' K/V are those of the plain model reading
    [sinks | chunks] as one short prompt (positions 0..N-1), not the K/V stored while their block attended its own
    window and memory; off, the stored K/V are attended (and differ in layers past the first)."""
    ids = _ids(121, 9)
    on = _question_memory(memkit.wrap(tiny_model(arch), **CFG), ids)
    off = _question_memory(memkit.wrap(tiny_model(arch), **qcfg(reread=False)), ids)
    spans, S = on["spans"], on["sinks"]
    assert spans == off["spans"] and len(spans) == CFG["top_k"] and S == CFG["sink_tokens"]
    toks = torch.cat([ids[0, :S]] + [ids[0, a:b] for a, b in spans])[None]  # (1, S + M)
    _assert_plain_reading(arch, on, toks, S)
    M = toks.shape[1] - S
    deep = len(on["k"]) - 1
    assert not torch.allclose(off["v"][deep][:, :, :M], on["v"][deep][:, :, :M], atol=1e-3)  # stored K/V differ


def _question_step_view(wrapped: memkit.integrations.wrap.MemkitModel, ids: torch.Tensor, k: int | None = CFG["top_k"]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(memkit's logits (V,) for the first answer token, the short prompt (1, n) of what its question step attended:
    [sinks | chunks | window | the step's own tokens])."""
    rt = wrapped.memkit_runtime
    seen: dict[str, object] = {}

    def record(module, args, out):  # type: ignore[no-untyped-def]
        call = rt.current_call()
        assert call is not None
        T = int(args[0].shape[1])
        if call.mode != "probe" and call.cols + T == ids.shape[1] and not seen:
            seen.update(S=int(call.sink_valid[0].sum()), T=T, window=call.win_ids[0][call.win_valid[0]].clone())

    handle = rt.base.layers[0].register_forward_hook(record)
    try:
        with torch.no_grad():
            out = wrapped.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0, output_logits=True,
                                   return_dict_in_generate=True)
    finally:
        handle.remove()
    spans = [t["span"] for t in wrapped.memory.trace()]
    S, T, window = seen["S"], seen["T"], seen["window"]
    assert (k is None or len(spans) == k) and S == CFG["sink_tokens"] and len(window) > 0  # type: ignore[arg-type]
    assert torch.equal(window, ids[0, ids.shape[1] - T - len(window):ids.shape[1] - T])  # type: ignore[arg-type, operator]
    short = torch.cat([ids[0, :S]] + [ids[0, a:b] for a, b in spans] + [window, ids[0, -T:]])[None]  # type: ignore[misc]
    return out.logits[0][0], short


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_question_step_reads_sinks_chunks_and_window_as_the_plain_model_reads_them(arch: str) -> None:
    """The reread stage: the question step attends the K/V of [sinks | chunks | window] read afresh, so its next-token
    logits are the plain model's on that short prompt followed by the step's own tokens. Re-reading the chunks
    alone is not enough: the window's stored K/V come from its own reading (a KJV passkey at 16k was missed with
    the needle's chunks read afresh and answered by the plain model from the same sinks, chunks and window)."""
    ids = _ids(121, 9)
    got, short = _question_step_view(memkit.wrap(tiny_model(arch), **CFG), ids)
    with torch.no_grad():
        ref = tiny_model(arch)(short).logits[0, -1]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    off, short_off = _question_step_view(memkit.wrap(tiny_model(arch), **qcfg(reread=False)), ids)
    assert torch.equal(short_off, short)  # the same chunks and window ...
    assert not torch.allclose(off, ref, atol=1e-3)  # ... read from the stored K/V differ


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_question_reading_only_its_recent_tokens_is_the_plain_model_on_that_shorter_prompt(arch: str) -> None:
    """``reread: {recent: R}``: a lookup's question step (its selection read a head) and the answer steps of its block
    attend the chunks and only the last R tokens of [window | the step's own tokens]; the window's older tokens are
    hidden, not dropped (the next block and memory still have them). Logits and greedy answers are the plain model's
    on [sinks | chunks | last R]. R = 34 keeps what the step reads within a sliding-window layer's reach (24 tokens in
    the tiny Gemma-3; those layers attend no memory) inside the recent tokens, as the whole window does. A question
    that reads its whole budget reads its whole window (the other tests here: ``select.adaptive`` off, k = top_k)."""
    R, new = 34, 4
    ids = _ids(121, 9)
    cfg = qcfg(select={"min_gap": 0.0}, reread={"recent": R})  # a lookup: the selection reads a head
    wrapped = memkit.wrap(tiny_model(arch), **cfg)
    got, short = _question_step_view(wrapped, ids, k=None)
    assert "head" in [t["why"] for t in wrapped.memory.trace()]
    S, M = CFG["sink_tokens"], sum(b - a for a, b in (t["span"] for t in wrapped.memory.trace()))
    assert short.shape[1] - S - M > R  # the window and step hold more than R tokens: some are hidden
    recent = torch.cat([short[0, :S + M], short[0, -R:]])[None]  # (1, S + M + R)
    plain = tiny_model(arch)
    with torch.no_grad():
        torch.testing.assert_close(got, plain(recent).logits[0, -1], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got, plain(short).logits[0, -1], atol=1e-3)  # the whole window reads otherwise
        fresh = memkit.wrap(tiny_model(arch), **cfg)  # memory as the first call found it
        answer = fresh.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
        ref = plain.generate(recent, max_new_tokens=new, do_sample=False, pad_token_id=0)[0, recent.shape[1]:]
    assert torch.equal(answer, ref)
    assert fresh.memory.stats()["tokens"] == ids.shape[1] + new - 1  # every token read, hidden ones too, is stored


def test_question_step_reads_its_best_chunk_last_when_asked_as_the_plain_model_reads_that_order() -> None:
    """``reread: {order: best_last}``: the chunks are read (and attended) in another order than time's, and the step's
    logits are still the plain model's on [sinks | chunks in that order | window | the step's tokens]."""
    import itertools

    ids = _ids(121, 9)
    got, short = _question_step_view(memkit.wrap(tiny_model("llama"), **qcfg(reread={"order": "best_last"})), ids)
    S, M = CFG["sink_tokens"], 3 * CFG["chunk_size"]  # three whole chunks (top_k = 3)
    pieces = [short[0, S + i * 8:S + (i + 1) * 8] for i in range(3)]  # in time order (the trace's)
    matches = []
    for perm in itertools.permutations(range(3)):
        prompt = torch.cat([short[0, :S], *[pieces[i] for i in perm], short[0, S + M:]])[None]
        with torch.no_grad():
            if torch.allclose(got, tiny_model("llama")(prompt).logits[0, -1], rtol=1e-4, atol=1e-4):
                matches.append(perm)
    assert len(matches) == 1  # exactly one reading order explains the logits


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_question_reread_reads_chunks_of_an_earlier_call_from_their_token_ids(arch: str) -> None:
    """Ingest a document, then ask in a new call: the question's chunks were stored by the earlier call, and memory
    keeps their token ids, so they are read afresh as [the stream's first sink tokens | chunks], exactly as the
    plain model reads that short prompt; off (or stored without token ids) the stored K/V are attended."""
    doc, q = _ids(120, 10), _ids(12, 11)
    got = {}
    for reread in (True, False):
        wrapped = memkit.wrap(tiny_model(arch), **qcfg(reread=reread))
        wrapped.memory.ingest(doc)
        got[reread] = _question_memory(wrapped, q)
    spans = got[True]["spans"]
    assert spans == got[False]["spans"] and len(spans) == CFG["top_k"]
    S = min(CFG["sink_tokens"], spans[0][0])
    toks = torch.cat([doc[0, :S]] + [doc[0, a:b] for a, b in spans])[None]  # (1, S + M)
    _assert_plain_reading(arch, got[True], toks, S)
    deep = len(got[True]["k"]) - 1
    M = toks.shape[1] - S
    assert not torch.allclose(got[False]["v"][deep][:, :, :M], got[True]["v"][deep][:, :, :M], atol=1e-3)


def test_question_reread_keeps_stored_kv_of_chunks_without_token_ids() -> None:
    """Chunks added without token ids (add_chunks from a caller, or a memory saved before memkit kept them) cannot
    be read afresh: they are attended as stored, so the answer equals the one with the reread stage off."""
    donor = memkit.wrap(tiny_model("llama"), **CFG)
    donor.memory.ingest(_ids(120, 10))
    mem = donor.memkit_runtime.memory  # the MemoryManager behind wrapped.memory
    got = mem.retrieve(np.zeros(mem.embed_dim, np.float32), k=mem.num_chunks(), max_similarity=None)
    assert len(got) == mem.num_chunks() and all(t is not None for t in got.token_ids)  # ingest keeps them
    embs = np.random.default_rng(0).standard_normal((len(got), mem.embed_dim)).astype(np.float32)
    outs = []
    for reread in (True, False):
        wrapped = memkit.wrap(tiny_model("llama"), **qcfg(reread=reread))
        mgr = wrapped.memkit_runtime.memory
        mgr.add_chunks(got.keys, got.values, embs, got.spans)  # no token_ids
        assert all(t is None for t in mgr.retrieve(embs[0], k=3).token_ids)
        with torch.no_grad():
            outs.append(wrapped.generate(_ids(12, 11), max_new_tokens=4, do_sample=False, pad_token_id=0))
        assert len(wrapped.memory.trace()) > 0
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_question_lexical_retrieves_the_chunk_sharing_the_question_rare_tokens(arch: str) -> None:
    """The fusion stage's lexical ranking: the question step fuses a BM25 ranking of the question's token ids over memory's chunks;
    the one chunk holding the question's rare tokens (a name, a key) leads it and is read, where the embeddings of
    this random-weight model do not rank it first."""
    g = torch.Generator().manual_seed(2)
    doc = torch.randint(3, 13, (1, 160), generator=g)  # a filler of 10 common tokens
    doc[0, 61:65] = torch.tensor([250, 251, 252, 253])  # the needle: 3 rare tokens in chunk [56, 64), 1 in [64, 72)
    question = torch.cat([torch.randint(3, 13, (1, 10), generator=g), torch.tensor([[250, 251, 252, 253]])], 1)
    ids = torch.cat([doc, question], 1)
    read = {}
    for lexical in (16, 0):
        wrapped = memkit.wrap(tiny_model(arch), **qcfg(select={"k": 1}, neighbours={"of_best": 0},
                                                           fusion={"lexical_tokens": lexical}))
        with torch.no_grad():
            wrapped.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        read[lexical] = [tuple(t["span"]) for t in wrapped.memory.trace()]
    assert read[16] == [(56, 64)]
    assert read[0] != read[16]  # the embeddings alone pick another chunk
    for bad in (-1, 1.5, True):
        with pytest.raises(memkit.ConfigError, match=r"fusion\.lexical_tokens"):
            memkit.wrap(tiny_model(arch), **qcfg(fusion={"lexical_tokens": bad}))


def test_keys_retriever_queries_with_the_question(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The keys retriever (no tokenizer) at generate's question step queries with the question's own tokens, read
    afresh (Runtime.probe_queries): over the same loaded memory, each question retrieves by its own queries. It used
    to query with the in-context queries of this call's tokens before the question step, so a question read in one
    step (a prompt of at most chunk_size tokens, as after ingest or load) retrieved nothing: `memkit eval qa` with
    `retriever: keys` found none of 20 inserted facts."""
    donor = memkit.wrap(tiny_model("llama"), **CFG)
    donor.memory.ingest(_ids(120, 10))
    donor.memory.save(tmp_path / "m")
    cfg = qcfg(select={"k": 1}, neighbours={"of_best": 0}, fusion={"lexical_tokens": 0})  # embedding queries alone
    read = set()
    for seed in range(11, 17):
        wrapped = memkit.wrap(tiny_model("llama"), **cfg)
        assert wrapped.memkit_runtime.memory.config.retriever in ("auto", "keys")
        wrapped.memory.load(tmp_path / "m")
        with torch.no_grad():
            wrapped.generate(_ids(CFG["chunk_size"], seed), max_new_tokens=2, do_sample=False, pad_token_id=0)
        spans = [tuple(t["span"]) for t in wrapped.memory.trace()]
        assert len(spans) == 1 and spans[0][1] <= 120
        read.add(spans[0])
    assert len(read) > 1  # the question chose the chunk
