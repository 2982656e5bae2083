"""LongMem-style memory (Wang et al. 2023, "Augmenting Language Models with Long-Term Memory"): ``style="longmem"``.

What LongMem does, and how memkit runs it through the same wrap / forward / generate / memory APIs as its
MemLong-style path (Liu et al. 2024):

* **Frozen backbone, one memory layer.** The K/V of one backbone layer (``longmem_layer``, default about two
  thirds of the depth; the paper caches layer 17 of 24) leave the local window chunk by chunk and are cut into
  small chunks of ``longmem_chunk`` tokens (the paper's 4). Each chunk gets one retrieval key *per K/V head*:
  the mean of the chunk's (position-free) keys of that head.
* **Token-to-chunk retrieval.** In the memory-augmented layer every token's query retrieves, per head, the
  chunks with the highest inner product between the query and the chunk-mean key, ``longmem_tokens`` tokens'
  worth (the paper's 64 = 16 chunks of 4). All tokens and all heads of a row go to the MemoryBank in **one**
  search call: a chunk is stored once, as the concatenation of its per-head mean keys (dim ``H * D``), and the
  query of head ``h`` is the token's query placed in block ``h`` with zeros elsewhere, so its inner product
  with a chunk is exactly ``q_h . kbar_h`` (the metric must be ``ip``).
* **Joint attention.** The local attention (sinks + window + block, causal, one softmax) and the memory
  attention (over the token's own retrieved K/V, its own softmax) are mixed per query head by a trainable
  sigmoid gate: ``out = (1 - g_h) * local + g_h * memory`` with ``g_h = sigmoid(gate_h)``. The gate starts at
  ``gate_init`` (-8: the untrained model is the window-only model up to 3e-4 of the memory term).
* **Positions.** ``longmem_positions="none"`` (LongMem): memory keys and the query meet un-rotated, i.e. with
  no relative position. ``"scheme"``: memory keys are placed by the MemLong path's ``position_scheme``
  (``contiguous``: the token's retrieved memory sits just before the window, in time order; ``zero``: all at
  position 0, MemLong's choice; ``original``: where the tokens were in the input).
* **SideNet** (``sidenet=True``, :mod:`memkit.integrations.sidenet`): the memory-augmented layer is a layer of
  the residual SideNet instead of the backbone; the backbone then runs window-only and only feeds its hidden
  states and the memory layer's K/V.

Causality: memory holds only chunks that left the window before the current block, and a token retrieves with
its own query, so no prediction depends on a later token. ``top_k=0`` turns memory off (window only) in this
style too. Trainable parameters live in ``runtime.trainable`` (``gate`` and optionally ``sidenet``), which the
wrapper registers as ``model.memkit_modules``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from memkit.integrations.generate import MemkitCache
from memkit.integrations.runtime import Runtime
from memkit.integrations.sidenet import SideNet, decoder_layers, final_norm
from torch import nn
from transformers.cache_utils import Cache

from memkit._arrays import as_vectors
from memkit.config import MemoryConfig
from memkit.errors import ConfigError
from memkit.memory import MemoryManager

__all__ = ["LongMemGate", "LongMemManager", "LongMemRuntime", "default_memory_layer"]

_TRACE_MAX = 32  # chunks listed in the trace of one retrieval (the most retrieved ones)


def default_memory_layer(num_layers: int) -> int:
    """About two thirds of the depth (LongMem: layer 17 of 24)."""
    return min(num_layers - 1, (2 * num_layers) // 3)


def _side_safe(value: Any) -> Any:
    """A backbone layer argument as a SideNet layer may receive it: a real K/V cache (only the probe has one;
    memkit calls pass the pass-through MemkitCache) must not get the side layers' K/V."""
    if isinstance(value, Cache) and not isinstance(value, MemkitCache):
        return None
    return value


class LongMemGate(nn.Module):
    """Per-query-head gate logits; ``weight()`` = sigmoid(logits), shape (Hq,)."""

    def __init__(self, heads: int, init: float, device: torch.device) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.full((heads,), float(init), device=device, dtype=torch.float32))

    def weight(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)  # (Hq,)


