"""Inputs of any length: blockwise forward with a streaming loss, and ``ingest``.

The input is cut into blocks of ``block_size`` tokens; each block is one model forward whose attention
sees sinks + retrieved chunks + window + the block (MemLong, Liu et al. 2024; StreamingLLM sinks, Xiao et al.
2023). The loss is accumulated block by block (the label of a block's last token is the next block's first
token). ``.logits`` follows Hugging Face: one row per input position (B, N, V) unless ``logits_to_keep`` is
given (an int k keeps the last k positions, 0 keeps all; a 1-D tensor keeps those positions), so tools that
read logits per position (lm-evaluation-harness, perplexity scripts) line up. Only the kept rows are ever
held: each block asks the LM head for what it needs, and a request whose logits would not fit in memory is
refused up front with the advice to pass ``logits_to_keep=1`` (memkit's own loss paths do). Pass
``token_losses=True`` (with ``labels``) to also get ``.token_losses`` (B, N): the loss of predicting token i at
column i, NaN where no label applies (column 0, ignored labels); the perplexity of any token range is then one
mean away (``memkit eval ppl --ranges``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from memkit.errors import CapacityError, InvalidInputError

__all__ = ["check_ids", "long_forward", "ingest", "progress_bar"]

_LARGE_LOGITS = 1 << 30  # below 1 GiB of logits, no memory check
_REFUSED = ("past_key_values", "cache", "inputs_embeds", "cache_position")


def check_ids(input_ids: Any, attention_mask: Any, vocab_size: int | None, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate ids (B, N) and mask; returns them as tensors on ``device``."""
    if isinstance(input_ids, (list, tuple)):
        try:
            input_ids = torch.tensor(input_ids, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
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
        attention_mask = _as_int_tensor(attention_mask, "attention_mask")
        if attention_mask.shape == input_ids.shape[1:]:
            attention_mask = attention_mask[None]
        if attention_mask.shape != input_ids.shape:
            raise InvalidInputError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                                    f"{tuple(input_ids.shape)}; pass one 0/1 entry per token")
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise InvalidInputError("attention_mask holds 1 for a token and 0 for padding; other values are not masks")
        attention_mask = attention_mask.to(device)
        if bool(attention_mask.all()):
            attention_mask = None
    return input_ids, attention_mask


def _as_int_tensor(x: Any, name: str) -> torch.Tensor:
    """``x`` as an integer (or bool) tensor, or an InvalidInputError that names ``name``."""
    if not isinstance(x, torch.Tensor):
        if isinstance(x, (str, bytes, dict)) or x is None:
            raise InvalidInputError(f"{name} must be a (batch, tokens) tensor or nested list of integers, got "
                                    f"{type(x).__name__}")
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise InvalidInputError(f"{name} must be a (batch, tokens) tensor of integers: {exc}") from exc
    if x.is_floating_point() or x.is_complex():
        raise InvalidInputError(f"{name} must hold integers, got dtype {x.dtype}")
    return x


def progress_bar(rt: Any, total: int, desc: str, blocks: int, force: bool | None) -> Any:
    """A tqdm bar over ``total`` tokens when ``force`` (or the config's ``progress`` with 16+ blocks) asks for it."""
    show = rt.config.progress if force is None else force
    if not show or (force is None and blocks < 16):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", leave=False)


def _kept_positions(logits_to_keep: Any, N: int, device: torch.device) -> torch.Tensor | None:
    """HF's ``logits_to_keep`` over the whole input: None = every position, else positions (K,) long."""
    if logits_to_keep is None:
        return None
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, torch.Tensor)):
        raise InvalidInputError(f"logits_to_keep must be an int (last k positions, 0 = all) or a 1-D tensor of "
                                f"positions, got {type(logits_to_keep).__name__}")
    if isinstance(logits_to_keep, int):
        if not 0 <= logits_to_keep <= N:
            raise InvalidInputError(f"logits_to_keep={logits_to_keep} is outside [0, {N}] for a {N}-token input: it "
                                    "keeps the last k positions (0 keeps every position)")
        if logits_to_keep in (0, N):
            return None
        return torch.arange(N - logits_to_keep, N, device=device)
    pos = logits_to_keep.to(device=device, dtype=torch.long).reshape(-1)
    if logits_to_keep.dim() != 1 or logits_to_keep.is_floating_point():
        raise InvalidInputError("logits_to_keep as a tensor must be 1-D integer positions")
    if len(pos) and (int(pos.min()) < -N or int(pos.max()) >= N):
        raise InvalidInputError(f"logits_to_keep positions must lie in [-{N}, {N}) for a {N}-token input")
    return torch.where(pos < 0, pos + N, pos)


