"""The residual SideNet of LongMem (Wang et al. 2023, "Augmenting Language Models with Long-Term Memory").

LongMem keeps the backbone LLM frozen and trains a light *SideNet* beside it: ``L/2`` decoder layers, layer
``j`` initialised from backbone layer ``2j + p`` (every second layer), fed by *cross-network residual
connections* from the backbone's hidden states, with the memory-augmented layer inside it, and sharing the
backbone's final norm and LM head. memkit picks the parity ``p`` of the backbone's memory layer, so the side
layer that attends memory is a copy of the very layer whose keys memory holds: its query projection starts
in the same space as the memory keys (with the other parity it would query layer ``l``'s keys with layer
``l + 1``'s projection, and a short training run has to undo that first). The paper's recursion is::

    H_side^j = f_j(H_side^(j-1)) + (H_llm^(2j+2) - H_llm^(2j)),      H_side^(-1) = H_llm^0

memkit writes ``f_j(x) = x + a_j * (layer_j(x) - x)`` with a trainable per-layer scale ``a_j`` initialised
at 0 (ReZero; Bachlechner et al. 2020) and tracks the SideNet's deviation ``e`` from the backbone, so
``H_side^j = H_llm^(2j+2) + e_j``. The recursion is the paper's (with ``a_j = 1`` it is exactly the paper's
update, where the copied layer's own residual and the backbone's deltas add up); the scale at 0 makes the
untrained SideNet reproduce the backbone *bit for bit*, so training can only start from the backbone's
quality instead of from the double-counted initial network (which with a few minutes of training on a CPU
never recovers). The layers themselves are deep copies of real backbone layers, so every architecture that
memkit wraps (Llama, Qwen2, Mistral, Gemma3, GPT-2, ...) gets its SideNet without architecture code: each
side layer is called with the very arguments (position embeddings, masks, cache) the backbone passed to its
source layer in the same step.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from memkit.errors import UnsupportedModelError

__all__ = ["SideNet", "decoder_layers", "final_norm"]

_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm")


def decoder_layers(base: nn.Module, attn_modules: list[nn.Module]) -> list[nn.Module]:
    """The backbone's decoder layers, one per attention module (the ModuleList whose items contain them)."""
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) == len(attn_modules):
            if all(any(sub is attn for sub in layer.modules()) for layer, attn in zip(module, attn_modules)):
                return list(module)
    raise UnsupportedModelError(f"{type(base).__name__}: could not find a ModuleList of decoder layers holding the "
                                "attention modules; the SideNet needs one")


def final_norm(base: nn.Module) -> nn.Module:
    """The backbone's final normalisation (applied before the LM head)."""
    for name in _NORM_NAMES:
        m = getattr(base, name, None)
        if isinstance(m, nn.Module):
            return m
    raise UnsupportedModelError(f"{type(base).__name__} has no final norm named one of {list(_NORM_NAMES)}; "
                                "the SideNet shares it with the backbone and needs to find it")


class SideNet(nn.Module):
    """``L // 2`` trainable decoder layers beside a frozen backbone; see the module docstring."""

    def __init__(self, layers: list[nn.Module], *, config: Any, first_index: int, parity: int = 1) -> None:
        super().__init__()
        n_back = len(layers)
        if n_back < 2:
            raise UnsupportedModelError(f"a SideNet needs a backbone of at least 2 layers, got {n_back}")
        self.num_backbone_layers = n_back
        self.sources = [2 * j + parity % 2 for j in range(n_back // 2)]  # backbone layer each side layer copies
        # The copies share the HF config object (the attention implementation is read from it at call time).
        self.layers = nn.ModuleList(copy.deepcopy(layers[s], memo={id(config): config}) for s in self.sources)
        self.first_index = first_index
        for j, layer in enumerate(self.layers):  # copied before memkit hooks or attributes are installed
            for m in layer.modules():
                if getattr(m, "layer_idx", None) is not None and type(m).__name__.endswith("Attention"):
                    setattr(m, "layer_idx", first_index + j)  # noqa: B010 - its own slot in memkit's per-layer window
            for p in layer.parameters():
                p.requires_grad_(True)
        ref = next(iter(layers[0].parameters()))
        self.scales = nn.Parameter(torch.zeros(len(self.layers), device=ref.device, dtype=torch.float32))

    def attention_modules(self) -> list[nn.Module]:
        """Attention modules of the side layers, in side-layer order."""
        out = []
        for layer in self.layers:
            found = [m for m in layer.modules() if type(m).__name__.endswith("Attention")
                     and getattr(m, "layer_idx", None) is not None]
            out.append(found[0])
        return out

    def forward(self, hidden: list[torch.Tensor], layer_inputs: list[tuple[tuple[Any, ...], dict[str, Any]]]
                ) -> torch.Tensor:
        """hidden: L + 1 backbone hidden states (B, T, d) (input of layer 0, output of each layer);
        layer_inputs: the extra (args, kwargs) the backbone passed to each layer. Returns (B, T, d) before the
        final norm."""
        L = self.num_backbone_layers
        if len(hidden) != L + 1 or len(layer_inputs) != L:
            raise UnsupportedModelError(f"SideNet expected {L + 1} hidden states and {L} layer inputs, got "
                                        f"{len(hidden)} and {len(layer_inputs)}")
        e: torch.Tensor | None = None  # (B, T, d) deviation of the SideNet from the backbone
        for j, layer in enumerate(self.layers):
            x = hidden[2 * j] if e is None else hidden[2 * j] + e  # H_side^(j-1), (B, T, d)
            args, kwargs = layer_inputs[self.sources[j]]
            out = layer(x, *args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out  # (B, T, d)
            step = self.scales[j].to(out.dtype) * (out - x)
            e = step if e is None else e + step
        assert e is not None
        return hidden[L] + e  # odd L: the last backbone layer's delta is added through hidden[L]
