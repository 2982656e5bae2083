"""memkit.train for both styles: only memkit's parameters change, loss falls, save/load, HF Trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import memkit
from memkit.testing.tiny_models import one_thread, repeating_ids, tiny_model

LONGMEM: dict = dict(style="longmem", window=32, chunk_size=8, block_size=16, sink_tokens=2,
                     longmem={"chunk": 4, "tokens": 8}, progress=False)
MEMLONG: dict = dict(style="memlong", window=32, chunk_size=8, block_size=16, sink_tokens=2, top_k=2,
                     memlong={"memory_layers": [1], "retrieval_layers": [2, 3]}, retriever="keys", progress=False)


def _with(cfg: dict, **block: object) -> dict:
    """cfg with settings of its style's block changed."""
    return dict(cfg, **{cfg["style"]: {**cfg[cfg["style"]], **block}})


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    with one_thread():
        yield


_doc = repeating_ids  # what was read 40 tokens earlier predicts what comes next


def _backbone(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_longmem_sidenet_trains_only_memkit_parameters(tmp_path: Path) -> None:
    model = tiny_model("llama")
    before = _backbone(model)
    wrapped = memkit.wrap(model, **_with(LONGMEM, sidenet=True))
    doc = _doc()
    with torch.no_grad():
        loss0 = float(wrapped(doc[None], labels=doc[None]).loss)
    wrapped.memory.reset()
    res = memkit.train(wrapped, [doc], steps=12, segment_len=80, lr=3e-3, gate_lr=0.5)
    assert res.steps == 12 and res.trainable > 0 and len(res.losses) == 12
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # the backbone is frozen
    assert float(wrapped.memkit_modules["sidenet"].scales.detach().abs().sum()) > 0
    assert not torch.allclose(wrapped.memkit_modules["gate"].logits.detach(), torch.full((4,), -8.0))
    with torch.no_grad():
        loss1 = float(wrapped(doc[None], labels=doc[None]).loss)
    assert loss1 < loss0

    # save_pretrained writes only memkit's config + weights; from_pretrained restores the same model
    wrapped.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["memkit_config.json", "memkit_training.json", "memkit_weights.safetensors"]
    side = sum(p.numel() for p in wrapped.memkit_modules.parameters())
    assert (tmp_path / "memkit_weights.safetensors").stat().st_size < 4 * side + 65536
    wrapped.memory.reset()
    with torch.no_grad():
        ref = wrapped(doc[None]).logits
    memkit.unwrap(wrapped)
    again = memkit.from_pretrained(tiny_model("llama"), tmp_path)
    with torch.no_grad():
        out = again(doc[None]).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_memlong_lora_on_retrieval_layers(tmp_path: Path) -> None:
    model = tiny_model("qwen2")
    before = _backbone(model)
    wrapped = memkit.wrap(model, **MEMLONG)
    doc = _doc(seed=1)
    with torch.no_grad():
        loss0 = float(wrapped(doc[None], labels=doc[None]).loss)
    wrapped.memory.reset()
    res = memkit.train(wrapped, [doc], steps=10, segment_len=80, lr=5e-3, lora={"r": 4, "alpha": 8})
    lora = {n for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(".layers.2." in n or ".layers.3." in n for n in lora)  # retrieval layers only
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, before[n.replace(".base_layer", "")]), n
    assert res.trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        loss1 = float(wrapped(doc[None], labels=doc[None]).loss)
    assert loss1 < loss0
    wrapped.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "memkit_training.json").read_text())
    assert meta["lora"]["r"] == 4
    wrapped.memory.reset()
    with torch.no_grad():
        ref = wrapped(doc[None]).logits
    memkit.unwrap(wrapped)
    again = memkit.from_pretrained(tiny_model("qwen2"), tmp_path)
    with torch.no_grad():
        out = again(doc[None]).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_hf_trainer_runs_on_a_wrapped_model(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from memkit.integrations.training import prepare_for_training

    model = tiny_model("llama")
    wrapped = memkit.wrap(model, **LONGMEM)
    params = prepare_for_training(wrapped)
    assert [p for p in wrapped.parameters() if p.requires_grad] == params
    doc = _doc(64)
    data = [{"input_ids": doc, "labels": doc} for _ in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=1, max_steps=2,
                             learning_rate=0.5, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    gate0 = wrapped.memkit_modules["gate"].logits.detach().clone()
    Trainer(model=wrapped, args=args, train_dataset=data).train()
    assert not torch.equal(wrapped.memkit_modules["gate"].logits, gate0)


def _grads(wrapped: memkit.integrations.wrap.MemkitModel, params: list[torch.nn.Parameter], doc: torch.Tensor
           ) -> tuple[float, list[torch.Tensor | None]]:
    wrapped.memory.reset()
    wrapped.train()
    for p in params:
        p.grad = None
    loss = wrapped(doc[None], labels=doc[None]).loss
    loss.backward()
    wrapped.eval()
    return float(loss.detach()), [None if p.grad is None else p.grad.clone() for p in params]


@pytest.mark.parametrize(("arch", "cfg", "extra"), [
    ("llama", LONGMEM, {"sidenet": True}),
    ("llama", LONGMEM, {}),  # the gate inside a backbone layer: backbone layers 2-3 are recomputed
    ("gemma3", LONGMEM, {"sidenet": True, "positions": "scheme"}),
    ("qwen2", MEMLONG, {}),  # LoRA on the retrieval layers
])
def test_gradient_checkpointing_gives_the_same_gradients(arch: str, cfg: dict, extra: dict) -> None:
    """Each decoder layer is recomputed in backward, after the block was committed and the call ended; the
    recomputation replays what attention read (window, sinks, memory, retrieval) and gradients are unchanged."""
    from memkit.integrations.training import enable_gradient_checkpointing, prepare_for_training

    wrapped = memkit.wrap(tiny_model(arch), **_with(cfg, **extra, **({"gate_init": 0.0} if cfg is LONGMEM else {})))
    params = prepare_for_training(wrapped, lora={"r": 4} if cfg is MEMLONG else None)
    if extra.get("sidenet"):
        with torch.no_grad():
            wrapped.memkit_modules["sidenet"].scales.fill_(0.5)  # the side layers take part in the loss
    with torch.no_grad():
        for p in params:
            if p.dim() == 2 and not bool(p.abs().sum() > 0):
                p.normal_(0.0, 0.1)  # LoRA B starts at 0 (so A would get no gradient): give both a gradient
    doc = _doc(150, seed=2)  # 10 blocks; memory fills from the third
    loss0, ref = _grads(wrapped, params, doc)
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in ref) == len(params)
    undo = enable_gradient_checkpointing(wrapped)
    replays = []
    from memkit.integrations.replay import Replay

    memo = Replay.memo
    Replay.memo = lambda self, fn: (replays.append(self.replaying), memo(self, fn))[1]  # type: ignore[method-assign]
    try:
        loss1, got = _grads(wrapped, params, doc)
    finally:
        Replay.memo = memo  # type: ignore[method-assign]
        undo()
    assert any(replays) and not all(replays)  # recorded in forward, replayed in backward
    assert loss1 == loss0
    for name, a, b in zip([str(i) for i in range(len(params))], ref, got):
        assert b is not None, name
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert all("forward" not in layer.__dict__ for layer in wrapped.hf_model.modules())  # undo restored them
    res = memkit.train(wrapped, [doc], steps=2, segment_len=64, gradient_checkpointing=True,
                       lora={"r": 4} if cfg is MEMLONG else None)
    assert res.steps == 2 and all(math.isfinite(x) for x in res.losses)


def test_bf16_autocast_on_cpu() -> None:
    """mixed_precision='bf16' trains under CPU autocast; its loss stays close to the fp32 loss."""
    wrapped = memkit.wrap(tiny_model("llama"), **_with(LONGMEM, sidenet=True))
    doc = _doc(120, seed=3)
    with torch.no_grad():
        ref = float(wrapped(doc[None], labels=doc[None]).loss)
        wrapped.memory.reset()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = wrapped(doc[None], labels=doc[None])
    assert out.logits.dtype == torch.bfloat16 and abs(float(out.loss) - ref) < 0.05
    wrapped.memory.reset()
    res = memkit.train(wrapped, [doc], steps=3, segment_len=40, mixed_precision="bf16", lr=1e-3)
    assert res.mixed_precision == "bf16" and all(math.isfinite(x) for x in res.losses)
    assert abs(res.losses[0] - ref) < 0.5
    assert memkit.train(wrapped, [doc], steps=1, segment_len=40, mixed_precision="auto").mixed_precision is None


def test_longmem_gate_only_trains_when_the_first_segment_has_no_memory() -> None:
    """Without a SideNet the gate is the only parameter; a segment with empty memory has no gradient and is
    skipped instead of failing."""
    wrapped = memkit.wrap(tiny_model("llama"), **LONGMEM)
    gate0 = wrapped.memkit_modules["gate"].logits.detach().clone()
    res = memkit.train(wrapped, [_doc(160)], steps=3, segment_len=48, gate_lr=0.5)
    assert res.steps == 3 and not torch.equal(wrapped.memkit_modules["gate"].logits.detach(), gate0)


def test_training_errors_are_typed(tmp_path: Path) -> None:
    wrapped = memkit.wrap(tiny_model("llama"), **LONGMEM)
    with pytest.raises(memkit.MemkitError):
        memkit.train(wrapped, [_doc()], steps=1, mixed_precision="fp16")  # fp16 needs CUDA
    with pytest.raises(memkit.MemkitError):
        memkit.train(wrapped, [_doc()], steps=1, lora=True)  # LoRA is for the MemLong style
    with pytest.raises(memkit.MemkitError):
        memkit.train(wrapped, ["text"], steps=1)  # no tokenizer
    plain = memkit.wrap(tiny_model("gpt2"), **_with(MEMLONG, memory_layers=[1], retrieval_layers=[2]))
    with pytest.raises(memkit.MemkitError):
        memkit.train(plain, [_doc()], steps=1)  # memlong without LoRA: nothing to train
    wrapped.save_pretrained(tmp_path)
    with pytest.raises(memkit.MemkitError):  # weights of a 4-layer model do not fit a 2-layer one
        memkit.from_pretrained(tiny_model("llama", layers=2), tmp_path, longmem={"layer": 1, "sidenet": True})
