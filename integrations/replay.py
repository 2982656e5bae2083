"""Gradient checkpointing with memory: each checkpointed layer replays in backward exactly what it read.

Non-reentrant ``torch.utils.checkpoint`` recomputes a decoder layer during backward. By then memkit's per-step
state has moved on (the block was committed, the call may have ended), so the runtime declares a replay
capability: while a checkpointed layer runs, :class:`Replay` records every value memkit's attention took from
the step (:meth:`Runtime.current_call` records a :meth:`CallState.snapshot`, :meth:`Runtime.memo` records e.g.
LongMem's memory search), and the recomputation gets the same values back in the same order. Gradients then
equal those without checkpointing (tested on four set-ups).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Replay", "checkpoint_layers"]


class Replay:
    """What one checkpointed layer call read, in call order: recorded on the first run, replayed after."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.pos = 0
        self.replaying = False

    def memo(self, fn: Callable[[], Any]) -> Any:
        if not self.replaying:
            value = fn()
            self.items.append(value)
            return value
        value = self.items[self.pos]
        self.pos += 1
        return value


def _checkpointed(rt: Any, forward: Callable[..., Any]) -> Callable[..., Any]:
    from torch.utils.checkpoint import checkpoint

    def run_layer(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        rec = Replay()

        def run(*a: Any) -> Any:
            prev = rt.replay
            rt.replay = rec
            rec.pos = 0
            try:
                return forward(*a, **kwargs)
            finally:
                rt.replay = prev
                rec.replaying = True  # the next run of this function is backward's recomputation

        return checkpoint(run, *args, use_reentrant=False)

    return run_layer


def checkpoint_layers(rt: Any, layers: list[torch.nn.Module]) -> Callable[[], None]:
    """Run each of ``layers`` under a replaying checkpoint; returns the function that restores them."""
    for layer in layers:
        layer.forward = _checkpointed(rt, layer.forward)  # an instance attribute shadows the class's forward

    def undo() -> None:
        for layer in layers:
            layer.__dict__.pop("forward", None)

    return undo
