"""Inputs of any length: blockwise forward with a streaming loss, and ``ingest``.

The input is cut into blocks of ``block_size`` tokens; each block is one model forward whose attention
sees sinks + retrieved chunks + window + the block (MemLong, Liu et al. 2024; StreamingLLM sinks, Xiao et al.
2023). The loss is accumulated block by block (the label of a block's last token is the next block's first
token), so logits are never held for the whole input: ``.logits`` of the result holds the logits of the
**last block** only, shape (B, T_last, V) — for inputs of at most ``block_size`` tokens that is every
position, exactly what the plain model returns. Pass ``all_logits=True`` to get (B, N, V) for all tokens
(tests and short inputs). Pass ``token_losses=True`` (with ``labels``) to also get ``.token_losses`` (B, N):
the loss of predicting token i at column i, NaN where no label applies (column 0, ignored labels); the
perplexity of any token range is then one mean away (``memkit eval ppl --ranges``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from memkit.errors import InvalidInputError

__all__ = ["check_ids", "long_forward", "ingest"]

_REFUSED = ("past_key_values", "inputs_embeds", "cache_position")


def check_ids(input_ids: Any, attention_mask: Any, vocab_size: int | None, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate ids (B, N) and mask; returns them as tensors on ``device``."""
    if isinstance(input_ids, (list, tuple)):
        try:
            input_ids = torch.tensor(input_ids, dtype=torch.long)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"input_ids must be a (batch, tokens) integer tensor or nested list: {exc}") \
                from exc
    if not isinstance(input_ids, torch.Tensor):
        raise InvalidInputError(f"input_ids must be a torch tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise InvalidInputError(f"input_ids must have shape (batch, tokens) with tokens >= 1, got "
                                f"{tuple(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise InvalidInputError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if vocab_size and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise InvalidInputError(f"token ids must lie in [0, {vocab_size}) for this model's vocabulary; got "
                                f"min {int(input_ids.min())}, max {int(input_ids.max())} (wrong tokenizer?)")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise InvalidInputError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                                    f"{tuple(input_ids.shape)}; pass one 0/1 entry per token")
        attention_mask = attention_mask.to(device)
        if bool(attention_mask.all()):
            attention_mask = None
    return input_ids, attention_mask


def _progress(rt: Any, total: int, desc: str, blocks: int, force: bool | None) -> Any:
    show = rt.config.progress if force is None else force
    if not show or (force is None and blocks < 16):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", leave=False)


def long_forward(rt: Any, input_ids: Any, attention_mask: Any = None, labels: Any = None, *,
                 all_logits: bool = False, namespaces: list[str] | None = None, progress: bool | None = None,
                 token_losses: bool = False, **kwargs: Any) -> Any:
    """Blockwise forward of the wrapped model; see the module docstring."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    for name in _REFUSED:
        if kwargs.get(name) is not None:
            raise InvalidInputError(f"{name} is not supported by a memkit forward: memkit keeps the context itself; "
                                    "pass input_ids (of any length)")
        kwargs.pop(name, None)
    kwargs.pop("use_cache", None)
    kwargs.pop("return_dict", None)
    model = rt.model
    vocab = getattr(model.config.get_text_config(decoder=True), "vocab_size", None)
    input_ids, attention_mask = check_ids(input_ids, attention_mask, vocab, rt.device)
    if labels is not None:
        labels = torch.as_tensor(labels).to(rt.device)
        if labels.dim() == 1:
            labels = labels[None]
        if labels.shape != input_ids.shape:
            raise InvalidInputError(f"labels have shape {tuple(labels.shape)}, expected {tuple(input_ids.shape)}")
    B, N = input_ids.shape
    bs = rt.config.block_size
    starts = list(range(0, N, bs))
    keep_kw = "logits_to_keep" in inspect.signature(model.forward).parameters
    user_keep = kwargs.pop("logits_to_keep", None)
    loss_sum = torch.zeros((), dtype=torch.float32, device=rt.device)
    count = 0
    pieces: list[torch.Tensor] = []
    per_token = None
    if token_losses:
        if labels is None:
            raise InvalidInputError("token_losses=True needs labels: pass labels=input_ids")
        per_token = torch.full((B, N), float("nan"), dtype=torch.float32, device=rt.device)  # (B, N)
    last = None
    rt.begin_call(B, namespaces, mode="forward", prompt_cols=N,
                  progress=_progress(rt, N, "memkit forward", len(starts), progress))
    try:
        for s in starts:
            e = min(N, s + bs)
            call_kw = dict(kwargs)
            final = e == N
            if keep_kw and labels is None and not all_logits and not final:
                call_kw["logits_to_keep"] = 1  # earlier blocks' logits are thrown away: skip the LM head
            elif keep_kw and final and user_keep is not None and labels is None:
                call_kw["logits_to_keep"] = user_keep
            out = model(input_ids=input_ids[:, s:e],
                        attention_mask=None if attention_mask is None else attention_mask[:, s:e],
                        use_cache=False, return_dict=True, **call_kw)
            logits = out.logits  # (B, T, V)
            if labels is not None:
                target = labels[:, s + 1:e + 1]  # (B, T') with T' = T or T - 1 on the last block
                lg = logits[:, :target.shape[1]].float()
                each = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), target.reshape(-1), ignore_index=-100,
                                       reduction="none").reshape(target.shape)  # (B, T'); 0 where ignored
                loss_sum = loss_sum + each.sum()
                count += int((target != -100).sum())
                if per_token is not None:
                    per_token[:, s + 1:s + 1 + target.shape[1]] = each.detach().masked_fill(target == -100,
                                                                                           float("nan"))
            if all_logits:
                pieces.append(logits)
            last = logits
            del out
    finally:
        rt.end_call()
    loss = None
    if labels is not None:
        loss = loss_sum / count if count else loss_sum * float("nan")
    result = CausalLMOutputWithPast(loss=loss, logits=torch.cat(pieces, 1) if all_logits else last)
    if per_token is not None:
        result.token_losses = per_token
    return result


def ingest(rt: Any, input_ids: torch.Tensor, namespace: str, *, progress: bool | None = None) -> dict[str, Any]:
    """Read ``input_ids`` (1, N) into memory ``namespace``: blockwise decoder forward, then flush the window."""
    import time
    import warnings

    N = input_ids.shape[1]
    bs = rt.config.block_size
    t0 = time.perf_counter()
    before = rt.memory.num_chunks(namespace)
    rt.begin_call(1, [namespace], mode="ingest", prompt_cols=N,
                  progress=_progress(rt, N, "memkit ingest", -(-N // bs),
                                     rt.config.progress if progress is None else progress))
    try:
        with torch.no_grad():
            for s in range(0, N, bs):
                rt.base(input_ids=input_ids[:, s:s + bs], use_cache=False)
            state = rt.state
            rest = state.flush()
            if rest:
                rt._store(rest)
    finally:
        rt.end_call()
    if N < rt.config.chunk_size:
        warnings.warn(f"ingest: {N} tokens are fewer than chunk_size={rt.config.chunk_size}; nothing was stored "
                      "(pages hold whole chunks)", stacklevel=3)
    seconds = time.perf_counter() - t0
    return {"namespace": namespace, "tokens": N, "chunks_added": rt.memory.num_chunks(namespace) - before,
            "seconds": seconds, "tokens_per_s": N / seconds if seconds else float("inf")}
