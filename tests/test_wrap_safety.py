"""A wrapped model never answers silently wrong: threads, saves of another model, memory across calls, bad input.

* Concurrent calls on one model run one after another: every result equals the single-thread result.
* A memory save records the model and set-up it belongs to; loading it into another model is refused.
* Memory persists across calls by design: what a call read is stored when it ends (``flush_window``), a chunk of
  tokens already stored is not stored again, and a chat turn of any length is remembered.
* Every bad input to the public API ends in a MemkitError (hypothesis feeds random wrong types and values).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memkit
from memkit.testing.tiny_models import one_thread, tiny_model

CFG = dict(window=32, chunk_size=8, block_size=16, top_k=3, sink_tokens=2, progress=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    with one_thread():
        yield


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- threads
def test_concurrent_calls_equal_the_single_thread_results() -> None:
    """4 threads x 3 calls (generate and forward) on one model, each call in its own namespace."""
    wrapped = memkit.wrap(tiny_model("llama"), **CFG)
    jobs = [(t, c) for t in range(4) for c in range(3)]

    def run(t: int, c: int) -> torch.Tensor:
        ns = [f"t{t}c{c}"]
        ids = _ids(90 + 7 * c, 100 * t + c)
        if c % 2:
            return wrapped(ids, namespaces=ns, logits_to_keep=1).logits
        return wrapped.generate(ids, max_new_tokens=6, do_sample=False, namespaces=ns, pad_token_id=0)

    expected = {job: run(*job) for job in jobs}
    wrapped.memory.reset()
    got: dict[tuple[int, int], Any] = {}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        for c in range(3):
            try:
                got[(t, c)] = run(t, c)
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for job in jobs:
        torch.testing.assert_close(got[job], expected[job], rtol=0, atol=0)
    assert wrapped.memory.stats()["namespaces"] == len(jobs)


def test_a_thread_using_the_plain_model_never_sees_another_threads_step() -> None:
    """While one thread is inside a memkit call, another thread calling the HF model directly gets plain attention."""
    model = tiny_model("llama")
    ids = _ids(40, 7)
    with torch.no_grad():
        ref = model(ids).logits
    wrapped = memkit.wrap(model, **CFG)
    plain: list[torch.Tensor] = []
    started = threading.Event()

    class Slow:  # a streamer that lets the other thread run while this call is inside generate
        def put(self, value: torch.Tensor) -> None:
            started.set()
            threading.Event().wait(0.05)

        def end(self) -> None:
            pass

    def other() -> None:
        started.wait(10)
        with torch.no_grad():
            plain.append(model(ids).logits)

    th = threading.Thread(target=other)
    th.start()
    wrapped.generate(_ids(60, 8), max_new_tokens=8, do_sample=False, streamer=Slow(), pad_token_id=0)
    th.join()
    torch.testing.assert_close(plain[0], ref, atol=1e-5, rtol=1e-5)


def test_memory_disabled_applies_to_the_calling_thread_only() -> None:
    """Thread A sits inside ``memory_disabled()`` while thread B reads a document, asks with ``forward`` and with
    ``generate(..., flush_window=False)``: B's answers, and what B stored, equal a run without A; A's own calls are
    the plain model's, ``flush_window`` included."""
    model = tiny_model("llama")
    wrapped = memkit.wrap(model, **CFG)
    doc, question = _ids(120, 40), _ids(40, 41)

    def b_work() -> tuple[torch.Tensor, torch.Tensor, int]:
        wrapped.memory.ingest(doc, namespace="b")
        logits = wrapped(question, namespaces=["b"], logits_to_keep=4).logits
        answer = wrapped.generate(question, max_new_tokens=6, do_sample=False, namespaces=["b"], pad_token_id=0,
                                  flush_window=False)
        return logits, answer, wrapped.memory.num_chunks("b")

    expected = b_work()
    wrapped.memory.reset()
    with torch.no_grad():
        plain_logits = model(question).logits[:, -4:]
        plain_answer = model.generate(question, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.allclose(expected[0], plain_logits, atol=1e-3)  # memory changes B's answer

    inside, b_done = threading.Event(), threading.Event()
    a_got: dict[str, Any] = {}
    errors: list[BaseException] = []

    def a_thread() -> None:
        try:
            with wrapped.memory_disabled():
                inside.set()
                with torch.no_grad():
                    a_got["logits"] = wrapped(question, flush_window=False).logits[:, -4:]
                a_got["answer"] = wrapped.generate(question, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                                   flush_window=False)
                b_done.wait(120)  # still inside while B runs
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=a_thread)
    th.start()
    assert inside.wait(60)
    try:
        got = b_work()
    finally:
        b_done.set()
        th.join()
    assert not errors, errors
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    assert got[2] == expected[2] > 0
    torch.testing.assert_close(a_got["logits"], plain_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a_got["answer"], plain_answer, rtol=0, atol=0)
    assert wrapped.memory.num_chunks() == expected[2]  # A stored nothing


