"""The ``"memkit"`` attention and mask functions, registered with transformers' interfaces.

memkit changes no architecture code: it registers one attention function in ``AttentionInterface`` and one
mask function in ``AttentionMaskInterface`` under the name ``"memkit"`` and sets the model's
``attn_implementation`` to it. Every decoder whose attention modules call
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`` (Llama, Qwen2, Mistral, Gemma3,
GPT-2, ...) then routes through memkit.

Outside a memkit call (or with memory disabled) both functions delegate to the model's original
implementation with the original arguments, so the model behaves exactly as before. Inside a call the
attention function implements MemLong's retrieval causal attention (Liu et al. 2024): the block's queries
attend, under one softmax, to [sinks | retrieved chunks | window | block (causal)]; the keys it receives are
already RoPE-rotated at the positions memkit chose, grouped K/V heads are not expanded (SDPA ``enable_gqa``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["ATTN_NAME", "RUNTIME_ATTR", "register", "memkit_attention", "memkit_mask", "RUNTIMES"]

ATTN_NAME = "memkit"
RUNTIME_ATTR = "_memkit_runtime"  # set on each routed attention module: the runtime its calls go to

# id(config) -> runtime; set by wrap(), removed by unwrap(). The mask function only sees the config.
RUNTIMES: dict[int, Any] = {}
_registered = False


def register() -> None:
    """Register the ``"memkit"`` attention and mask functions (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, memkit_attention)
    AttentionMaskInterface.register(ATTN_NAME, memkit_mask)
    _registered = True


def original_attention(module: torch.nn.Module, name: str) -> Callable[..., Any]:
    """The attention function ``name`` ("sdpa", "eager", ...) as the module's own code would pick it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if name == "eager" or name not in ALL_ATTENTION_FUNCTIONS:
        if eager is None:
            from memkit.errors import UnsupportedModelError

            raise UnsupportedModelError(f"{type(module).__name__}: no eager_attention_forward to fall back to")
        return eager
    return ALL_ATTENTION_FUNCTIONS[name]


def memkit_mask(*args: Any, config: Any = None, **kwargs: Any) -> Any:
    """Mask function: the original implementation's mask, or None inside a memkit step (memkit masks itself)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    rt = RUNTIMES.get(id(config))
    if rt is not None and rt.current_call() is not None:
        return None
    original = rt.original_impl if rt is not None else "sdpa"
    fn = ALL_MASK_ATTENTION_FUNCTIONS[original if original in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"]
    return fn(*args, config=config, **kwargs)


def memkit_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry point: query (B, Hq, T, D), key/value (B, Hkv, T, D) rotated at the step's positions.

    Inside a memkit step of this thread's call the runtime attends; otherwise the model's original function runs
    with the original arguments (another thread, memory disabled, or outside any call).
    """
    rt = getattr(module, RUNTIME_ATTR, None)
    call = rt.current_call() if rt is not None else None
    if rt is None or call is None:
        fn = original_attention(module, rt.original_impl if rt is not None else "sdpa")
        return fn(module, query, key, value, attention_mask, **kwargs)  # type: ignore[no-any-return]
    return rt.attend(call, module, query, key, value, **kwargs), None


def attend_core(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, *,
                scaling: float | None, softcap: float | None, dropout: float, training: bool) -> torch.Tensor:
    """Softmax attention of query (B, Hq, T, D) over key/value (B, Hkv, K, D) with a bool mask (B, 1, T, K).

    Returns (B, T, Hq, D) as transformers' attention functions do.
    """
    hq, hkv = query.shape[1], key.shape[1]
    if softcap is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                             dropout_p=dropout if training else 0.0, enable_gqa=hq != hkv)
        return out.transpose(1, 2)
    # Logit soft-capping (Gemma2-style) needs the explicit path.
    if hq != hkv:
        key = key.repeat_interleave(hq // hkv, dim=1)
        value = value.repeat_interleave(hq // hkv, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    w = torch.matmul(query, key.transpose(2, 3)) * scale  # (B, Hq, T, K)
    w = torch.tanh(w / softcap) * softcap
    w = w.masked_fill(~mask, torch.finfo(w.dtype).min)
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    if training and dropout:
        w = F.dropout(w, p=dropout)
    return torch.matmul(w, value).transpose(1, 2)


def attention_of_last(query: torch.Tensor, key: torch.Tensor, last: int, *, scaling: float | None,
                      softcap: float | None) -> torch.Tensor:
    """How much attention the last ``last`` queries give each key, averaged over them and the query heads.

    query (B, Hq, T, D) and key (B, Hkv, T, D) of one causal step at the same positions (rotated as the layer
    attends). Returns (B, T) float32 weights; each of the ``last`` rows sums to 1 over the keys it may see, so the
    result sums to 1. The ``focus`` retrieval stage reads it to see which chunks a question attends.
    """
    _, hq, T, D = query.shape
    m = max(1, min(int(last), T))
    q = query[:, :, T - m:].float()  # (B, Hq, m, D)
    k = key.float()
    if hq != k.shape[1]:
        k = k.repeat_interleave(hq // k.shape[1], dim=1)  # (B, Hq, T, D)
    scale = scaling if scaling is not None else D ** -0.5
    w = torch.matmul(q, k.transpose(2, 3)) * scale  # (B, Hq, m, T)
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    rows = torch.arange(T - m, T, device=w.device)[:, None]  # (m, 1) positions of the queries
    w = w.masked_fill(torch.arange(T, device=w.device)[None, :] > rows, float("-inf"))  # causal
    return torch.softmax(w, dim=-1).mean(dim=(1, 2))  # (B, T)
