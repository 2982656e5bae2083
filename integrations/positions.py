"""Position bookkeeping for memory keys: store keys position-free, re-rotate them where memkit places them.

In transformers 5.x a registered attention function receives keys that are already RoPE-rotated at the
positions the model was given. memkit controls those positions (``position_ids``) and keeps every stored key
*un-rotated* ("position-free"), as InfLLM (Xiao et al. 2024) does for its memory blocks; before each block it
rotates the context keys (sinks, retrieved chunks, window) to the positions of the chosen scheme. MemLong
(Liu et al. 2024) rotates memory keys as if at position 0 (our ``"zero"`` scheme); the default
``"contiguous"`` scheme places sinks, memory and window back to back so every distance stays inside the
trained range whatever the input length (measured: it is what makes a passkey at 32k findable).

Nothing here knows an architecture by name: cos/sin come from the model's own ``*RotaryEmbedding`` module
(called at any positions; a per-layer ``layer_type`` is passed when its ``forward`` takes one, as Gemma3's
does) and the rotation itself is the architecture's own ``apply_rotary_pos_emb``. A rotation by ``-p`` undoes
a rotation by ``p`` exactly up to rounding. Models without rotary embeddings (GPT-2: learned absolute
positions added to the input) need no key rotation; positions then only feed the position embedding table.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["Rotary", "find_rotary_modules"]


def find_rotary_modules(base: nn.Module) -> list[nn.Module]:
    """The model's rotary-embedding modules (class name ending in ``RotaryEmbedding``)."""
    return [m for m in base.modules() if type(m).__name__.endswith("RotaryEmbedding")]


class _LayerRope:
    """cos/sin provider and rotate function for one attention layer."""

    def __init__(self, rotary: nn.Module, layer_type: str | None, apply_fn: Callable[..., Any]) -> None:
        self.rotary = rotary
        self.layer_type = layer_type
        self.apply_fn = apply_fn
        params = inspect.signature(rotary.forward).parameters
        self.takes_layer_type = "layer_type" in params
        if self.takes_layer_type and layer_type is not None:
            scale = getattr(rotary, f"{layer_type}_attention_scaling", 1.0)
        else:
            scale = getattr(rotary, "attention_scaling", 1.0)
        self.scale = float(scale if scale is not None else 1.0)
        self.key = (id(rotary), layer_type)

    def cos_sin(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, N) long -> pure rotation cos, sin (B, N, D) float32 (attention scaling divided out)."""
        dummy = torch.empty(0, device=device, dtype=torch.float32)
        pos = positions.to(device)
        if self.takes_layer_type:
            cos, sin = self.rotary(dummy, pos, self.layer_type)
        else:
            cos, sin = self.rotary(dummy, pos)
        cos, sin = cos.float(), sin.float()
        if self.scale != 1.0:
            cos, sin = cos / self.scale, sin / self.scale
        return cos, sin


class Rotary:
    """Rotate keys (B, H, N, D) to positions (B, N) and back, per attention layer.

    ``enabled`` is False for models without rotary embeddings; ``rotate`` is then the identity.
    """

    def __init__(self, base: nn.Module, attn_modules: list[nn.Module]) -> None:
        rotaries = find_rotary_modules(base)
        self.enabled = bool(rotaries)
        self.layers: list[_LayerRope | None] = []
        if not self.enabled:
            self.layers = [None] * len(attn_modules)
            return
        rotary = rotaries[0]
        config = getattr(base, "config", None)
        layer_types = getattr(config, "layer_types", None)
        for i, attn in enumerate(attn_modules):
            module = sys.modules.get(type(attn).__module__)
            apply_fn = getattr(module, "apply_rotary_pos_emb", None)
            if apply_fn is None:
                from memkit.errors import UnsupportedModelError

                raise UnsupportedModelError(
                    f"{type(attn).__name__} uses rotary embeddings but its module {type(attn).__module__} has no "
                    "apply_rotary_pos_emb function; memkit cannot re-rotate stored keys for this architecture"
                )
            layer_type = getattr(attn, "layer_type", None)
            if layer_type is None and layer_types is not None and i < len(layer_types):
                layer_type = layer_types[i]
            self.layers.append(_LayerRope(rotary, layer_type, apply_fn))

    def add_layers(self, sources: list[int]) -> None:
        """Append rope entries for extra attention layers that copy layers ``sources`` (LongMem's SideNet)."""
        self.layers.extend(self.layers[s] for s in sources)

    def _cos_sin(self, layer: int, positions: torch.Tensor, device: torch.device, tag: str | None,
                 cache: dict[Any, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
        rope = self.layers[layer]
        assert rope is not None
        key = (rope.key, tag) if tag is not None and cache is not None else None
        if key is not None and cache is not None and key in cache:
            return cache[key]  # type: ignore[no-any-return]
        out = rope.cos_sin(positions, device)
        if key is not None and cache is not None:
            cache[key] = out
        return out

    def rotate(self, layer: int, x: torch.Tensor, positions: torch.Tensor, *, inverse: bool = False,
               tag: str | None = None, cache: dict[Any, Any] | None = None) -> torch.Tensor:
        """Rotate ``x`` (B, H, N, D) by ``positions`` (B, N) (by ``-positions`` when ``inverse``).

        Computed in float32 and cast back to ``x.dtype``. ``tag`` names a (layer-rope, positions) pair that is
        reused within one step (e.g. ``"win"``): its cos/sin are kept in ``cache`` (the step's own dict, held by
        the call state) and computed once per rope kind, not per layer.
        """
        if not self.enabled or x.shape[-2] == 0:
            return x
        rope = self.layers[layer]
        assert rope is not None
        cos, sin = self._cos_sin(layer, positions, x.device, tag, cache)  # (B, N, D)
        if inverse:
            sin = -sin
        xf = x.float()
        _, out = rope.apply_fn(xf, xf, cos, sin)  # (B, H, N, D)
        return out.to(x.dtype)
