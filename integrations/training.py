"""Training memkit's own parameters, for both styles; ``memkit.train`` and HF ``Trainer`` compatibility.

Both papers train only a small part of the model on long text whose memory is filled as reading goes on:

* LongMem (Wang et al. 2023): the backbone is frozen; the gate of the memory-augmented layer and the residual
  SideNet train (:mod:`memkit.integrations.longmem`, :mod:`memkit.integrations.sidenet`).
* MemLong (Liu et al. 2024): one middle layer's K/V feed retrieval attention in the upper layers, and those
  upper (retrieval) layers are fine-tuned; memkit uses LoRA (Hu et al. 2021) through peft on their attention
  projections, injected in place (``peft.inject_adapter_in_model``) so the model's structure, and memkit's
  hooks on it, stay as they are.

``train`` walks each document in segments of ``segment_len`` tokens, in order: memory is reset at the start of
a document and filled from its earlier segments (and earlier blocks of the same segment), so the trained
parameters learn to use memory of the same document. Each step re-reads the previous ``window`` tokens as
unscored context, so every scored token has its full local window and memory is continuous. Gradients stop
at block boundaries (the window's K/V are kept detached), as in both papers' segment-wise training.

``model.save_pretrained(dir)`` writes memkit's config (JSON) and only the trained parameters
(``memkit_weights.safetensors`` + ``memkit_training.json`` with the LoRA settings);
``memkit.from_pretrained(base_model, dir)`` wraps the base model again, re-injects the LoRA and loads them.

Gradient checkpointing (``gradient_checkpointing=True``, :func:`enable_gradient_checkpointing`): every decoder
layer (backbone and SideNet) runs under non-reentrant ``torch.utils.checkpoint`` and is recomputed in backward.
The runtime declares the replay this needs (:meth:`Runtime.enable_gradient_checkpointing`, :mod:`.replay`): each
checkpointed call records what its attention read and what the LongMem memory search returned, and the
recomputation replays exactly that, so gradients equal those without checkpointing (tested). Mixed precision:
``"bf16"`` runs under ``torch.autocast`` on CPU and CUDA, ``"fp16"`` (with a gradient scaler) on CUDA only;
``"auto"`` picks bf16/fp16 on CUDA and full precision on CPU, where autocast is usually slower.

HF ``Trainer``: call :func:`prepare_for_training` (freezes the backbone, adds LoRA, returns the trainable
parameters) and pass the wrapped model; its ``forward(input_ids, attention_mask, labels)`` returns ``.loss``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from memkit.errors import ConfigError, CorruptFileError, IncompatibleMemoryError, InvalidInputError, MissingDependencyError

__all__ = ["LONGMEM_RECIPE", "TrainResult", "train", "prepare_for_training", "enable_gradient_checkpointing", "trainable_parameters",
           "save_weights", "load_weights", "WEIGHTS_FILE", "TRAINING_FILE"]

# memkit.train keywords of the documented LongMem recipe (`memkit train`, `memkit eval styles --train-steps`): the
# SideNet/LoRA lr, the memory read's lr and the gates' lr (benchmarks/results/train.md measures it)
LONGMEM_RECIPE: dict[str, Any] = dict(segment_len=256, lr=3e-4, reader_lr=1e-3, gate_lr=0.1, scale_lr=0.005,
                                      weight_decay=0.0)
WEIGHTS_FILE = "memkit_weights.safetensors"
TRAINING_FILE = "memkit_training.json"
_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj", "query_key_value", "dense", "Wqkv")


@dataclass
class TrainResult:
    """What one :func:`train` run did."""

    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # per step
    trainable: int = 0  # number of trained parameters
    mixed_precision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rt(model: Any) -> Any:
    rt = getattr(type(model), "memkit_runtime", None)
    if rt is None:
        raise InvalidInputError(f"expected a model returned by memkit.wrap, got {type(model).__name__}")
    return model.memkit_runtime


# ---------------------------------------------------------------------------------------------- parameters
def _lora_names(model: Any) -> list[str]:
    """Full names of the attention projections of the retrieval layers (MemLong's fine-tuned layers)."""
    rt = _rt(model)
    layers = set(rt.style.describe().get("retrieval_layers", []))
    by_id = {id(m): i for i, m in enumerate(rt.attn) if i in layers}
    out = []
    for name, module in model.hf_model.named_modules():
        if id(module) in by_id:
            for child, sub in module.named_children():
                if child in _LORA_TARGETS and hasattr(sub, "weight"):
                    out.append(f"{name}.{child}")
    return out


def _add_lora(model: Any, lora: dict[str, Any]) -> None:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:
        raise MissingDependencyError("LoRA training needs peft: pip install peft") from exc
    targets = lora.get("target_modules") or _lora_names(model)
    if not targets:
        raise ConfigError("LoRA found no attention projections in the retrieval layers; pass lora={'target_modules': "
                          "[...]} with module names")
    cfg = LoraConfig(r=int(lora.get("r", 8)), lora_alpha=int(lora.get("alpha", 16)), lora_dropout=0.0,
                     target_modules=list(targets), fan_in_fan_out=type(model.hf_model).__name__.startswith("GPT2"))
    inject_adapter_in_model(cfg, model.hf_model)
    model.memkit_lora = {"r": cfg.r, "alpha": cfg.lora_alpha, "target_modules": sorted(targets)}


def trainable_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    """memkit's parameters by name: ``memkit_modules.*`` (gate, SideNet) and LoRA weights (``hf_model.*lora_*``)."""
    _rt(model)
    out: dict[str, torch.nn.Parameter] = {}
    mods = getattr(model, "memkit_modules", None)
    if mods is not None:
        out.update({f"memkit_modules.{n}": p for n, p in mods.named_parameters()})
    out.update({f"hf_model.{n}": p for n, p in model.hf_model.named_parameters() if "lora_" in n})
    return out


def prepare_for_training(model: Any, *, lora: bool | dict[str, Any] | None = None) -> list[torch.nn.Parameter]:
    """Freeze the backbone, add LoRA to the retrieval layers (``lora``: True or {r, alpha, target_modules};
    MemLong style only), make memkit's parameters trainable; returns them. Idempotent."""
    rt = _rt(model)
    if lora and rt.config.style != "memlong":
        raise ConfigError("LoRA is for style='memlong' (its retrieval layers); style='longmem' trains its gate and "
                          "SideNet with the backbone frozen")
    if lora and model.memkit_lora is None:
        _add_lora(model, {} if lora is True else dict(lora))
    params = trainable_parameters(model)
    if not params:
        raise ConfigError("nothing to train: style='memlong' needs lora=True; style='longmem' always has its gate")
    keep = {id(p) for p in params.values()}
    for p in model.hf_model.parameters():
        p.requires_grad_(id(p) in keep)
    for p in params.values():
        p.requires_grad_(True)
    return list(params.values())


# ---------------------------------------------------------------------------------------------- save / load
def save_weights(model: Any, directory: Path) -> None:
    """Write memkit's trained parameters (safetensors) and the LoRA settings (JSON); nothing if there are none."""
    from safetensors.torch import save_file

    params = trainable_parameters(model)
    if not params:
        return
    save_file({n: p.detach().float().cpu().contiguous() for n, p in params.items()}, str(directory / WEIGHTS_FILE),
              metadata={"format": "memkit-weights", "version": "1"})
    meta = {"format": "memkit-training", "version": 1, "lora": model.memkit_lora,
            "parameters": {n: list(p.shape) for n, p in params.items()}}
    (directory / TRAINING_FILE).write_text(json.dumps(meta, indent=1))


def load_weights(model: Any, directory: Path) -> bool:
    """Load what :func:`save_weights` wrote (re-injecting LoRA first); False when ``directory`` has none."""
    wpath, mpath = directory / WEIGHTS_FILE, directory / TRAINING_FILE
    if not wpath.is_file():
        return False
    from safetensors.torch import load_file

    try:
        meta = json.loads(mpath.read_text())
        tensors = load_file(str(wpath))
    except Exception as exc:
        raise CorruptFileError(f"could not read memkit weights in {directory}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != "memkit-training":
        raise CorruptFileError(f"{mpath} is not a memkit training file")
    if meta.get("lora") and model.memkit_lora is None:
        _add_lora(model, meta["lora"])
    params = trainable_parameters(model)
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    bad = [n for n in set(params) & set(tensors) if tuple(params[n].shape) != tuple(tensors[n].shape)]
    if extra or bad or (missing and not all(n.startswith(("memkit_modules.gate", "memkit_modules.reader")) for n in missing)):
        raise IncompatibleMemoryError(
            f"saved memkit weights do not fit this model/config: missing {missing[:4]}, unexpected {extra[:4]}, "
            f"wrong shape {bad[:4]}; load them into the same base model with the saved memkit config")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    return True


# ---------------------------------------------------------------------------------------------- checkpointing
def enable_gradient_checkpointing(model: Any) -> Callable[[], None]:
    """Checkpoint every decoder layer of a wrapped model (and of its SideNet); returns a function that undoes it.

    Same gradients as without checkpointing: the runtime replays what each layer's attention read
    (:meth:`memkit.integrations.runtime.Runtime.enable_gradient_checkpointing`).
    """
    return _rt(model).enable_gradient_checkpointing()  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------- training
def _optimizer_step(loss: torch.Tensor, opt: Any, scaler: Any, params: list[Any], max_grad_norm: float | None) -> None:
    """Backward, clip and step (through the gradient scaler when there is one). A loss that no trained
    parameter took part in (LongMem without SideNet before memory holds anything) changes nothing."""
    if not loss.requires_grad:
        return
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    if max_grad_norm and math.isfinite(max_grad_norm):
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def _schedule(docs: list[torch.Tensor], seg: int, per_doc: int | None, steps: int | None
              ) -> Iterable[tuple[torch.Tensor, int]]:
    """(document, segment start) for each step: documents in turn, each from its start, in order (endless when
    ``steps`` is None)."""
    n = 0
    while True:
        for ids in docs:
            starts = list(range(0, ids.numel() - 1, seg))[:per_doc]
            for s in starts:
                yield ids, s
                n += 1
                if steps is not None and n >= steps:
                    return


def _documents(model: Any, texts: Iterable[Any], tokenizer: Any) -> list[torch.Tensor]:
    docs = []
    for t in texts:
        if isinstance(t, str):
            tok = tokenizer or _rt(model).tokenizer
            if tok is None:
                raise InvalidInputError("train(texts=[str, ...]) needs a tokenizer: memkit.wrap(..., tokenizer=tok) "
                                        "or train(..., tokenizer=tok), or pass token ids")
            ids = tok(t, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        else:
            ids = torch.as_tensor(t, dtype=torch.long).reshape(-1)
        if ids.numel() >= 2:
            docs.append(ids)
    if not docs:
        raise InvalidInputError("train needs at least one document of 2 or more tokens")
    return docs


def _autocast(mode: str | None, device: torch.device) -> tuple[Any, str | None]:
    import contextlib

    if mode in (None, "no", "none", False):
        return contextlib.nullcontext(), None
    if mode == "auto":
        if device.type == "cuda":
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            return contextlib.nullcontext(), None  # CPU autocast is slower than fp32 on most CPUs
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if mode not in dtypes:
        raise ConfigError(f"mixed_precision={mode!r}: use 'auto', 'bf16', 'fp16' or None")
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("mixed_precision='fp16' needs a CUDA device; use 'bf16' on CPU")
    return torch.autocast(device.type, dtype=dtypes[mode]), mode


def train(model: Any, texts: Sequence[Any], *, tokenizer: Any = None, steps: int | None = 100, segment_len: int = 512,
          lr: float = 1e-4, gate_lr: float = 0.05, scale_lr: float = 0.005, reader_lr: float | None = None,
          lora: bool | dict[str, Any] | None = None, mixed_precision: str | None = "auto",
          gradient_checkpointing: bool = False, max_grad_norm: float = 1.0, weight_decay: float = 0.0,
          segments_per_doc: int | None = None, max_seconds: float | None = None, seed: int = 0, log_every: int = 0,
          callback: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train memkit's parameters of a wrapped model on long documents; see the module docstring.

    ``texts``: strings (tokenised with the wrap's tokenizer) or token-id sequences. ``steps`` optimiser steps,
    one per segment (None: until ``max_seconds``). Documents are read in turn, each from its start and in order for
    ``segments_per_doc`` segments (None = to its end), with memory reset when a document starts; the list repeats
    until ``steps`` or ``max_seconds`` of training (time spent in ``callback``, e.g. evaluations, not counted).
    ``lr`` for SideNet layers / LoRA weights; ``reader_lr`` for LongMem's memory-reading maps (None = ``lr``);
    ``gate_lr`` for the LongMem gate logits (they start at -8 and must move by units to open) and ``scale_lr`` for
    the SideNet's residual scales (they start at 0).
    ``gradient_checkpointing`` recomputes each decoder layer in backward (same gradients, less memory);
    ``mixed_precision``: None, ``"auto"``, ``"bf16"`` (CPU or CUDA) or ``"fp16"`` (CUDA). A step whose loss
    no trained parameter took part in (LongMem without SideNet while memory is still empty) changes nothing.
    Returns a :class:`TrainResult`; the model is left in eval mode.
    """
    rt = _rt(model)
    if steps is None and max_seconds is None:
        raise InvalidInputError("train needs steps or max_seconds (a time budget); got neither")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise InvalidInputError(f"train needs steps >= 1 (or None with max_seconds), got {steps!r}")
    if not isinstance(segment_len, int) or segment_len < 2:
        raise InvalidInputError(f"train needs segment_len >= 2, got {segment_len!r}")
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise InvalidInputError(f"max_seconds must be a positive number of seconds, got {max_seconds!r}")
    docs = _documents(model, texts, tokenizer)
    params = prepare_for_training(model, lora=lora)
    named = trainable_parameters(model)
    gate = [p for n, p in named.items() if n.startswith("memkit_modules.gate.")]
    scales = [p for n, p in named.items() if n == "memkit_modules.sidenet.scales"]
    reader = [p for n, p in named.items() if n.startswith("memkit_modules.reader.")]
    special = gate + scales + reader
    rest = [p for p in params if all(p is not g for g in special)]
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}] if rest else []
    groups += [{"params": ps, "lr": r, "weight_decay": 0.0}
               for ps, r in ((gate, gate_lr), (scales, scale_lr), (reader, lr if reader_lr is None else reader_lr))
               if ps]
    opt = torch.optim.AdamW(groups)
    ctx, mp = _autocast(mixed_precision, rt.device)
    scaler = torch.amp.GradScaler("cuda") if mp == "fp16" else None
    random.seed(seed)
    torch.manual_seed(seed)
    result = TrainResult(steps=0, tokens=0, seconds=0.0, trainable=sum(p.numel() for p in params),
                         mixed_precision=mp)
    t0 = time.perf_counter()
    outside = 0.0  # seconds spent in the callback (evaluations): not training time
    undo = enable_gradient_checkpointing(model) if gradient_checkpointing else None
    model.train()
    grad_was_enabled = torch.is_grad_enabled()
    torch.set_grad_enabled(True)  # training works even if the caller disabled gradients globally
    try:
        for step, (ids, start) in enumerate(_schedule(docs, segment_len, segments_per_doc, steps)):
            if max_seconds is not None and time.perf_counter() - t0 - outside >= max_seconds:
                break
            if start == 0:
                model.memory.reset("default")  # a document starts: its memory fills from its own earlier segments
            # The previous segment's last `window` tokens are re-read as unscored context: the local window is
            # then as in inference, and they reach memory as they leave it (a call keeps only what it evicts).
            lead = min(start, rt.config.window)
            seg = ids[start - lead:start + segment_len][None].to(rt.device)  # (1, lead + T)
            labels = seg.clone()
            labels[:, :lead] = -100
            with ctx:
                loss = model(seg, labels=labels, progress=False, logits_to_keep=1).loss
            if not torch.isfinite(loss):
                raise InvalidInputError(f"training loss became {float(loss)} at step {step}; lower lr")
            opt.zero_grad(set_to_none=True)
            _optimizer_step(loss, opt, scaler, params, max_grad_norm)
            value = float(loss.detach())
            result.losses.append(value)
            result.steps, result.tokens = step + 1, result.tokens + seg.shape[1] - lead
            if callback is not None:
                t_cb = time.perf_counter()
                model.eval()
                callback(step, value)
                model.train()
                outside += time.perf_counter() - t_cb
            if log_every and (step + 1) % log_every == 0:
                print(f"memkit train step {step + 1}/{steps or '-'} loss {value:.4f}", flush=True)
    finally:
        if undo is not None:
            undo()
        torch.set_grad_enabled(grad_was_enabled)
        model.eval()
        model.memory.reset("default")
    result.seconds = time.perf_counter() - t0 - outside
    return result
