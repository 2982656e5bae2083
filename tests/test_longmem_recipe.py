"""LongMem's trainable memory read, the training curriculum, ``memkit train`` and the ICL task (Wang et al. 2023).

Logic on tiny random-weight models (real tokenizer and texts where the task needs them); the end-to-end command
runs on a tiny Llama with a BPE tokenizer trained on Hamlet.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch

import memkit
from memkit.integrations.curriculum import copy_documents, split_documents, training_documents
from memkit.testing.tiny_models import one_thread, repeating_ids, tiny_model

CFG: dict = dict(style="longmem", window=32, chunk_size=8, block_size=16, sink_tokens=2,
                 longmem={"chunk": 4, "tokens": 8}, progress=False, flush_window=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    with one_thread():
        yield


_doc = repeating_ids  # what was read 40 tokens earlier predicts what comes next


def _logits(wrapped: memkit.integrations.wrap.MemkitModel, ids: torch.Tensor) -> torch.Tensor:
    wrapped.memory.reset()
    with torch.no_grad():
        return wrapped(ids[None]).logits


def test_reader_starts_at_identity_and_its_maps_change_the_memory_read() -> None:
    model = tiny_model("llama")
    wrapped = memkit.wrap(model, **CFG)
    reader = wrapped.memkit_modules["reader"]
    Hq, D = reader.query.shape[0], reader.query.shape[1]
    assert torch.equal(reader.query, torch.eye(D).expand(Hq, D, D))
    with torch.no_grad():
        wrapped.memkit_modules["gate"].logits.fill_(4.0)
    ids = _doc(120, 1)
    ref = _logits(wrapped, ids)
    with torch.no_grad():
        reader.value.mul_(0.0)  # memory read contributes nothing; the gate still takes its share of the head
        zero_v = _logits(wrapped, ids)
        reader.value.copy_(torch.eye(D).expand(Hq, D, D))
        reader.query.mul_(3.0)  # sharper memory softmax, same retrieval order
        sharp = _logits(wrapped, ids)
    assert torch.allclose(ref[:, :40], zero_v[:, :40], atol=1e-5)  # nothing in memory yet
    assert (zero_v[:, 64:] - ref[:, 64:]).abs().max() > 1e-2
    assert (sharp[:, 64:] - ref[:, 64:]).abs().max() > 1e-3
    memkit.unwrap(wrapped)


def test_random_reader_keeps_causality() -> None:
    model = tiny_model("llama")
    wrapped = memkit.wrap(model, **CFG)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        wrapped.memkit_modules["gate"].logits.fill_(2.0)
        for p in wrapped.memkit_modules["reader"].parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    ids = torch.randint(3, 256, (128,), generator=g)
    base = _logits(wrapped, ids)
    changed = ids.clone()
    changed[90] = (changed[90] + 7) % 253 + 3
    out = _logits(wrapped, changed)
    torch.testing.assert_close(out[:, :90], base[:, :90], atol=1e-5, rtol=1e-5)
    memkit.unwrap(wrapped)


def test_training_the_memory_read_uses_memory_and_saves_only_memkit_weights(tmp_path: Path) -> None:
    """Gate + reader train (the backbone stays frozen), loss on a repetitive document falls, memory off is the
    window-only model, and the adapter round-trips through save_pretrained / from_pretrained."""
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = memkit.wrap(model, **dict(CFG, flush_window=True))
    doc = _doc(200)
    with torch.no_grad():
        loss0 = float(wrapped(doc[None], labels=doc[None]).loss)
    wrapped.memory.reset()
    res = memkit.train(wrapped, [doc], steps=16, segment_len=64, lr=1e-3, reader_lr=3e-3, gate_lr=0.5)
    assert res.trainable == sum(p.numel() for p in wrapped.memkit_modules.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    reader = wrapped.memkit_modules["reader"]
    D = reader.query.shape[1]
    assert not torch.allclose(reader.query, torch.eye(D).expand_as(reader.query))
    with torch.no_grad():
        loss1 = float(wrapped(doc[None], labels=doc[None]).loss)
        wrapped.memory.reset()
        wrapped.memkit_config.top_k = 0
        off = float(wrapped(doc[None], labels=doc[None]).loss)
        wrapped.memkit_config.top_k = 8
    assert loss1 < loss0 and loss1 < off
    wrapped.save_pretrained(tmp_path)
    size = (tmp_path / "memkit_weights.safetensors").stat().st_size
    assert size < 4 * res.trainable + 65536  # memkit's parameters only, not the backbone
    ref = _logits(wrapped, doc)
    memkit.unwrap(wrapped)
    again = memkit.from_pretrained(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(_logits(again, doc), ref, atol=1e-5, rtol=1e-5)
    memkit.unwrap(again)


def test_adapter_saved_before_the_reader_existed_still_loads(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    wrapped = memkit.wrap(tiny_model("llama"), **CFG)
    with torch.no_grad():
        wrapped.memkit_modules["gate"].logits.fill_(1.5)
    wrapped.save_pretrained(tmp_path)
    memkit.unwrap(wrapped)
    path = tmp_path / "memkit_weights.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if ".reader." not in k}, str(path),
              metadata={"format": "memkit-weights", "version": "1"})
    again = memkit.from_pretrained(tiny_model("llama"), tmp_path)
    assert torch.allclose(again.memkit_modules["gate"].logits, torch.full((4,), 1.5))
    D = again.memkit_modules["reader"].query.shape[1]
    assert torch.equal(again.memkit_modules["reader"].value, torch.eye(D).expand_as(again.memkit_modules["reader"].value))
    memkit.unwrap(again)


def test_train_stops_on_its_time_budget_and_not_during_callbacks() -> None:
    wrapped = memkit.wrap(tiny_model("llama"), **CFG)
    res = memkit.train(wrapped, [_doc(400)], steps=None, max_seconds=0.6, segment_len=32)
    assert 1 <= res.steps < 1000 and res.seconds < 5.0
    slow: list[int] = []
    res = memkit.train(wrapped, [_doc(400)], steps=3, max_seconds=60.0, segment_len=32,
                       callback=lambda s, _l: (slow.append(s), time.sleep(0.3)))
    assert res.steps == 3 and slow == [0, 1, 2] and res.seconds < 0.9 + 5.0
    with pytest.raises(memkit.MemkitError):
        memkit.train(wrapped, [_doc()], steps=None)  # neither steps nor a time budget
    with pytest.raises(memkit.MemkitError):
        memkit.train(wrapped, [_doc()], steps=None, max_seconds=-1)
    memkit.unwrap(wrapped)


def test_curriculum_documents() -> None:
    texts = [torch.arange(1000), torch.arange(5000, 5300)]
    docs = split_documents(texts, 256, min_tokens=100)
    assert [len(d) for d in docs] == [256, 256, 256, 232, 256]  # the 44-token tail of the second text is dropped
    copies = copy_documents(docs, 3, window=64, rng=random.Random(0), passage=(32, 64))
    for c in copies:
        src = next(d for d in docs if torch.equal(c[:len(d)], d))
        tail = c[len(src):]
        assert 32 <= len(tail) < 64
        start = int(tail[0] - src[0])  # arange texts: the value says where the passage started
        assert torch.equal(src[start:start + len(tail)], tail)
        assert len(src) - start > 64 + len(tail)  # all of it left the window before it is read again
    mixed = training_documents(texts, doc_tokens=256, window=64, copy_fraction=0.25, seed=1)
    again = training_documents(texts, doc_tokens=256, window=64, copy_fraction=0.25, seed=1)
    assert len(mixed) == 5 + 2 and all(torch.equal(a, b) for a, b in zip(mixed, again))
    with pytest.raises(memkit.MemkitError):
        training_documents(texts, doc_tokens=256, window=64, copy_fraction=1.0)


@pytest.fixture(scope="module")
def smol_tokenizer():  # type: ignore[no-untyped-def]
    from memkit.models import load_smollm2

    return load_smollm2()[1]


def test_icl_task_is_a_hidden_mapping_with_the_query_key_outside_the_window(smol_tokenizer) -> None:
    from memkit.evaluation.icl import make_task, query_prompt

    tok = smol_tokenizer
    task = make_task(tok, n_keys=40, repeats=3, seed=5)
    assert task == make_task(tok, n_keys=40, repeats=3, seed=5)  # generated in code, reproducibly
    assert len(task.mapping) == 40 and len(task.demo_lines) == 120 and set(task.mapping.values()) <= set(task.labels)
    for k in task.keys:
        assert sum(ln == f"{k}: {task.mapping[k]}" for ln in task.demo_lines) == 3
    assert len({tok.decode([i]).strip() for i in task.label_ids}) == 4
    rng = random.Random(0)
    for k in task.keys[:10]:
        ids = query_prompt(tok, task, k, 100, rng)
        text = tok.decode(ids)
        assert len(ids) <= 100 and text.endswith(f"\n{k}:") and text.count(f"\n{k}:") == 1
        assert f"{k}: " not in text  # the window never shows the answer


def test_icl_evaluate_leaves_memory_unchanged() -> None:
    """On a tiny model with a real tokenizer's vocabulary cut to the tiny model's: ingest, query, count."""
    from memkit.evaluation.icl import ICLTask, evaluate

    class Tok:  # ids = bytes: the tiny model's 256-token vocabulary
        def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
            return {"input_ids": list(text.encode("latin-1", "replace"))}

    tok = Tok()
    lines = [f"k{i % 9}: {'ab'[i % 2]}" for i in range(60)]
    mapping = {f"k{i}": "ab"[i % 2] for i in range(9)}
    task = ICLTask(mapping=mapping, labels=("a", "b"), label_ids=[ord(" "), ord("a")], demo_lines=lines,
                   demo_ids=tok("\n".join(lines))["input_ids"])
    wrapped = memkit.wrap(tiny_model("llama"), **CFG)
    res = evaluate(wrapped, tok, task, recent_tokens=24)
    assert res["n"] == 9 and 0.0 <= res["accuracy"] <= 1.0 and res["chance"] == 0.5
    with pytest.raises(memkit.MemkitError):
        evaluate(wrapped, tok, task, recent_tokens=64)  # more than the window: would write to memory
    memkit.unwrap(wrapped)


def test_command_recipe_equals_the_library_recipe() -> None:
    from memkit.commands.train import RECIPE
    from memkit.integrations.training import LONGMEM_RECIPE

    mine = dict(segment_len=RECIPE["segment"], lr=RECIPE["lr"], reader_lr=RECIPE["reader_lr"],
                gate_lr=RECIPE["gate_lr"], scale_lr=RECIPE["scale_lr"], weight_decay=0.0)
    assert mine == LONGMEM_RECIPE


def test_memkit_train_command_end_to_end(tmp_path: Path) -> None:
    from memkit.cli import main
    from memkit.testing.tiny_models import tiny_hf_folder

    folder, text = tiny_hf_folder(tmp_path / "tiny")
    other = tmp_path / "other.txt"
    other.write_text(Path(text).read_text()[6000:] * 2)
    train_text = tmp_path / "train.txt"
    train_text.write_text(Path(text).read_text()[:6000] * 3)
    out = tmp_path / "adapter"
    assert main(["train", "--style", "longmem", "--model", str(folder), "--text", str(train_text), "--minutes", "0.2",
                 "--max-steps", "3", "--out", str(out), "--eval-text", str(other), "--eval-tokens", "320",
                 "--eval-context", "160", "--window", "64", "--doc-tokens", "256", "--segment", "64"]) == 0
    log = json.loads((out / "memkit_train_log.json").read_text())
    assert log["steps"] == 3 and log["curve"][0]["step"] == 0 and log["curve"][-1]["step"] == 3
    for key in ("memory_on_loss", "memory_off_loss", "memory_gain", "adapter_bytes", "train_seconds", "gate"):
        assert key in log, key
    assert log["adapter_bytes"] == (out / "memkit_weights.safetensors").stat().st_size
    assert json.loads((out / "memkit_config.json").read_text())["style"] == "longmem"
    # disjoint texts are enforced; a missing text says what to do
    assert main(["train", "--model", str(folder), "--text", str(train_text), "--minutes", "1", "--out",
                 str(tmp_path / "x"), "--eval-text", str(train_text)]) == 2
    assert main(["train", "--model", str(folder), "--text", "no-such-text", "--minutes", "1", "--out",
                 str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_untrained_longmem_equals_memlong_window_only_at_window_512_on_real_text() -> None:
    """Issue #16 item 0, with the defaults of ``wrap(m, style="longmem", window=512)`` (128 sinks, blocks of 256):
    LongMem's local attention is MemLong's window-only attention token for token, and the untrained gate keeps the
    memory read below 1e-3 nats (SmolLM2-135M, Julius Caesar tokens 1024-1535, memory filled from token 640)."""
    from memkit.corpora import play_ids
    from memkit.models import load_smollm2

    model, tok = load_smollm2()
    ids = play_ids(tok, ["julius_caesar"], 1536)["julius_caesar"][None]
    labels = ids.clone()
    labels[:, :1024] = -100
    losses = {}
    for name, kw in (("window-only", dict(style="memlong", top_k=0)), ("longmem off", dict(style="longmem", top_k=0)),
                     ("longmem", dict(style="longmem"))):
        wrapped = memkit.wrap(model, window=512, progress=False, **kw)
        with torch.no_grad():
            out = wrapped(ids, labels=labels, token_losses=True, logits_to_keep=1)
        losses[name] = out.token_losses[0, 1024:]
        if name == "longmem":
            assert wrapped.memory.num_chunks() > 0
        memkit.unwrap(wrapped)
    assert torch.equal(losses["longmem off"], losses["window-only"])
    assert float(losses["longmem"].mean()) <= float(losses["window-only"].mean()) + 1e-3