def _check_logits_fit(B: int, K: int, vocab: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse up front when (B, K, V) logits would take more than half of the free memory of ``device``."""
    need = B * K * vocab * max(4, torch.empty((), dtype=dtype).element_size())
    if need < _LARGE_LOGITS:
        return
    free = None
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            import psutil

            free = psutil.virtual_memory().available
        except ImportError:
            return
    if need > free // 2:
        raise CapacityError(f"logits for {K:,} positions x {vocab:,} vocabulary x batch {B} need {need / 2**30:.1f} "
                            f"GiB ({free / 2**30:.1f} GiB free): pass logits_to_keep=1 (the last position; .loss "
                            "still covers every token) or the positions you need")


def long_forward(rt: Any, input_ids: Any, attention_mask: Any = None, labels: Any = None, *,
                 namespaces: list[str] | None = None, progress: bool | None = None,
                 token_losses: bool = False, logits_to_keep: Any = None, flush_window: bool | None = None,
                 **kwargs: Any) -> Any:
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
        labels = _as_int_tensor(labels, "labels").to(device=rt.device, dtype=torch.long)
        if labels.dim() == 1:
            labels = labels[None]
        if labels.shape != input_ids.shape:
            raise InvalidInputError(f"labels have shape {tuple(labels.shape)}, expected {tuple(input_ids.shape)}")
        if labels.is_floating_point():
            raise InvalidInputError(f"labels must be integer token ids (or -100 to ignore), got {labels.dtype}")
        bad = (labels != -100) & ((labels < 0) | (labels >= (vocab or 1 << 62)))
        if bool(bad.any()):
            raise InvalidInputError(f"labels must be token ids in [0, {vocab}) or -100 (ignored); got "
                                    f"{int(labels[bad][0])}")
    B, N = input_ids.shape
    bs = rt.config.block_size
    starts = list(range(0, N, bs))
    keep_kw = "logits_to_keep" in inspect.signature(rt.lm.forward).parameters
    kept = _kept_positions(logits_to_keep, N, rt.device)  # None = all positions
    if vocab:
        _check_logits_fit(B, N if kept is None else len(kept), int(vocab), rt.dtype, rt.device)
    loss_sum = torch.zeros((), dtype=torch.float32, device=rt.device)
    count = 0
    pieces: list[torch.Tensor] = []  # (B, k_b, V) kept logits of each block, positions in ascending order
    per_token = None
    if token_losses:
        if labels is None:
            raise InvalidInputError("token_losses=True needs labels: pass labels=input_ids")
        per_token = torch.full((B, N), float("nan"), dtype=torch.float32, device=rt.device)  # (B, N)
    order = None if kept is None else torch.sort(kept, stable=True)
    with rt.calling(B, namespaces, mode="forward", prompt_cols=N, flush_window=flush_window,
                    progress=progress_bar(rt, N, "memkit forward", len(starts), progress)):
        for s in starts:
            e = min(N, s + bs)
            call_kw = dict(kwargs)
            if order is None:
                local = None  # every position of the block
            else:
                sel = order.values[(order.values >= s) & (order.values < e)]
                local = sel - s  # (k_b,) positions inside the block
            if keep_kw and labels is None:
                if local is None:
                    call_kw["logits_to_keep"] = 0
                elif len(local) == 0:
                    call_kw["logits_to_keep"] = 1  # nothing kept from this block: skip the LM head but one row
                elif int(local[0]) == e - s - len(local) and bool((local.diff() == 1).all()):
                    call_kw["logits_to_keep"] = len(local)  # a suffix of the block
                    local = local - int(local[0])
            out = model(input_ids=input_ids[:, s:e],
                        attention_mask=None if attention_mask is None else attention_mask[:, s:e],
                        use_cache=False, return_dict=True, **call_kw)
            logits = out.logits  # (B, T or kept suffix, V)
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
            if local is None:
                pieces.append(logits)
            elif len(local):
                pieces.append(logits[:, local.to(logits.device)])
            del out
    loss = None
    if labels is not None:
        loss = loss_sum / count if count else loss_sum * float("nan")
    logits = torch.cat(pieces, 1) if pieces else input_ids.new_zeros(B, 0, int(vocab or 0)).float()  # (B, K, V)
    if order is not None and not bool((order.indices == torch.arange(len(order.indices), device=order.indices.device)
                                       ).all()):
        logits = logits[:, torch.argsort(order.indices).to(logits.device)]  # back to the caller's order
    result = CausalLMOutputWithPast(loss=loss, logits=logits)
    if per_token is not None:
        result.token_losses = per_token
    return result


def ingest(rt: Any, input_ids: torch.Tensor, namespace: str, *, progress: bool | None = None) -> dict[str, Any]:
    """Read ``input_ids`` (1, N) into memory ``namespace``: blockwise decoder forward, then store the whole window
    (the last chunk may be partial), so every token read is in memory afterwards."""
    import time

    N = input_ids.shape[1]
    bs = rt.config.block_size
    t0 = time.perf_counter()
    before = rt.memory.num_chunks(namespace)
    with rt.calling(1, [namespace], mode="ingest", prompt_cols=N, flush_window=True,
                    progress=progress_bar(rt, N, "memkit ingest", -(-N // bs),
                                          rt.config.progress if progress is None else progress)), torch.no_grad():
        for s in range(0, N, bs):
            rt.base(input_ids=input_ids[:, s:s + bs], use_cache=False)
    seconds = time.perf_counter() - t0
    return {"namespace": namespace, "tokens": N, "chunks_added": rt.memory.num_chunks(namespace) - before,
            "seconds": seconds, "tokens_per_s": N / seconds if seconds else float("inf")}
