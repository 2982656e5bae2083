"""Per-call attention context: sinks, retrieved memory, local window, and the block being processed.

For every block (or decode step) the attended context of a row is, in this order,

    [ sinks (first S tokens) | retrieved chunks (retrieval layers only) | window (recent tokens) | block ]

and nothing else. Sinks are StreamingLLM's attention sinks (Xiao et al. 2023): the first few tokens stay
visible forever, which keeps the softmax calibrated (our prototype: perplexity doubles without them).
Retrieved chunks follow MemLong (Liu et al. 2024): chunk-level K/V, put back in time order. The window holds
the most recent ``window`` to ``window + chunk_size - 1`` tokens: tokens leave it one whole chunk at a time,
and each chunk that leaves goes to memory (InfLLM-style offloading, Xiao et al. 2024).

All stored keys are position-free (see :mod:`positions`). Buffers are right-aligned per row (the newest
token of every row is in the last column; a row with fewer tokens has invalid leading columns), so left
padding and rows of different lengths need no special case. Shapes: B rows, H K/V heads, D head dim.

A :class:`CallState` is everything one call (a forward, ``generate`` or ``ingest``) and its steps know: the
buffers above, which namespace each row reads and writes, the mode, the prompt, the progress bar, the thread
that owns the call, the step's layout and rope cache, and the style's own per-call data (``style_data``). The
runtime holds only per-model state; :meth:`CallState.snapshot` freezes one step for checkpoint replay.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Layout", "CallState", "Evicted"]


@dataclass
class Layout:
    """Positions and masks of one step, shared by all layers."""

    T: int
    blk_valid: torch.Tensor  # (B, T) bool
    blk_pos: torch.Tensor  # (B, T) long, the position_ids given to the model
    sink_pos: torch.Tensor  # (B, S) long
    mem_pos: torch.Tensor  # (B, M) long
    win_pos: torch.Tensor  # (B, Wb) long
    mask_local: torch.Tensor  # (B, 1, T, S + Wb + T) bool, True = attend
    mask_mem: torch.Tensor  # (B, 1, T, S + M + Wb + T) bool
    pos_local: torch.Tensor  # (B, S + Wb + T) key positions, for sliding-window layers
    pos_mem: torch.Tensor  # (B, S + M + Wb + T)
    _sliding: dict[tuple[bool, int], torch.Tensor] = field(default_factory=dict)

    def mask(self, with_memory: bool, sliding_window: int | None) -> torch.Tensor:
        base = self.mask_mem if with_memory else self.mask_local
        if not sliding_window:
            return base
        key = (with_memory, int(sliding_window))
        if key not in self._sliding:
            kpos = self.pos_mem if with_memory else self.pos_local  # (B, K)
            near = (self.blk_pos[:, :, None] - kpos[:, None, :]) < int(sliding_window)  # (B, T, K)
            self._sliding[key] = base & near[:, None]
        return self._sliding[key]


@dataclass
class Evicted:
    """Chunks that left the window in one commit, for one row."""

    row: int
    keys: torch.Tensor  # (n, L_mem, H, C, D) position-free
    values: torch.Tensor  # (n, L_mem, H, C, D)
    ids: torch.Tensor  # (n, C) token ids; -1 pads a partial chunk
    spans: torch.Tensor  # (n, 2) token [start, end) in the row's real-token numbering; end - start < C: partial
    retr_keys: torch.Tensor | None  # (n, H, C, D) keys of the retriever layer ("keys" retriever)


def _right_align(valid: torch.Tensor) -> torch.Tensor | None:
    """Column order (B, N) that moves each row's valid entries to the right, stable; None if already so."""
    # Already right-aligned iff valid is non-decreasing along each row.
    if valid.shape[1] < 2 or bool((valid[:, 1:] >= valid[:, :-1]).all()):
        return None
    return torch.sort(valid.to(torch.int8), dim=1, stable=True).indices