def test_nested_call_from_a_streamer_is_refused() -> None:
    wrapped = memkit.wrap(tiny_model("llama"), **CFG)

    class Nested:
        def put(self, value: torch.Tensor) -> None:
            wrapped(_ids(5, 1))

        def end(self) -> None:
            pass

    with pytest.raises(memkit.InvalidInputError, match="nested"):
        wrapped.generate(_ids(20, 2), max_new_tokens=2, streamer=Nested(), pad_token_id=0)
    assert wrapped(_ids(5, 1)).logits.shape == (1, 5, 256)  # the model is usable afterwards


# ---------------------------------------------------------------------------------------------- saves
def _filled(arch: str, seed: int = 0, **kw: Any) -> Any:
    wrapped = memkit.wrap(tiny_model(arch, seed=seed, **kw), **CFG)
    wrapped.memory.ingest(_ids(64, 3))
    return wrapped


def test_memory_of_another_model_is_refused(tmp_path: Path) -> None:
    llama = _filled("llama")
    llama.memory.save(tmp_path / "llama")
    qwen = _filled("qwen2")  # the same page shapes: 4 layers, 2 K/V heads of 16
    qwen.memory.save(tmp_path / "qwen")
    other_seed = _filled("llama", seed=1)
    with pytest.raises(memkit.IncompatibleMemoryError, match="model_type"):
        llama.memory.load(tmp_path / "qwen")
    with pytest.raises(memkit.IncompatibleMemoryError, match="keys differ"):
        other_seed.memory.load(tmp_path / "llama")
    n = llama.memory.num_chunks()
    llama.memory.load(tmp_path / "llama")  # its own save
    assert llama.memory.num_chunks() == n
    other_seed.memory.load(tmp_path / "llama", check_model=False)  # the caller's explicit choice
    assert other_seed.memory.num_chunks() == n
    bf16 = memkit.wrap(tiny_model("llama", dtype=torch.bfloat16), **CFG)
    bf16.memory.load(tmp_path / "llama")  # the same weights in bf16 produce the same keys (cosine > 0.98)
    two = memkit.wrap(tiny_model("llama"), **dict(CFG, memlong={"memory_layers": [1, 2]}))
    with pytest.raises(memkit.IncompatibleMemoryError):
        two.memory.load(tmp_path / "llama")


