"""``generate()`` on prompts of any length, through transformers' own ``generate``.

memkit drives the real HF ``generate`` (sampling, logits processors, stopping criteria, streamers all work):

* a :class:`MemkitCache` (a ``transformers.Cache``) is passed as the cache (``cache=`` from transformers 5.24,
  ``past_key_values=`` before; :mod:`hf_compat`). It stores nothing:
  ``update`` hands the step's K/V straight to the memkit attention, which keeps sinks, window and memory
  itself; ``get_seq_length`` reports the tokens seen so far so ``generate`` feeds only new tokens, and each
  step checks that it did (a token handed over twice raises ``IncompatibleLibraryError``, naming the version);
* all of the prompt but its last ``chunk_size`` tokens is prefilled block by block (each block one memkit
  step, exactly as in a long forward); ``generate`` then reads the tail in one step and decodes;
* the decoder hook rewrites ``position_ids`` so every step sits right after its virtual context (an 80k
  prompt never produces a position beyond the trained range).

Retrieval (MemLong, Liu et al. 2024): prefill blocks retrieve with the text before them; the tail step
retrieves with the prompt's last ``chunk_size`` tokens *including itself* (only the logits after the prompt are
used, so this is causal for every generated token: a question at the end of the prompt retrieves its answer),
and decoding re-retrieves every ``block_size`` new tokens. Beam search and ``num_return_sequences > 1`` are refused (each row owns one
memory namespace): repeat the prompt in the batch instead.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers.cache_utils import Cache

from memkit.errors import InvalidInputError

from .long_forward import check_ids, progress_bar

__all__ = ["MemkitCache", "generate"]


class _NoLengthReminder(logging.Filter):
    """Drop transformers' "exceeded the model's predefined maximum length" note: memkit keeps positions small."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "predefined maximum length" not in record.getMessage()


class MemkitCache(Cache):
    """A pass-through Cache: memkit's attention keeps the context; this only counts tokens for ``generate``."""

    def __init__(self, runtime: Any) -> None:
        super().__init__(layers=[])
        self.runtime = runtime

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return key_states, value_states  # (B, H, T, D): only the new tokens reach the attention function

    @property
    def is_linear(self) -> list[bool]:
        # Not a linear-attention (Mamba/SSM) cache: generate must slice the prompt against get_seq_length.
        # (transformers 5.24 treats an empty layer list as all-linear and re-feeds the whole prompt.)
        return [False]

    @property
    def is_compileable(self) -> bool:
        return False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        call = self.runtime.call
        return int(call.cols) if call is not None else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reset(self) -> None:
        pass

    def _refuse(self, what: str) -> None:
        raise InvalidInputError(f"{what} is not supported with memkit generate (each batch row owns one memory "
                                "namespace); use num_beams=1 and repeat prompts in the batch instead")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._refuse("beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            self._refuse("num_return_sequences > 1")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._refuse("contrastive search")

    def crop(self, max_length: int) -> None:
        self._refuse("assisted generation")


def generate(rt: Any, input_ids: Any = None, attention_mask: Any = None, *, namespaces: list[str] | None = None,
             progress: bool | None = None, **kwargs: Any) -> Any:
    """memkit-driven ``model.generate``; keyword arguments are those of transformers' ``generate``."""
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    if input_ids is None:
        raise InvalidInputError("memkit generate needs input_ids (the prompt, any length)")
    if any(kwargs.get(name) is not None for name in ("past_key_values", "cache", "inputs_embeds")):
        raise InvalidInputError("memkit generate keeps the context itself: pass input_ids only, not "
                                "a cache (past_key_values) or inputs_embeds")
    for name in ("num_beams", "num_return_sequences"):
        if int(kwargs.get(name) or 1) != 1:
            raise InvalidInputError(f"{name}={kwargs[name]} is not supported with memkit generate; each batch row "
                                    "owns one memory namespace (repeat the prompt in the batch instead)")
    if kwargs.get("assistant_model") is not None:
        raise InvalidInputError("assisted generation is not supported with memkit generate")
    model = rt.model
    vocab = getattr(model.config.get_text_config(decoder=True), "vocab_size", None)
    input_ids, attention_mask = check_ids(input_ids, attention_mask, vocab, rt.device)
    B, N = input_ids.shape
    gc = kwargs.get("generation_config")
    if gc is not None and (int(getattr(gc, "num_beams", 1) or 1) != 1
                           or int(getattr(gc, "num_return_sequences", 1) or 1) != 1):
        raise InvalidInputError("memkit generate needs num_beams=1 and num_return_sequences=1")
    cache = MemkitCache(rt)
    if attention_mask is None and B > 1:
        attention_mask = torch.ones_like(input_ids)
    tail = min(N, max(1, int(kwargs.pop("memkit_tail", rt.config.chunk_size))))
    flush = kwargs.pop("flush_window", None)
    cache_kw = {rt.cache_kwarg: cache}  # `cache=` from transformers 5.24, `past_key_values=` before
    quiet = _NoLengthReminder()
    logging.getLogger("transformers.generation.stopping_criteria").addFilter(quiet)
    try:
        with rt.calling(B, namespaces, mode="generate", prompt_cols=N, prompt_ids=input_ids, flush_window=flush,
                        progress=progress_bar(rt, N, "memkit prompt", -(-N // rt.config.block_size), progress)), \
                torch.no_grad():
            # Prefill all but the prompt's tail in blocks ourselves; generate() then reads the tail in one step
            # (its retrieval query includes the question at the end of the prompt) and decodes.
            bs = rt.config.block_size
            for s in range(0, N - tail, bs):
                e = min(N - tail, s + bs)
                rt.base(input_ids=input_ids[:, s:e], use_cache=True,
                        attention_mask=None if attention_mask is None else attention_mask[:, :e], **cache_kw)
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, **cache_kw, **kwargs)
    finally:
        logging.getLogger("transformers.generation.stopping_criteria").removeFilter(quiet)
