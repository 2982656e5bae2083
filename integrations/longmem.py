"""LongMem-style memory (Wang et al. 2023, "Augmenting Language Models with Long-Term Memory"): ``style="longmem"``.

What LongMem does, and how memkit runs it through the same wrap / forward / generate / memory APIs as its
MemLong-style path (Liu et al. 2024). Config block: :class:`memkit.styles.LongMemConfig` (``longmem: {...}``).

* **Frozen backbone, one memory layer.** The K/V of one backbone layer (``longmem.layer``, default about two
  thirds of the depth; the paper caches layer 17 of 24) leave the local window chunk by chunk and are cut into
  small chunks of ``longmem.chunk`` tokens (the paper's 4). Each chunk gets one retrieval key *per K/V head*:
  the mean of the chunk's (position-free) keys of that head.
* **Token-to-chunk retrieval.** In the memory-augmented layer every token's query retrieves, per head, the
  chunks with the highest inner product between the query and the chunk-mean key, ``longmem.tokens`` tokens'
  worth (the paper's 64 = 16 chunks of 4). All tokens and all heads of a row go to the MemoryBank in **one**
  search call (``MemoryManager.search_many``): a chunk is stored once, as the concatenation of its per-head
  mean keys (dim ``H * D``), and the query of head ``h`` is the token's query placed in block ``h`` with zeros
  elsewhere, so its inner product with a chunk is exactly ``q_h . kbar_h`` (the metric must be ``ip``).
* **Joint attention.** The local attention (sinks + window + block, causal, one softmax) and the memory
  attention (over the token's own retrieved K/V, its own softmax) are mixed per query head by a trainable
  sigmoid gate: ``out = (1 - g_h) * local + g_h * memory`` with ``g_h = sigmoid(gate_h)``. The gate starts at
  ``gate_init`` (-8: the untrained model is the window-only model up to 3e-4 of the memory term).
* **Positions.** ``longmem.positions="none"`` (LongMem): memory keys and the query meet un-rotated, i.e. with
  no relative position. ``"scheme"``: memory keys are placed by the config's ``position_scheme``
  (``contiguous``: the token's retrieved memory sits just before the window, in time order; ``zero``: all at
  position 0, MemLong's choice; ``original``: where the tokens were in the input).
* **SideNet** (``longmem.sidenet=True``, :mod:`.sidenet`): the memory-augmented layer is a layer of the residual
  SideNet instead of the backbone; the backbone then runs window-only and only feeds its hidden states and the
  memory layer's K/V.

Causality: memory holds only chunks that left the window before the current block, and a token retrieves with
its own query, so no prediction depends on a later token. ``top_k=0`` turns memory off (window only) in this
style too. Trainable parameters live in ``style.trainable`` (``gate`` and optionally ``sidenet``), which the
wrapper registers as ``model.memkit_modules``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from memkit.config import MemoryConfig
from memkit.errors import ConfigError
from memkit.styles import LongMemConfig

from .generate import MemkitCache
from .sidenet import SideNet, decoder_layers, final_norm
from .style import Style

if TYPE_CHECKING:  # pragma: no cover
    from memkit.memory import MemoryManager

    from .context import CallState, Evicted
    from .runtime import Runtime

__all__ = ["LongMemGate", "LongMemStyle", "default_memory_layer"]

TRACE_MAX = 32  # chunks listed in the trace of one retrieval (the most retrieved ones)


def default_memory_layer(num_layers: int) -> int:
    """About two thirds of the depth (LongMem: layer 17 of 24)."""
    return min(num_layers - 1, (2 * num_layers) // 3)


def _side_safe(value: Any) -> Any:
    """A backbone layer argument as a SideNet layer may receive it: a real K/V cache (only the probe has one;
    memkit calls pass the pass-through MemkitCache) must not get the side layers' K/V."""
    if isinstance(value, Cache) and not isinstance(value, MemkitCache):
        return None
    return value


