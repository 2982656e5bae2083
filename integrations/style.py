"""The strategy a memory style implements inside a wrapped model (the runtime calls it; it never calls back up).

A style is registered with :func:`memkit.styles.register_style` (name, config block, strategy class). The
:class:`~.runtime.Runtime` owns the model, the hooks and the call state; the style decides which layers store
memory, how a step retrieves, how a layer attends, and what is stored:

========================  ==========================================================================
``__init__(rt, config)``  resolve layers from the style's config block (``config.style_config``)
``install()``             create trainable modules / extra layers before the runtime installs hooks
``make_memory()``         the MemoryManager this style reads and writes
``begin_call(call)``      set ``call.style_data`` (the style's per-call state)
``before_step(...)``      retrieve for the block about to run (inside the decoder pre-hook)
``attend(...)``           one layer's attention, usually via ``rt.attend_context``
``after_step(...)``       adjust the decoder output (LongMem's SideNet) before the commit
``store(call, evicted)``  turn chunks that left the window into memory entries
========================  ==========================================================================

Built in: :class:`~.memlong.MemLongStyle` (MemLong, Liu et al. 2024) and :class:`~.longmem.LongMemStyle`
(LongMem, Wang et al. 2023).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from memkit.config import MemoryConfig
    from memkit.memory import MemoryManager

    from .context import CallState, Evicted
    from .runtime import Runtime

__all__ = ["Style"]


class Style:
    """Base strategy: no memory layers, no extra modules; subclasses fill in the hooks they need."""

    name = "base"

    def __init__(self, rt: Runtime, config: MemoryConfig) -> None:
        self.rt, self.config = rt, config
        self.block = config.style_block()
        self.memory_layers: list[int] = []  # layers whose K/V are stored (the call state cuts their chunks)
        self.trainable: nn.ModuleDict | None = None  # memkit's own trainable modules, if any

    # ------------------------------------------------------------------ set-up
    def install(self) -> None:
        """Create modules and extra hooks (runs before the runtime registers the attention function)."""

    def extra_attention(self) -> list[nn.Module]:
        """Attention modules of the style's own layers (routed through memkit like the model's)."""
        return []

    def extra_layers(self) -> list[nn.Module]:
        """Decoder layers of the style's own (checkpointed with the model's when training)."""
        return []

    def query_layer(self) -> int | None:
        """Layer whose position-free queries the call keeps for key-based retrieval (None: not needed)."""
        return None

    def make_memory(self) -> MemoryManager:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What ``memory.stats()`` and saves report about the style (layers, retriever)."""
        return {"memory_layers": list(self.memory_layers)}

    # ------------------------------------------------------------------ calls and steps
    def begin_call(self, call: CallState) -> None:
        """Set ``call.style_data``."""

    def end_call(self, call: CallState) -> None:
        """Drop per-call data (the call state itself is discarded)."""

    def before_step(self, call: CallState, input_ids: torch.Tensor, blk_valid: torch.Tensor) -> None:
        """Retrieve memory for the block ``input_ids`` (B, T) about to run."""

    def attend(self, call: CallState, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               **kwargs: Any) -> torch.Tensor:
        """(B, T, Hq, D) attention output of one layer."""
        return self.rt.attend_context(call, module, query, key, value, None, **kwargs)

    def after_step(self, call: CallState, output: Any) -> None:
        """Adjust the decoder's output in place before the block is committed."""

    def store(self, call: CallState, evicted: list[Evicted]) -> None:
        """Write chunks that left the window to memory."""