class LongMemManager(MemoryManager):
    """MemoryManager whose bank holds one vector per chunk: the per-head chunk-mean keys, concatenated (H*D).

    Pages are (1, 2, H, longmem_chunk, D). Adds :meth:`search_chunks`, the batched token-to-chunk retrieval.
    Everything else (namespaces, tiers, policy, save/load, stats) is the MemoryManager's.
    """

    def search_chunks(self, queries: np.ndarray, namespace: str, k: int, *, device: torch.device,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """One bank search for n queries (n, H*D). Returns None when the namespace is empty, else
        ids (n, k) int64 ascending (= insertion/time order, -1 pads last), slot (n, k) long index into
        pages (pads -> 0), pages (u, 2, H, c, D) on ``device``, starts (n, k) long token start of each chunk."""
        q = as_vectors(queries, self.embed_dim, name="longmem queries")  # (n, H*D)
        with self._lock:
            ns = self._ns.get(namespace)
            if ns is None or not ns.spans:
                return None
            scores, raw = ns.bank.search(q, k)  # (n, k), (n, k)
            big = np.iinfo(np.int64).max
            ids = np.sort(np.where(raw >= 0, raw, big), axis=1)
            ok = ids != big
            uniq = np.unique(ids[ok])  # (u,)
            slot = np.searchsorted(uniq, np.where(ok, ids, uniq[0]))  # (n, k)
            ids = np.where(ok, ids, -1)
            pages = self.store.get(uniq, device, dtype=dtype)[:, 0]  # (u, 2, H, c, D)
            starts = np.asarray([ns.spans[int(i)][0] for i in uniq], np.int64)[slot]  # (n, k)
            ns.policy.on_retrieve(uniq)
            hits = np.bincount(slot[ok], minlength=len(uniq))  # how many (token, head) queries chose each chunk
            best = np.full(len(uniq), -np.inf, np.float32)
            np.maximum.at(best, np.searchsorted(uniq, raw[raw >= 0]), scores[raw >= 0])
            top = sorted(np.argsort(-hits, kind="stable")[:_TRACE_MAX].tolist(), key=lambda j: int(uniq[j]))
            rank = {j: t for t, j in enumerate(np.argsort(-hits, kind="stable")[:_TRACE_MAX].tolist())}
            ns.trace = [{"id": int(uniq[j]), "score": float(best[j]) if np.isfinite(best[j]) else None,
                         "hits": int(hits[j]), "span": list(ns.spans[int(uniq[j])]),
                         "text": ns.texts.get(int(uniq[j])), "rank": rank[j]} for j in top]
            self._counters["retrievals"] += 1
        return (torch.from_numpy(ids), torch.from_numpy(slot).long(), pages, torch.from_numpy(starts))


class LongMemRuntime(Runtime):
    """The memkit runtime with LongMem's memory; see the module docstring."""

    # ------------------------------------------------------------------ set-up
    def _resolve_layers(self) -> None:
        cfg, L = self.config, self.L
        layer = cfg.longmem_layer if cfg.longmem_layer is not None else default_memory_layer(L)
        if not isinstance(layer, int) or not -L <= layer < L:
            raise ConfigError(f"longmem_layer={cfg.longmem_layer} is outside [0, {L}) for this model")
        self.mem_layer = layer % L
        self.memory_layers, self.retrieval_layers, self.stored_index = [self.mem_layer], [], {}
        self.retriever_layer = self.mem_layer
        self.aug_layer = self.mem_layer  # moved into the SideNet by _install when sidenet=True
        c = cfg.longmem_chunk
        if cfg.sink_tokens > cfg.chunk_size or cfg.window < cfg.chunk_size:
            raise ConfigError(f"need sink_tokens <= chunk_size <= window, got sink_tokens={cfg.sink_tokens}, "
                              f"chunk_size={cfg.chunk_size}, window={cfg.window}")
        if cfg.chunk_size % c:
            raise ConfigError(f"style='longmem' cuts each window chunk of chunk_size={cfg.chunk_size} tokens into "
                              f"memory chunks of longmem_chunk={c}; make chunk_size a multiple of longmem_chunk")
        if cfg.bank.metric != "ip":
            raise ConfigError(f"style='longmem' retrieves by inner product of query and chunk-mean key (LongMem); "
                              f"set bank metric 'ip', not {cfg.bank.metric!r}")
        self.k_chunks = max(1, cfg.longmem_tokens // c)  # chunks retrieved per token and head
        self.mem_tokens = self.k_chunks * c
        contiguous = cfg.longmem_positions == "scheme" and cfg.position_scheme == "contiguous"
        worst = cfg.sink_tokens + (self.mem_tokens if contiguous else 0) + cfg.window + cfg.chunk_size - 1 + \
            cfg.block_size
        if self.max_positions and worst > self.max_positions and cfg.position_scheme != "original":
            msg = (f"sinks + memory + window + chunk_size - 1 + block_size = {worst} exceeds the model's "
                   f"{self.max_positions} positions; lower window or block_size")
            if not self.rotary.enabled:
                raise ConfigError(msg)
            warnings.warn(msg, stacklevel=3)

    def _install(self) -> None:
        cfg = self.config
        text = self.hf_config.get_text_config(decoder=True)
        heads = int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0))
        dev = next(self.model.parameters()).device
        self.gate = LongMemGate(heads, cfg.gate_init, dev)
        self._mem_rows: list[int] = []
        self._cap_h: dict[int, torch.Tensor] = {}
        self._cap_in: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        mods: dict[str, nn.Module] = {"gate": self.gate}
        self.sidenet: SideNet | None = None
        if cfg.sidenet:
            layers = decoder_layers(self.base, self.attn)
            self.final_norm = final_norm(self.base)
            self.sidenet = SideNet(layers, config=self.hf_config, first_index=self.L, parity=self.mem_layer % 2)
            self.side_attn = self.sidenet.attention_modules()
            for m in self.side_attn:
                m._memkit_runtime = self
            self.rotary.layers.extend(self.rotary.layers[s] for s in self.sidenet.sources)
            self.aug_layer = self.L + min(len(self.side_attn) - 1, self.mem_layer // 2)
            for i, layer in enumerate(layers):
                self._hooks.append(layer.register_forward_pre_hook(self._capture_in(i), with_kwargs=True))
                self._hooks.append(layer.register_forward_hook(self._capture_out(i), with_kwargs=True))
            mods["sidenet"] = self.sidenet
        self.trainable = nn.ModuleDict(mods)
        super()._install()

    def _capture_in(self, i: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not self.step_active:
                return
            kw = {n: _side_safe(v) for n, v in kwargs.items()}
            h = args[0] if args else kw.pop("hidden_states")
            if i == 0:
                self._cap_h[0] = h  # (B, T, d) embeddings
            self._cap_in[i] = (tuple(_side_safe(a) for a in args[1:]), kw)
        return hook

    def _capture_out(self, i: int) -> Any:
        def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            if self.step_active:
                self._cap_h[i + 1] = output[0] if isinstance(output, tuple) else output  # (B, T, d)
        return hook

    def _pick_retriever(self) -> str:
        return "longmem-keys"

    def _make_memory(self) -> Any:
        cfg = self.config
        mcfg = MemoryConfig.from_dict(dict(cfg.to_dict(), chunk_size=cfg.longmem_chunk, top_k=self.k_chunks))
        return LongMemManager(mcfg, num_layers=1, kv_heads=self.kv_heads, head_dim=self.head_dim,
                              embed_dim=self.kv_heads * self.head_dim, device=self.device)

    def remove(self) -> None:
        for m in getattr(self, "side_attn", []):
            if getattr(m, "_memkit_runtime", None) is self:
                del m._memkit_runtime
        super().remove()

    # ------------------------------------------------------------------ steps
    def begin_call(self, batch: int, namespaces: list[str] | None, **kwargs: Any) -> None:
        super().begin_call(batch, namespaces, **kwargs)
        if self.sidenet is not None:  # side layers get their own window / sink slots after the backbone's
            st, n = self.state, len(self.sidenet.layers)
            assert st is not None
            st.L = self.L + n
            for buf in (st.win_k, st.win_v, st.sink_k, st.sink_v):
                buf.extend([None] * n)

    def end_call(self) -> None:
        self._cap_h.clear()
        self._cap_in.clear()
        self._mem_rows = []
        super().end_call()

    def _maybe_retrieve(self, state: Any, input_ids: torch.Tensor, blk_valid: torch.Tensor) -> None:
        """Pick the rows that have memory; retrieval itself happens per token in the memory-augmented layer."""
        cfg = self.config
        on = cfg.top_k > 0
        self._mem_rows = [r for r in range(state.B) if on and self.memory.num_chunks(self.namespaces[r]) > 0]
        empty = state.mem_valid[:, :0]
        if self._mem_rows and cfg.longmem_positions == "scheme" and cfg.position_scheme == "contiguous":
            valid = torch.zeros(state.B, self.mem_tokens, dtype=torch.bool, device=state.device)  # (B, M)
            valid[self._mem_rows] = True  # reserve M positions before the window for each token's memory
            state.set_memory({}, {}, valid, torch.zeros_like(valid, dtype=torch.long), [[] for _ in range(state.B)])
        else:
            state.set_memory({}, {}, empty, state.mem_true_pos[:, :0], [[] for _ in range(state.B)])

    def _post_hook(self, module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        if not self.step_active:
            return None
        if self.sidenet is not None:
            L = self.L
            hidden = [self._cap_h[i] for i in range(L + 1)]
            inputs = [self._cap_in[i] for i in range(L)]
            self._cap_h.clear()
            self._cap_in.clear()
            output.last_hidden_state = self.final_norm(self.sidenet(hidden, inputs))  # shared norm + LM head
        super()._post_hook(module, args, kwargs, output)
        return output

    # ------------------------------------------------------------------ attention
    def attend(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
        """Local attention for every layer; in the memory-augmented layer, gated joint attention with memory."""
        out, _ = super().attend(module, query, key, value, **kwargs)  # (B, T, Hq, D)
        if module.layer_idx != self.aug_layer or self.mode == "probe" or not self._mem_rows:
            return out, None
        mem, has = self._memory_attention(module.layer_idx, query, kwargs.get("scaling"))
        g = self.gate.weight().to(out.dtype)[None, None, :, None] * has[..., None].to(out.dtype)  # (B, T, Hq, 1)
        return out + g * (mem.to(out.dtype) - out), None

    def _memory_attention(self, layer: int, query: torch.Tensor, scaling: float | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, Hq, T, D) rotated at the block positions -> memory attention (B, T, Hq, D), has (B, T, Hq)."""
        state = self.state
        assert state is not None and state.layout is not None
        lay, cfg = state.layout, self.config
        B, Hq, T, D = query.shape
        H, k, c = self.kv_heads, self.k_chunks, cfg.longmem_chunk
        M = k * c
        dev = query.device
        q_free = self.rotary.rotate(layer, query, lay.blk_pos, inverse=True, tag="blk")  # (B, Hq, T, D)
        heads = torch.arange(Hq, device=dev) // (Hq // H)  # (Hq,) K/V head of each query head
        replay = getattr(self, "_ckpt_replay", None)  # gradient checkpointing: backward replays this search
        found = replay.memo(lambda: self._search(q_free, heads)) if replay is not None else \
            self._search(q_free, heads)
        if found is None:
            return torch.zeros(B, T, Hq, D, device=dev), torch.zeros(B, T, Hq, dtype=torch.bool, device=dev)
        P, slots, valid, starts = found  # (U, 2, H, c, D), (B, Hq, T, k) x 3
        hidx = heads[None, :, None, None].expand(B, Hq, T, k)
        mk = P[slots, 0, hidx].reshape(B, Hq, T, M, D)  # position-free memory keys, time order
        mv = P[slots, 1, hidx].reshape(B, Hq, T, M, D)
        mvalid = valid[..., None].expand(B, Hq, T, k, c).reshape(B, Hq, T, M)
        if cfg.longmem_positions == "none":
            q = q_free.float()  # LongMem: no relative position between a token and its memory
        else:
            q = query.float()
            if cfg.position_scheme == "original":
                pos = (starts[..., None] + torch.arange(c, device=dev)).reshape(B * Hq * T, M)
                mk = self.rotary.rotate(layer, mk.reshape(B * Hq * T, 1, M, D), pos).reshape(B, Hq, T, M, D)
            else:  # contiguous: the positions reserved before the window; zero: MemLong's position 0
                pos = lay.mem_pos if cfg.position_scheme == "contiguous" else torch.zeros(B, M, dtype=torch.long,
                                                                                           device=dev)
                mk = self.rotary.rotate(layer, mk.reshape(B, Hq * T, M, D), pos[:, :M]).reshape(B, Hq, T, M, D)
        scale = scaling if scaling is not None else D ** -0.5
        w = torch.einsum("bhtd,bhtmd->bhtm", q, mk.float()) * scale  # (B, Hq, T, M)
        w = w.masked_fill(~mvalid, torch.finfo(w.dtype).min).softmax(-1)
        out = torch.einsum("bhtm,bhtmd->bhtd", w, mv.float())  # (B, Hq, T, D)
        has = mvalid.any(-1)  # (B, Hq, T)
        return out.transpose(1, 2), has.transpose(1, 2)

    def _search(self, q_free: torch.Tensor, heads: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Token-to-chunk retrieval of a block: q_free (B, Hq, T, D) -> pages (U, 2, H, c, D) and, per token and
        query head, slot (B, Hq, T, k) into them, valid (B, Hq, T, k) and token start (B, Hq, T, k); None if no
        row has memory."""
        B, Hq, T, D = q_free.shape
        H, k, dev = self.kv_heads, self.k_chunks, q_free.device
        slots = torch.zeros(B, Hq, T, k, dtype=torch.long, device=dev)
        valid = torch.zeros(B, Hq, T, k, dtype=torch.bool, device=dev)
        starts = torch.zeros(B, Hq, T, k, dtype=torch.long, device=dev)
        pages, offset = [], 0
        qf = q_free.detach().float().cpu()  # (B, Hq, T, D)
        for r in self._mem_rows:
            qv = torch.zeros(Hq, T, H, D)  # each head's query in its K/V head's block
            qv[torch.arange(Hq), :, heads.cpu()] = qf[r]
            got = self.memory.search_chunks(qv.reshape(Hq * T, H * D).numpy(), self.namespaces[r], k,
                                            device=dev, dtype=torch.float32)
            if got is None:
                continue
            ids, slot, pg, st = got  # (n, k), (n, k), (u, 2, H, c, D), (n, k)
            slots[r] = slot.reshape(Hq, T, k).to(dev) + offset
            valid[r] = (ids >= 0).reshape(Hq, T, k).to(dev)
            starts[r] = st.reshape(Hq, T, k).to(dev)
            pages.append(pg)
            offset += pg.shape[0]
        if not pages:
            return None
        return torch.cat(pages), slots, valid, starts

    # ------------------------------------------------------------------ memory writes
    def _store(self, evicted: list[Any]) -> None:
        """Cut each evicted window chunk (C tokens) into C / longmem_chunk memory chunks with per-head mean keys."""
        c = self.config.longmem_chunk
        for ev in evicted:
            n, Lm, H, C, D = ev.keys.shape  # (n, 1, H, C, D)
            m = C // c
            keys = ev.keys.reshape(n, Lm, H, m, c, D).permute(0, 3, 1, 2, 4, 5).reshape(n * m, Lm, H, c, D)
            values = ev.values.reshape(n, Lm, H, m, c, D).permute(0, 3, 1, 2, 4, 5).reshape(n * m, Lm, H, c, D)
            emb = keys[:, 0].float().mean(2).reshape(n * m, H * D)  # (n*m, H*D) chunk-mean key per head
            first = ev.spans[:, :1] + torch.arange(m)[None] * c  # (n, m)
            spans = torch.stack([first.reshape(-1), first.reshape(-1) + c], 1)  # (n*m, 2)
            self.memory.add_chunks(keys, values, emb.cpu().numpy(), spans, namespace=self.namespaces[ev.row])