class MemoryReader(nn.Module):
    """Trainable maps of the memory read, per query head: ``query`` (Hq, D, D) turns the layer's position-free query
    into the memory query (retrieval and memory attention both use it), ``value`` (Hq, D, D) maps the memory
    attention's output before the gate mixes it in. Both start at the identity, so the untrained read is LongMem's.

    A map on the query is enough on the key side too: retrieval and attention score ``(q W) . k``, which equals
    ``q . (k W^T)``, so training the query map adapts how the stored (frozen) keys are matched without re-keying
    memory."""

    def __init__(self, heads: int, dim: int, device: torch.device) -> None:
        super().__init__()
        eye = torch.eye(dim, device=device, dtype=torch.float32).expand(heads, dim, dim)
        self.query = nn.Parameter(eye.clone())  # (Hq, D, D)
        self.value = nn.Parameter(eye.clone())  # (Hq, D, D)


class LongMemGate(nn.Module):
    """Per-query-head gate logits; ``weight()`` = sigmoid(logits), shape (Hq,)."""

    def __init__(self, heads: int, init: float, device: torch.device) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.full((heads,), float(init), device=device, dtype=torch.float32))

    def weight(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)  # (Hq,)


@dataclass
class _CallData:
    """LongMem's per-call state: rows that have memory this step, and the SideNet's captured backbone states."""

    mem_rows: list[int] = field(default_factory=list)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # i -> (B, T, d) input of layer 0 / output of i-1
    inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)  # layer i's extra args