# ---------------------------------------------------------------------------------------------- across calls
def test_a_short_chat_turn_is_remembered_and_text_is_stored_once() -> None:
    wrapped = memkit.wrap(tiny_model("llama"), **CFG)
    turn = _ids(20, 11)  # shorter than the window: nothing leaves it while reading
    wrapped.generate(turn, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert wrapped.memory.num_chunks() == 3  # 22 tokens read: two whole chunks and a partial one
    spans = sorted(wrapped.memory.manager.spans("default"))
    assert spans == [(0, 8), (8, 16), (16, 22)]
    info = wrapped.memory.ingest(_ids(48, 12), namespace="doc")
    assert info["chunks_added"] == 6
    again = wrapped.memory.ingest(_ids(48, 12), namespace="doc")  # the same text again
    assert again["chunks_added"] == 0 and wrapped.memory.num_chunks("doc") == 6
    off = memkit.wrap(tiny_model("qwen2"), **dict(CFG, flush_window=False))
    off.generate(turn, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert off.memory.num_chunks() == 0  # the documented alternative: only what left the window


def test_memory_calls_after_unwrap_are_memkit_errors() -> None:
    wrapped = memkit.wrap(tiny_model("llama"), **CFG)
    memkit.unwrap(wrapped)
    for call in (lambda: wrapped.memory.ingest(_ids(10, 1)), lambda: wrapped.memory.stats(),
                 lambda: wrapped(_ids(10, 1)), lambda: wrapped.generate(_ids(10, 1), max_new_tokens=1)):
        with pytest.raises(memkit.MemkitError, match="unwrapped"):
            call()


# ---------------------------------------------------------------------------------------------- bad input
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                 st.text(max_size=12), st.binary(max_size=8), st.lists(st.integers(-5, 300), max_size=4),
                 st.dictionaries(st.text(max_size=6), st.integers(), max_size=2))
CONFIG_KEYS = ["style", "top_k", "window", "block_size", "chunk_size", "sink_tokens", "position_scheme", "retriever",
               "retrieval", "max_chunk_similarity", "question_top_k", "policy", "capacity_tokens", "protect_recent",
               "flush_window", "progress",
               "backend", "bank", "kvstore", "memlong", "longmem"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(CONFIG_KEYS), value=JUNK)
def test_config_accepts_nothing_but_valid_values(key: str, value: Any) -> None:
    try:
        cfg = memkit.load_config(**{key: value})
    except memkit.MemkitError:
        return
    assert cfg.to_dict()  # accepted values round-trip


_MODEL: dict[str, Any] = {}


def _shared() -> Any:
    if "w" not in _MODEL:
        _MODEL["w"] = memkit.wrap(tiny_model("llama"), **CFG)
    return _MODEL["w"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(["forward", "generate", "ingest", "save", "load", "trace", "reset", "namespaces",
                              "logits_to_keep", "labels", "mask"]), value=JUNK)
def test_model_api_raises_only_memkit_errors(which: str, value: Any, tmp_path_factory: Any) -> None:
    import contextlib

    wrapped = _shared()
    ok = _ids(12, 5)
    calls = {
        "forward": lambda: wrapped(value),
        "generate": lambda: wrapped.generate(value, max_new_tokens=1),
        "ingest": lambda: wrapped.memory.ingest(value),
        "save": lambda: wrapped.memory.save(value),
        "load": lambda: wrapped.memory.load(value),
        "trace": lambda: wrapped.memory.trace(value),
        "reset": lambda: wrapped.memory.reset(value),
        "namespaces": lambda: wrapped(ok, namespaces=value),
        "logits_to_keep": lambda: wrapped(ok, logits_to_keep=value),
        "labels": lambda: wrapped(ok, labels=value),
        "mask": lambda: wrapped(ok, attention_mask=value),
    }
    base = tmp_path_factory.getbasetemp()
    try:  # junk paths land in a temp dir, "~" included (memkit expands it: memkit.paths)
        with torch.no_grad(), contextlib.chdir(base), mock.patch.dict(os.environ, {"HOME": str(base)}):
            calls[which]()
    except memkit.MemkitError:
        pass
    finally:
        wrapped.memory.reset()
    assert wrapped(ok).logits.shape == (1, 12, 256)  # still usable


@settings(max_examples=120, deadline=None)
@given(name=st.one_of(st.sampled_from(["faiss-flat", "hnswlib", "nope", "disk://x", "disk:///"]), JUNK), dim=JUNK,
       k=JUNK, vectors=JUNK)
def test_bank_api_raises_only_memkit_errors(name: Any, dim: Any, k: Any, vectors: Any) -> None:
    try:
        bank = memkit.create_bank(name, dim=dim)
    except memkit.MemkitError:
        bank = memkit.create_bank("faiss-flat", dim=4)
    for call in (lambda: bank.add(vectors), lambda: bank.search(vectors, k), lambda: bank.search(np.eye(4), k),
                 lambda: bank.remove(vectors)):
        try:
            call()
        except memkit.MemkitError:
            pass
    bank.close()