def _gather_cols(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x (B, ..., N, D?) reordered along its time axis by order (B, N)."""
    if x.dim() == 2:  # (B, N)
        return torch.gather(x, 1, order)
    b, h, n, d = x.shape  # (B, H, N, D)
    idx = order[:, None, :, None].expand(b, h, n, d)
    return torch.gather(x, 2, idx)


class CallState:
    """Buffers of one call (forward, generate or ingest): window, sinks, retrieved memory, pending K/V."""

    def __init__(self, *, batch: int, num_layers: int, sink_tokens: int, window: int, chunk_size: int,
                 memory_layers: list[int], retriever_layer: int | None, device: torch.device, mode: str = "forward",
                 namespaces: list[str] | None = None, call_base: list[int] | None = None, prompt_cols: int = 0,
                 prompt_ids: torch.Tensor | None = None, progress: Any = None) -> None:
        self.B, self.L, self.S, self.W, self.C = batch, num_layers, sink_tokens, window, chunk_size
        # ---- the call: who, what, where
        self.mode = mode  # "forward", "generate", "ingest" or "probe"
        self.namespaces = list(namespaces) if namespaces is not None else ["default"] * batch  # one per row
        self.call_base = list(call_base) if call_base is not None else [0] * batch  # token offset per row's namespace
        self.prompt_cols = prompt_cols  # columns of the prompt (generate) or input (forward, ingest)
        self.prompt_ids = prompt_ids  # (B, N) generate's prompt: each step must read new tokens
        self.progress = progress  # tqdm bar or None
        self.thread = threading.get_ident()  # the thread that owns the call; others never see its steps
        self.step_active = False  # a decoder step of this call is running
        self.rope_cache: dict[Any, Any] = {}  # cos/sin of this step's positions, shared by all layers
        self.style_data: Any = None  # the style's per-call data (LongMem: rows with memory, captured states)
        self.memory_layers = memory_layers
        self.retriever_layer = retriever_layer
        self.device = device
        self.n_real = torch.zeros(batch, dtype=torch.long)  # real tokens committed per row (CPU)
        # generate: the real tokens each row has read in this call, one (t,) CPU tensor per step (read_ids() joins)
        self._read: list[list[torch.Tensor]] = [[] for _ in range(batch)] if mode == "generate" else []
        self.win_valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)  # (B, Wb)
        self.win_ids = torch.zeros(batch, 0, dtype=torch.long, device=device)  # (B, Wb)
        self.win_k: list[torch.Tensor | None] = [None] * num_layers  # (B, H, Wb, D) position-free
        self.win_v: list[torch.Tensor | None] = [None] * num_layers
        # per row, the window's oldest real tokens this block does not attend (a question reading only its recent
        # tokens: ``reread.recent``); replaced, never edited (snapshots share it), and cleared at each new block
        self.win_hidden: list[int] = [0] * batch
        self.sink_valid = torch.zeros(batch, sink_tokens, dtype=torch.bool, device=device)  # (B, S)
        self.sink_k: list[torch.Tensor | None] = [None] * num_layers  # (B, H, S, D)
        self.sink_v: list[torch.Tensor | None] = [None] * num_layers
        # Retrieved memory of the current step, per stored (memory) layer index: (B, H, M, D) position-free.
        self.mem_k: dict[int, torch.Tensor] = {}
        self.mem_v: dict[int, torch.Tensor] = {}
        self.mem_valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)  # (B, M)
        self.mem_true_pos = torch.zeros(batch, 0, dtype=torch.long, device=device)  # (B, M) original positions
        self.mem_ids: list[list[int]] = [[] for _ in range(batch)]
        # Group-averaged position-free queries of the last C tokens at the retriever layer ("keys" retriever).
        self.q_tail: torch.Tensor | None = None  # (B, H, C', D)
        self.q_tail_valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.pending_k: dict[int, torch.Tensor] = {}  # this step's keys (B, H, T, D), position-free
        self.pending_v: dict[int, torch.Tensor] = {}
        self.pending_q: torch.Tensor | None = None  # (B, H, T, D) at the retriever layer
        # A probe asked for the attention of its last `attend_last` tokens: summed over the global layers (B, T).
        self.attend_last = 0
        self.attention: torch.Tensor | None = None
        self.attention_layers = 0
        self.last_hidden: torch.Tensor | None = None  # (B, hidden) the probe's last final hidden state
        self.layout: Layout | None = None
        self.blk_ids: torch.Tensor | None = None  # (B, T)
        self.cols = 0  # columns (tokens incl. padding) processed so far in this call
        # Blocks: a step starts a new block (memory is retrieved, the window trimmed back to `window` tokens)
        # except while answering (generate after its prompt), where steps continue the block of the prompt's last
        # step until block_size tokens have been read: the answer sees all that the question saw.
        self.new_block = True
        self.block_start_col = 0

    # ----------------------------------------------------------------- layout of one step
    def counts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(s, M, w): valid sinks, retrieved memory tokens and window tokens per row, each (B,) long."""
        return (self.sink_valid.sum(1), self.mem_valid.sum(1), self.win_valid.sum(1))

    def build_layout(self, blk_valid: torch.Tensor, scheme: str, *, include_memory_in_positions: bool) -> Layout:
        """Assign positions to sinks, memory, window and block (B, T) and build the step's masks."""
        dev = self.device
        B, T = blk_valid.shape
        S, Wb, M = self.S, self.win_valid.shape[1], self.mem_valid.shape[1]
        s, m, w = self.counts()
        if not include_memory_in_positions:
            m = torch.zeros_like(m)
        ar_s = torch.arange(S, device=dev).expand(B, S)
        ar_m = torch.arange(M, device=dev).expand(B, M)
        win_off = torch.arange(Wb, device=dev)[None, :] - (Wb - w)[:, None]  # (B, Wb) index inside the window
        win_seen = self.win_valid
        if any(self.win_hidden):  # the oldest window tokens hidden: the rest sit right after memory
            hide = torch.as_tensor(self.win_hidden, device=dev)  # (B,)
            win_seen = self.win_valid & (win_off >= hide[:, None])
            if scheme != "original":
                win_off, w = win_off - hide[:, None], w - hide
        blk_off = blk_valid.long().cumsum(1) - 1  # (B, T)
        if scheme == "original":
            n = self.n_real.to(dev)
            sink_pos = ar_s
            mem_pos = self.mem_true_pos
            win_pos = (n - w)[:, None] + win_off
            blk_pos = n[:, None] + blk_off
        else:
            sink_pos = ar_s
            if scheme == "zero":
                mem_pos = torch.zeros(B, M, dtype=torch.long, device=dev)
                start = s
            else:  # contiguous
                mem_pos = s[:, None] + ar_m
                start = s + m
            win_pos = start[:, None] + win_off
            blk_pos = (start + w)[:, None] + blk_off
        win_pos = win_pos.clamp_min(0)
        blk_pos = blk_pos.clamp_min(0)
        ctx_local = torch.cat([self.sink_valid, win_seen], 1)  # (B, S + Wb)
        ctx_mem = torch.cat([self.sink_valid, self.mem_valid, win_seen], 1)  # (B, S + M + Wb)
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        eye = torch.eye(T, dtype=torch.bool, device=dev)
        blk = (causal[None] & blk_valid[:, None, :]) | eye[None]  # (B, T, T): pad queries see themselves
        mask_local = torch.cat([ctx_local[:, None, :].expand(B, T, -1), blk], 2)[:, None]  # (B, 1, T, K)
        mask_mem = torch.cat([ctx_mem[:, None, :].expand(B, T, -1), blk], 2)[:, None]
        return Layout(
            T=T, blk_valid=blk_valid, blk_pos=blk_pos, sink_pos=sink_pos, mem_pos=mem_pos, win_pos=win_pos,
            mask_local=mask_local, mask_mem=mask_mem,
            pos_local=torch.cat([sink_pos, win_pos, blk_pos], 1),
            pos_mem=torch.cat([sink_pos, mem_pos, win_pos, blk_pos], 1),
        )

    # ----------------------------------------------------------------- memory of the step
    def set_memory(self, mem_k: dict[int, torch.Tensor], mem_v: dict[int, torch.Tensor], valid: torch.Tensor,
                   true_pos: torch.Tensor, ids: list[list[int]]) -> None:
        self.mem_k, self.mem_v, self.mem_valid, self.mem_true_pos, self.mem_ids = mem_k, mem_v, valid, true_pos, ids

    # ----------------------------------------------------------------- retrieval queries
    def query_ids(self, n: int, include_block: bool) -> list[list[int]]:
        """Token ids of the last ``n`` tokens each row may use as its retrieval query."""
        ids, valid = self.win_ids, self.win_valid
        if include_block and self.blk_ids is not None and self.layout is not None:
            ids = torch.cat([ids, self.blk_ids.to(ids.device)], 1)
            valid = torch.cat([valid, self.layout.blk_valid], 1)
        out = []
        for r in range(self.B):
            row = ids[r][valid[r]]
            out.append(row[-n:].tolist())
        return out

    def query_vectors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Mean position-free query (B, H*D) over the last C tokens at the retriever layer, and row validity."""
        if self.q_tail is None:
            return None
        valid = self.q_tail_valid  # (B, C')
        cnt = valid.sum(1)  # (B,)
        wsum = (self.q_tail.float() * valid[:, None, :, None]).sum(2)  # (B, H, D)
        mean = wsum / cnt.clamp_min(1)[:, None, None]
        return mean.reshape(self.B, -1), cnt > 0

    # ----------------------------------------------------------------- blocks
    @property
    def answering(self) -> bool:
        """generate has read its whole prompt: steps now read the tokens it generates."""
        return self.mode == "generate" and self.cols >= self.prompt_cols

    def start_step(self, T: int, block_size: int) -> list[Evicted]:
        """Decide whether the step of ``T`` columns about to run starts a new block (see ``new_block``); returns
        the chunks the window kept while answering that now leave it (the caller stores them)."""
        answering = self.answering
        self.new_block = not answering or self.cols + T - self.block_start_col > block_size
        if not self.new_block:
            return []
        self.block_start_col = self.cols
        self.win_hidden = [0] * self.B
        return self._evict(self.W) if answering else []

    # ----------------------------------------------------------------- commit after a step
    def hide_window(self, r: int, n: int) -> None:
        """Row ``r``'s steps attend its window without its ``n`` oldest real tokens until the next block starts."""
        hidden = list(self.win_hidden)
        hidden[r] = int(n)
        self.win_hidden = hidden

    def commit(self, blk_ids: torch.Tensor) -> list[Evicted]:
        """Append the step's pending K/V to the window, evict whole chunks beyond ``window``; return them.

        While answering nothing is evicted here: the window keeps what the block's first step saw until the next
        block starts (:meth:`start_step`), at most ``window + chunk_size - 1 + block_size`` tokens, the bound of
        any step of the prompt."""
        layout = self.layout
        assert layout is not None
        blk_valid = layout.blk_valid
        valid = torch.cat([self.win_valid, blk_valid], 1)  # (B, Wb + T)
        ids = torch.cat([self.win_ids, torch.where(blk_valid, blk_ids.to(self.device), -1)], 1)
        order = _right_align(valid)
        if order is not None:
            valid, ids = _gather_cols(valid, order), _gather_cols(ids, order)
        for layer in range(self.L):
            k_new, v_new = self.pending_k.pop(layer), self.pending_v.pop(layer)  # (B, H, T, D)
            k_old, v_old = self.win_k[layer], self.win_v[layer]
            k = k_new if k_old is None else torch.cat([k_old, k_new], 2)
            v = v_new if v_old is None else torch.cat([v_old, v_new], 2)
            if order is not None:
                k, v = _gather_cols(k, order), _gather_cols(v, order)
            self.win_k[layer], self.win_v[layer] = k, v
        if self.pending_q is not None:
            self._update_q_tail(self.pending_q, blk_valid)
            self.pending_q = None
        self.win_valid, self.win_ids = valid, ids
        self.n_real += blk_valid.sum(1).cpu()
        self.cols += blk_valid.shape[1]
        for r, steps in enumerate(self._read):
            steps.append(blk_ids[r][blk_valid[r].to(blk_ids.device)].cpu())
        return [] if self.answering else self._evict(self.W)

    def read_ids(self, r: int) -> torch.Tensor | None:
        """(n_real[r],) the real tokens row ``r`` has read in this call, in order (generate only; else None)."""
        if not self._read:
            return None
        steps = self._read[r]
        if len(steps) > 1:
            steps[:] = [torch.cat(steps)]
        return steps[0] if steps else torch.zeros(0, dtype=torch.long)

    def flush(self) -> list[Evicted]:
        """Everything left in the window, as chunks for memory: whole chunks, then a last partial chunk.

        Used at the end of a call (``flush_window``) and by ``ingest``, so all a call read is in memory. The partial
        chunk's pages are zero-padded to ``chunk_size``; its span [start, start + r) says how many tokens are real,
        and readers attend only those. The window is empty afterwards.
        """
        w = self.win_valid.sum(1)  # (B,)
        Wb = self.win_valid.shape[1]
        out = []
        for r in range(self.B):
            w_r = int(w[r])
            n, rest = divmod(w_r, self.C)
            start = Wb - w_r
            if n:
                ev = self._chunk_from_cols(r, start, n)
                self._copy_sinks(r, start, int(ev.spans[0, 0]), n * self.C)
                out.append(ev)
            if rest:
                out.append(self._chunk_from_cols(r, start + n * self.C, 1, tokens=rest))
        self.win_valid, self.win_ids = self.win_valid[:, :0], self.win_ids[:, :0]
        for layer in range(self.L):
            if self.win_k[layer] is not None:
                k, v = self._kv(layer)
                self.win_k[layer], self.win_v[layer] = k[:, :, :0], v[:, :, :0]
        return out

    def snapshot(self) -> CallState:
        """This step frozen for checkpoint replay: later commits replace (never edit) the window and memory tensors,
        except the sinks, written in place once and cloned here (a few tokens). Replayed writes go to fresh dicts."""
        st = copy.copy(self)
        st.win_k, st.win_v = list(self.win_k), list(self.win_v)
        st.sink_k = [None if t is None else t.clone() for t in self.sink_k]
        st.sink_v = [None if t is None else t.clone() for t in self.sink_v]
        st.mem_k, st.mem_v = dict(self.mem_k), dict(self.mem_v)
        st.pending_k, st.pending_v, st.pending_q = {}, {}, None
        st.rope_cache = {}
        st.namespaces, st.call_base = list(self.namespaces), list(self.call_base)
        st.style_data = copy.copy(self.style_data)
        return st

    def _update_q_tail(self, q: torch.Tensor, blk_valid: torch.Tensor) -> None:
        q_all = q if self.q_tail is None else torch.cat([self.q_tail, q], 2)
        v_all = torch.cat([self.q_tail_valid, blk_valid], 1)
        order = _right_align(v_all)
        if order is not None:
            q_all, v_all = _gather_cols(q_all, order), _gather_cols(v_all, order)
        self.q_tail, self.q_tail_valid = q_all[:, :, -self.C:], v_all[:, -self.C:]

    def _kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The window K/V (B, H, Wb, D) of ``layer``, which every commit fills."""
        k, v = self.win_k[layer], self.win_v[layer]
        assert k is not None and v is not None, "the window of this layer was never filled"
        return k, v

    def _chunk_from_cols(self, r: int, start: int, n: int, *, tokens: int | None = None) -> Evicted:
        """Row r's ``n`` chunks starting at window column ``start`` (columns must be valid). ``tokens`` < C makes
        one partial chunk of that many tokens, zero-padded to C (its span is ``tokens`` long)."""
        C = self.C
        if tokens is not None:
            return self._partial_chunk(r, start, tokens)
        stop = start + n * C
        ks = torch.stack([self._kv(l)[0][r, :, start:stop] for l in self.memory_layers], 0)  # (L_mem, H, nC, D)
        vs = torch.stack([self._kv(l)[1][r, :, start:stop] for l in self.memory_layers], 0)
        Lm, H, _, D = ks.shape
        ks = ks.reshape(Lm, H, n, C, D).permute(2, 0, 1, 3, 4)  # (n, L_mem, H, C, D)
        vs = vs.reshape(Lm, H, n, C, D).permute(2, 0, 1, 3, 4)
        rk = None
        if self.retriever_layer is not None:
            rk = self._kv(self.retriever_layer)[0][r, :, start:stop]  # (H, nC, D)
            rk = rk.reshape(H, n, C, D).permute(1, 0, 2, 3)  # (n, H, C, D)
        ids = self.win_ids[r, start:stop].reshape(n, C).clone()
        w_r = int(self.win_valid[r].sum())
        first = int(self.n_real[r]) - w_r + (start - (self.win_valid.shape[1] - w_r))  # token index of column start
        spans = torch.stack([torch.arange(n) * C + first, torch.arange(n) * C + first + C], 1)
        return Evicted(row=r, keys=ks, values=vs, ids=ids, spans=spans, retr_keys=rk)

    def _partial_chunk(self, r: int, start: int, t: int) -> Evicted:
        """Row r's last ``t`` (< C) window tokens from column ``start`` as one chunk padded with zeros to C."""
        C, stop = self.C, start + t

        def pad(x: torch.Tensor) -> torch.Tensor:  # (..., t, D) -> (..., C, D)
            return torch.nn.functional.pad(x, (0, 0, 0, C - t))

        ks = torch.stack([pad(self._kv(l)[0][r, :, start:stop]) for l in self.memory_layers], 0)[None]  # (1, Lm, H, C, D)
        vs = torch.stack([pad(self._kv(l)[1][r, :, start:stop]) for l in self.memory_layers], 0)[None]
        rk = None
        if self.retriever_layer is not None:
            rk = self._kv(self.retriever_layer)[0][r, :, start:stop][None]  # (1, H, t, D): real tokens only
        ids = torch.full((1, C), -1, dtype=torch.long, device=self.win_ids.device)
        ids[0, :t] = self.win_ids[r, start:stop]
        w_r = int(self.win_valid[r].sum())
        first = int(self.n_real[r]) - w_r + (start - (self.win_valid.shape[1] - w_r))
        self._copy_sinks(r, start, first, t)
        return Evicted(row=r, keys=ks, values=vs, ids=ids, spans=torch.tensor([[first, first + t]]), retr_keys=rk)

    def _copy_sinks(self, r: int, start_col: int, first_tok: int, count: int) -> None:
        """Copy window columns holding tokens [first_tok, first_tok+count) ∩ [0, S) into the sink buffers."""
        lo, hi = first_tok, min(first_tok + count, self.S)
        if lo >= hi:
            return
        c0 = start_col + (lo - first_tok)
        for layer in range(self.L):
            k, v = self._kv(layer)
            sk, sv = self.sink_k[layer], self.sink_v[layer]
            if sk is None or sv is None:
                b, h, _, d = k.shape
                sk = self.sink_k[layer] = k.new_zeros(b, h, self.S, d)
                sv = self.sink_v[layer] = v.new_zeros(b, h, self.S, d)
            sk[r, :, lo:hi] = k[r, :, c0:c0 + hi - lo]
            sv[r, :, lo:hi] = v[r, :, c0:c0 + hi - lo]
        self.sink_valid[r, lo:hi] = True

    def _evict(self, keep: int) -> list[Evicted]:
        w = self.win_valid.sum(1)  # (B,)
        n_ev = ((w - keep) // self.C).clamp_min(0)
        if not bool((n_ev > 0).any()):
            return []
        Wb = self.win_valid.shape[1]
        out = []
        for r in range(self.B):
            n = int(n_ev[r])
            if n == 0:
                continue
            start = Wb - int(w[r])
            ev = self._chunk_from_cols(r, start, n)
            self._copy_sinks(r, start, int(ev.spans[0, 0]), n * self.C)
            out.append(ev)
            self.win_valid[r, start:start + n * self.C] = False
            self.win_ids[r, start:start + n * self.C] = -1
        keep_cols = int(self.win_valid.sum(1).max())
        self.win_valid = self.win_valid[:, Wb - keep_cols:]
        self.win_ids = self.win_ids[:, Wb - keep_cols:]
        for layer in range(self.L):
            k, v = self._kv(layer)
            self.win_k[layer], self.win_v[layer] = k[:, :, Wb - keep_cols:], v[:, :, Wb - keep_cols:]
        return out

    def stats(self) -> dict[str, Any]:
        s, m, w = self.counts()
        return {"sinks": s.tolist(), "memory_tokens": m.tolist(), "window": w.tolist(),
                "tokens": self.n_real.tolist()}