class LongMemStyle(Style):
    """The memkit runtime's LongMem strategy; see the module docstring."""

    name = "longmem"

    def __init__(self, rt: Runtime, config: MemoryConfig) -> None:
        super().__init__(rt, config)
        block = self.block
        assert isinstance(block, LongMemConfig)
        self.lm_cfg = block
        L = rt.L
        layer = block.layer if block.layer is not None else default_memory_layer(L)
        if not -L <= layer < L:
            raise ConfigError(f"longmem.layer={block.layer} is outside [0, {L}) for this model")
        self.mem_layer = layer % L
        self.memory_layers = [self.mem_layer]
        self.aug_layer = self.mem_layer  # moved into the SideNet by install() when longmem.sidenet is set
        cfg, c = config, block.chunk
        if cfg.sink_tokens > cfg.chunk_size or cfg.window < cfg.chunk_size:
            raise ConfigError(f"need sink_tokens <= chunk_size <= window, got sink_tokens={cfg.sink_tokens}, "
                              f"chunk_size={cfg.chunk_size}, window={cfg.window}")
        if cfg.chunk_size % c:
            raise ConfigError(f"style='longmem' cuts each window chunk of chunk_size={cfg.chunk_size} tokens into "
                              f"memory chunks of longmem.chunk={c}; make chunk_size a multiple of longmem.chunk")
        if cfg.bank.metric != "ip":
            raise ConfigError(f"style='longmem' retrieves by inner product of query and chunk-mean key (LongMem); "
                              f"set bank metric 'ip', not {cfg.bank.metric!r}")
        self.k_chunks = max(1, block.tokens // c)  # chunks retrieved per token and head
        self.mem_tokens = self.k_chunks * c
        self.contiguous = block.positions == "scheme" and cfg.position_scheme == "contiguous"
        worst = cfg.sink_tokens + (self.mem_tokens if self.contiguous else 0) + cfg.window + cfg.chunk_size - 1 + \
            cfg.block_size
        rt.warn_positions(worst, "sinks + memory + window + chunk_size - 1 + block_size")
        self.sidenet: SideNet | None = None
        self.side_attn: list[nn.Module] = []

    # ------------------------------------------------------------------ set-up
    def install(self) -> None:
        rt, block = self.rt, self.lm_cfg
        text = rt.hf_config.get_text_config(decoder=True)
        heads = int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0))
        self.gate = LongMemGate(heads, block.gate_init, rt.device)
        hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0))
        head_dim = int(getattr(text, "head_dim", 0) or hidden // max(heads, 1))
        self.reader = MemoryReader(heads, head_dim, rt.device)
        mods: dict[str, nn.Module] = {"gate": self.gate, "reader": self.reader}
        if block.sidenet:
            layers = decoder_layers(rt.base, rt.attn)
            self.final_norm = final_norm(rt.base)
            self.sidenet = SideNet(layers, config=rt.hf_config, first_index=rt.L, parity=self.mem_layer % 2)
            self.side_attn = self.sidenet.attention_modules()
            rt.rotary.add_layers(self.sidenet.sources)
            self.aug_layer = rt.L + min(len(self.side_attn) - 1, self.mem_layer // 2)
            for i, layer in enumerate(layers):
                rt.hooks.append(layer.register_forward_pre_hook(self._capture_in(i), with_kwargs=True))
                rt.hooks.append(layer.register_forward_hook(self._capture_out(i), with_kwargs=True))
            mods["sidenet"] = self.sidenet
        self.trainable = nn.ModuleDict(mods)

    def extra_attention(self) -> list[nn.Module]:
        return list(self.side_attn)

    def extra_layers(self) -> list[nn.Module]:
        return list(self.sidenet.layers) if self.sidenet is not None else []

    def make_memory(self) -> MemoryManager:
        from memkit.memory import MemoryManager

        rt, cfg = self.rt, self.config
        mcfg = cfg.replace(chunk_size=self.lm_cfg.chunk, top_k=self.k_chunks, sink_tokens=0)
        return MemoryManager(mcfg, num_layers=1, kv_heads=rt.kv_heads, head_dim=rt.head_dim,
                             embed_dim=rt.kv_heads * rt.head_dim, device=rt.device)

    def describe(self) -> dict[str, Any]:
        return {"memory_layers": [self.mem_layer], "augmented_layer": self.aug_layer,
                "retriever": "longmem-keys", "sidenet": self.sidenet is not None}

    def _capture_in(self, i: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            call = self.rt.current_call()
            if call is None:
                return
            data: _CallData = call.style_data
            kw = {n: _side_safe(v) for n, v in kwargs.items()}
            h = args[0] if args else kw.pop("hidden_states")
            if i == 0:
                data.hidden[0] = h  # (B, T, d) embeddings
            data.inputs[i] = (tuple(_side_safe(a) for a in args[1:]), kw)
        return hook

    def _capture_out(self, i: int) -> Any:
        def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            call = self.rt.current_call()
            if call is not None:
                call.style_data.hidden[i + 1] = output[0] if isinstance(output, tuple) else output  # (B, T, d)
        return hook

    # ------------------------------------------------------------------ steps
    def begin_call(self, call: CallState) -> None:
        call.style_data = _CallData()

    def before_step(self, call: CallState, input_ids: torch.Tensor, blk_valid: torch.Tensor) -> None:
        """Pick the rows that have memory; retrieval itself happens per token in the memory-augmented layer."""
        data: _CallData = call.style_data
        on = self.config.top_k > 0
        data.mem_rows = [r for r in range(call.B) if on and self.rt.memory.num_chunks(call.namespaces[r]) > 0]
        data.hidden.clear()
        data.inputs.clear()
        empty = call.mem_valid[:, :0]
        if data.mem_rows and self.contiguous:
            valid = torch.zeros(call.B, self.mem_tokens, dtype=torch.bool, device=call.device)  # (B, M)
            valid[data.mem_rows] = True  # reserve M positions before the window for each token's memory
            call.set_memory({}, {}, valid, torch.zeros_like(valid, dtype=torch.long), [[] for _ in range(call.B)])
        else:
            call.set_memory({}, {}, empty, call.mem_true_pos[:, :0], [[] for _ in range(call.B)])

    def after_step(self, call: CallState, output: Any) -> None:
        if self.sidenet is None:
            return
        data: _CallData = call.style_data
        L = self.rt.L
        hidden = [data.hidden[i] for i in range(L + 1)]
        inputs = [data.inputs[i] for i in range(L)]
        data.hidden.clear()
        data.inputs.clear()
        output.last_hidden_state = self.final_norm(self.sidenet(hidden, inputs))  # shared norm + LM head

    # ------------------------------------------------------------------ attention
    def attend(self, call: CallState, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               **kwargs: Any) -> torch.Tensor:
        """Local attention for every layer; in the memory-augmented layer, gated joint attention with memory."""
        out = self.rt.attend_context(call, module, query, key, value, None, **kwargs)  # (B, T, Hq, D)
        data: _CallData = call.style_data
        if module.layer_idx != self.aug_layer or call.mode == "probe" or not data.mem_rows:
            return out
        mem, has = self._memory_attention(call, module.layer_idx, query, kwargs.get("scaling"))
        g = self.gate.weight().to(out.dtype)[None, None, :, None] * has[..., None].to(out.dtype)  # (B, T, Hq, 1)
        return out + g * (mem.to(out.dtype) - out)

    def _memory_attention(self, call: CallState, layer: int, query: torch.Tensor, scaling: float | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, Hq, T, D) rotated at the block positions -> memory attention (B, T, Hq, D), has (B, T, Hq)."""
        lay, block, rt = call.layout, self.lm_cfg, self.rt
        assert lay is not None
        B, Hq, T, D = query.shape
        H, k, c = rt.kv_heads, self.k_chunks, block.chunk
        M = k * c
        dev = query.device
        q_free = rt.rotary.rotate(layer, query, lay.blk_pos, inverse=True, tag="blk", cache=call.rope_cache)
        q_mem = torch.einsum("bhtd,hde->bhte", q_free.float(), self.reader.query)  # (B, Hq, T, D) memory query
        heads = torch.arange(Hq, device=dev) // (Hq // H)  # (Hq,) K/V head of each query head
        found = rt.memo(lambda: self._search(call, q_mem, heads))  # replayed as is under gradient checkpointing
        if found is None:
            return torch.zeros(B, T, Hq, D, device=dev), torch.zeros(B, T, Hq, dtype=torch.bool, device=dev)
        P, slots, valid, starts = found  # (U, 2, H, c, D), (B, Hq, T, k) x 3
        hidx = heads[None, :, None, None].expand(B, Hq, T, k)
        mk = P[slots, 0, hidx].reshape(B, Hq, T, M, D)  # position-free memory keys, time order
        mv = P[slots, 1, hidx].reshape(B, Hq, T, M, D)
        mvalid = valid[..., None].expand(B, Hq, T, k, c).reshape(B, Hq, T, M)
        if block.positions == "none":
            q = q_mem  # LongMem: no relative position between a token and its memory
        else:
            q = rt.rotary.rotate(layer, q_mem, lay.blk_pos).float()
            if self.config.position_scheme == "original":
                pos = (starts[..., None] + torch.arange(c, device=dev)).reshape(B * Hq * T, M)
                mk = rt.rotary.rotate(layer, mk.reshape(B * Hq * T, 1, M, D), pos).reshape(B, Hq, T, M, D)
            else:  # contiguous: the positions reserved before the window; zero: MemLong's position 0
                pos = lay.mem_pos if self.config.position_scheme == "contiguous" else \
                    torch.zeros(B, M, dtype=torch.long, device=dev)
                mk = rt.rotary.rotate(layer, mk.reshape(B, Hq * T, M, D), pos[:, :M]).reshape(B, Hq, T, M, D)
        scale = scaling if scaling is not None else D ** -0.5
        w = torch.einsum("bhtd,bhtmd->bhtm", q, mk.float()) * scale  # (B, Hq, T, M)
        w = w.masked_fill(~mvalid, torch.finfo(w.dtype).min).softmax(-1)
        out = torch.einsum("bhtm,bhtmd->bhtd", w, mv.float())  # (B, Hq, T, D)
        out = torch.einsum("bhtd,hde->bhte", out, self.reader.value)  # (B, Hq, T, D)
        has = mvalid.any(-1)  # (B, Hq, T)
        return out.transpose(1, 2), has.transpose(1, 2)

    def _search(self, call: CallState, q_free: torch.Tensor, heads: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Token-to-chunk retrieval of a block: q_free (B, Hq, T, D) -> pages (U, 2, H, c, D) and, per token and
        query head, slot (B, Hq, T, k) into them, valid (B, Hq, T, k) and token start (B, Hq, T, k); None if no
        row has memory."""
        B, Hq, T, D = q_free.shape
        H, k, dev = self.rt.kv_heads, self.k_chunks, q_free.device
        slots = torch.zeros(B, Hq, T, k, dtype=torch.long, device=dev)
        valid = torch.zeros(B, Hq, T, k, dtype=torch.bool, device=dev)
        starts = torch.zeros(B, Hq, T, k, dtype=torch.long, device=dev)
        pages, offset = [], 0
        qf = q_free.detach().float().cpu()  # (B, Hq, T, D)
        for r in call.style_data.mem_rows:
            qv = torch.zeros(Hq, T, H, D)  # each head's query in its K/V head's block
            qv[torch.arange(Hq), :, heads.cpu()] = qf[r]
            got = self.rt.memory.search_many(qv.reshape(Hq * T, H * D).numpy(), call.namespaces[r], k, device=dev,
                                             dtype=torch.float32, trace_max=TRACE_MAX)
            if got is None:
                continue
            ids, slot, pg, st = got  # (n, k), (n, k), (u, 1, 2, H, c, D), (n, k)
            slots[r] = slot.reshape(Hq, T, k).to(dev) + offset
            valid[r] = (ids >= 0).reshape(Hq, T, k).to(dev)
            starts[r] = st.reshape(Hq, T, k).to(dev)
            pages.append(pg[:, 0])  # (u, 2, H, c, D)
            offset += pg.shape[0]
        if not pages:
            return None
        return torch.cat(pages), slots, valid, starts

    # ------------------------------------------------------------------ memory writes
    def store(self, call: CallState, evicted: list[Evicted]) -> None:
        """Cut each evicted window chunk (C tokens) into C / longmem.chunk memory chunks with per-head mean keys;
        of a partial window chunk only its whole memory chunks are kept."""
        c = self.lm_cfg.chunk
        for ev in evicted:
            n, Lm, H, C, D = ev.keys.shape  # (n, 1, H, C, D)
            m = C // c
            keys = ev.keys.reshape(n, Lm, H, m, c, D).permute(0, 3, 1, 2, 4, 5).reshape(n * m, Lm, H, c, D)
            values = ev.values.reshape(n, Lm, H, m, c, D).permute(0, 3, 1, 2, 4, 5).reshape(n * m, Lm, H, c, D)
            emb = keys[:, 0].float().mean(2).reshape(n * m, H * D)  # (n*m, H*D) chunk-mean key per head
            first = ev.spans[:, :1] + call.call_base[ev.row] + torch.arange(m)[None] * c  # (n, m)
            ends = (ev.spans[:, 1:] + call.call_base[ev.row]).expand(n, m)  # (n, m) end of each window chunk
            keep = (first + c <= ends).reshape(-1)  # whole memory chunks only
            if not bool(keep.any()):
                continue
            first = first.reshape(-1)[keep]
            spans = torch.stack([first, first + c], 1)  # (n', 2)
            self.rt.memory.add_chunks(keys[keep], values[keep], emb[keep].cpu().numpy(), spans,
                                      namespace=call.namespaces[ev.row])
