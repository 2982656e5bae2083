"""MemLong-style memory (Liu et al. 2024, "MemLong: Memory-Augmented Retrieval for Long Text Modeling").

``style="memlong"`` (the default): chunks of ``chunk_size`` tokens that leave the local window are stored with
the K/V of the memory layers (position-free) and one retrieval embedding per chunk. Before each block, one query
per row (the text before the block, embedded by the registered retriever; or the mean of recent queries at
``retriever_layer`` for the ``keys`` retriever) fetches the ``top_k`` chunks, and the retrieval layers attend to
[sinks | retrieved chunks in time order | window | block] under one causal softmax (MemLong's retrieval causal
attention). Chunks already inside this call's sinks are skipped (they are attended anyway), so the trace lists
exactly the chunks attended. Config block: :class:`memkit.styles.MemLongConfig`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from memkit.config import resolve_layers
from memkit.errors import ConfigError
from memkit.retrieval import RowRequest
from memkit.retrievers import make_retriever, retriever_input
from memkit.styles import MemLongConfig

from .style import Style

if TYPE_CHECKING:  # pragma: no cover
    from memkit.config import MemoryConfig
    from memkit.memory import MemoryManager, Retrieved
    from memkit.retrieval import Reread

    from .context import CallState, Evicted
    from .runtime import Runtime

__all__ = ["MemLongStyle"]


class MemLongStyle(Style):
    """Retrieved chunk K/V joined with the local context under one softmax; see the module docstring."""

    name = "memlong"

    def __init__(self, rt: Runtime, config: MemoryConfig) -> None:
        super().__init__(rt, config)
        block = self.block
        assert isinstance(block, MemLongConfig)
        L = rt.L
        layer_types = getattr(rt.hf_config.get_text_config(decoder=True), "layer_types", None)
        sliding = set()
        if layer_types and "full_attention" in layer_types:
            sliding = {i for i, t in enumerate(layer_types) if t != "full_attention"}
        self.memory_layers = resolve_layers(block.memory_layers, L)
        if sliding and isinstance(block.memory_layers, str):  # named specs: keep global-attention layers only
            kept = [i for i in self.memory_layers if i not in sliding]
            self.memory_layers = kept or [max(i for i in range(L) if i not in sliding)]
        spec = block.retrieval_layers if block.retrieval_layers is not None else self.memory_layers
        self.retrieval_layers = resolve_layers(spec, L)
        if sliding and isinstance(block.retrieval_layers, str):
            self.retrieval_layers = [i for i in self.retrieval_layers if i not in sliding] or self.memory_layers
        # Each retrieval layer reads the K/V of a stored layer: its own when stored (default), otherwise the
        # nearest memory layer below it (MemLong's setup: one middle layer's K/V feed all upper layers).
        self.stored_index: dict[int, int] = {}
        for layer in self.retrieval_layers:
            if layer in self.memory_layers:
                self.stored_index[layer] = self.memory_layers.index(layer)
            else:
                below = [j for j, m in enumerate(self.memory_layers) if m < layer]
                self.stored_index[layer] = below[-1] if below else 0
        self.retriever_layer = block.retriever_layer if block.retriever_layer is not None else L // 2
        if not 0 <= self.retriever_layer < L:
            raise ConfigError(f"memlong.retriever_layer={block.retriever_layer} is outside [0, {L}) for this model")
        cfg = config
        if cfg.sink_tokens > cfg.chunk_size or cfg.window < cfg.chunk_size:
            raise ConfigError(f"need sink_tokens <= chunk_size <= window, got sink_tokens={cfg.sink_tokens}, "
                              f"chunk_size={cfg.chunk_size}, window={cfg.window}")
        worst = cfg.sink_tokens + cfg.top_k * cfg.chunk_size + cfg.window + cfg.chunk_size - 1 + cfg.block_size
        rt.warn_positions(worst, "sink_tokens + top_k*chunk_size + window + chunk_size - 1 + block_size")
        kind = cfg.retriever
        if kind == "auto":
            kind = "text" if rt.tokenizer is not None else "keys"
        self.retriever_name = kind
        self.retriever_kind = retriever_input(kind)  # "text" or "keys": what the retriever embeds
        if self.retriever_kind == "text" and rt.tokenizer is None:
            raise ConfigError(f"retriever={kind!r} embeds chunk text and needs a tokenizer: "
                              "memkit.wrap(model, tokenizer=tok)")

    # ------------------------------------------------------------------ set-up
    def query_layer(self) -> int | None:
        return self.retriever_layer if self.retriever_kind == "keys" else None

    def make_memory(self) -> MemoryManager:
        from memkit.memory import MemoryManager

        rt = self.rt
        key_dim = rt.kv_shapes[self.retriever_layer][0] * rt.kv_shapes[self.retriever_layer][1]
        retriever = make_retriever(self.retriever_name, key_dim=key_dim)
        return MemoryManager(self.config, num_layers=len(self.memory_layers), kv_heads=rt.kv_heads,
                             head_dim=rt.head_dim, embed_dim=int(retriever.dim), device=rt.device, retriever=retriever)

    def describe(self) -> dict[str, Any]:
        return {"memory_layers": list(self.memory_layers), "retrieval_layers": list(self.retrieval_layers),
                "retriever": self.retriever_name}

    # ------------------------------------------------------------------ reading memory
    def before_step(self, call: CallState, input_ids: torch.Tensor, blk_valid: torch.Tensor) -> None:
        cfg = self.config
        if cfg.top_k == 0 or not self.retrieval_layers:
            return
        if not call.new_block:
            return  # answering: keep the chunks retrieved for this block (the question's) for a block's worth of tokens
        # generate's last prompt step (the question) and its answer steps: the question step's pipeline, whose
        # queries read the tokens of the step too
        question = call.mode == "generate" and call.cols + input_ids.shape[1] >= call.prompt_cols
        memory = self.rt.memory
        rows = [r for r in range(call.B) if memory.num_chunks(call.namespaces[r]) > 0]
        if not rows:
            call.set_memory({}, {}, call.mem_valid[:, :0], call.mem_true_pos[:, :0], [[] for _ in range(call.B)])
            return
        requests = self._requests(call, rows, input_ids, blk_valid, question)
        step = "question" if question else "block"
        got = memory.retrieve_step(requests, step, device=call.device, dtype=self.rt.dtype, reader=self.rt.reader,
                                   decode=self.rt.tokenizer.decode if self.rt.tokenizer is not None else None)
        found = {r: row for r, row in zip(rows, got) if row.result is not None and len(row.result) > 0}
        self._set_memory(call, {r: row.result for r, row in found.items()})  # type: ignore[misc]
        for r, row in found.items():
            if row.reread is not None:
                self._put_reread(call, r, row.reread)

    def _requests(self, call: CallState, rows: list[int], input_ids: torch.Tensor, blk_valid: torch.Tensor,
                  question: bool) -> list[RowRequest]:
        """Per row, what the step's pipeline reads: the tokens its queries may use (the window, and at the question
        step the block too: only its last logits are used, so the question may query with its own tokens), the
        call's sinks to skip, the keys retriever's in-context query, and for the re-read what the call has read."""
        ids, valid = call.win_ids, call.win_valid
        if question:
            ids = torch.cat([ids, input_ids.to(ids.device)], 1)
            valid = torch.cat([valid, blk_valid.to(valid.device)], 1)
        recent = None
        if self.retriever_kind == "keys" and not question:
            got = call.query_vectors()
            if got is not None:
                vec, ok = got
                unit = torch.nn.functional.normalize(vec, dim=-1).cpu().numpy()  # (B, H*D)
                recent = {r: unit[r] for r in range(call.B) if bool(ok[r])}
        out = []
        for r in rows:
            sinks = int(call.sink_valid[r].sum())
            read = call.read_ids(r) if question else None
            window = call.win_ids[r, torch.nonzero(call.win_valid[r]).flatten()].cpu().numpy() if question else None
            out.append(RowRequest(namespace=call.namespaces[r], tokens=ids[r][valid[r]].cpu().numpy(),
                                  exclude=(call.call_base[r], call.call_base[r] + sinks),
                                  recent_query=recent.get(r) if recent is not None else None,
                                  call_tokens=read.numpy() if read is not None else None,
                                  call_base=call.call_base[r], sinks=sinks, window=window))
        return out

    def _set_memory(self, call: CallState, got: dict[int, Retrieved]) -> None:
        """Stack retrieved chunks (k', L_mem, H, C, D) per row into (B, H, M, D) per needed stored layer; a partial
        chunk's padding (beyond its span) is not attended."""
        C = self.config.chunk_size
        counts = [int(got[r].keys.shape[0]) * C if r in got else 0 for r in range(call.B)]
        M = max(counts)
        needed = sorted(set(self.stored_index.values()))
        H, D = self.rt.kv_heads, self.rt.head_dim
        dev, dt = call.device, self.rt.dtype
        mk = {j: torch.zeros(call.B, H, M, D, device=dev, dtype=dt) for j in needed}
        mv = {j: torch.zeros(call.B, H, M, D, device=dev, dtype=dt) for j in needed}
        valid = torch.zeros(call.B, M, dtype=torch.bool, device=dev)
        true_pos = torch.zeros(call.B, M, dtype=torch.long, device=dev)
        ids: list[list[int]] = [[] for _ in range(call.B)]
        ar = torch.arange(C, device=dev)
        for r, res in got.items():
            n = counts[r]
            if n == 0:
                continue
            for j in needed:
                mk[j][r, :, :n] = res.keys[:, j].permute(1, 0, 2, 3).reshape(H, n, D)  # (k', H, C, D) -> (H, k'C, D)
                mv[j][r, :, :n] = res.values[:, j].permute(1, 0, 2, 3).reshape(H, n, D)
            lengths = (res.spans[:, 1] - res.spans[:, 0]).to(dev)  # (k',) tokens of each chunk (< C: partial)
            valid[r, :n] = (ar[None] < lengths[:, None]).reshape(-1)
            starts = (res.spans[:, 0] - call.call_base[r]).clamp_min(0).to(dev)
            true_pos[r, :n] = (starts[:, None] + ar[None]).reshape(-1)
            ids[r] = res.ids.tolist()
        call.set_memory(mk, mv, valid, true_pos, ids)

    def _put_reread(self, call: CallState, r: int, fresh: Reread) -> None:
        """Row ``r``'s retrieved chunks and window attend the K/V the ``reread`` stage read afresh for
        [sinks | chunks | window] (so the question reads what the plain model reads given that short prompt) instead
        of the stored ones; the window's oldest ``fresh.skip`` tokens are not attended until the next block. The
        window's new K/V stay the window's: the answer attends them, and they are what memory stores when the window
        is evicted or flushed."""
        C = self.config.chunk_size
        off = fresh.sinks
        for i, n in enumerate(fresh.lengths):
            for j in call.mem_k:  # stored index -> the memory layer whose K/V it holds
                layer = self.memory_layers[j]
                call.mem_k[j][r, :, i * C:i * C + n] = fresh.keys[layer][0, :, off:off + n].to(call.mem_k[j].dtype)
                call.mem_v[j][r, :, i * C:i * C + n] = fresh.values[layer][0, :, off:off + n].to(call.mem_v[j].dtype)
            off += n
        if fresh.skip:
            call.hide_window(r, fresh.skip)  # the question reads only its recent tokens (reread.recent)
        if fresh.window:
            cols = torch.nonzero(call.win_valid[r]).flatten()[fresh.skip:]  # (w',) the real columns read, in order
            self._replace_window(call, r, cols, fresh.keys, fresh.values, off)

    @staticmethod
    def _replace_window(call: CallState, r: int, cols: torch.Tensor, keys: dict[int, torch.Tensor],
                        values: dict[int, torch.Tensor], off: int) -> None:
        """Row ``r``'s window K/V (B, H, Wb, D) per layer at ``cols`` := the re-read K/V (1, H, N, D) from ``off``.
        New tensors, not edits: a checkpoint replay's snapshot keeps the window it saw."""
        for layer, k_old in enumerate(call.win_k):
            v_old = call.win_v[layer]
            if k_old is None or v_old is None or layer not in keys:
                continue
            k, v = k_old.clone(), v_old.clone()
            k[r][:, cols.to(k.device)] = keys[layer][0, :, off:].to(k.device, k.dtype)
            v[r][:, cols.to(v.device)] = values[layer][0, :, off:].to(v.device, v.dtype)
            call.win_k[layer], call.win_v[layer] = k, v

    def attend(self, call: CallState, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               **kwargs: Any) -> torch.Tensor:
        layer = module.layer_idx
        memory = None
        if layer in self.stored_index and call.mem_valid.shape[1] > 0:
            j = self.stored_index[layer]
            memory = (call.mem_k[j], call.mem_v[j])  # (B, Hkv, M, D) position-free
        return self.rt.attend_context(call, module, query, key, value, memory, **kwargs)

    # ------------------------------------------------------------------ writing memory
    def store(self, call: CallState, evicted: list[Evicted]) -> None:
        rt = self.rt
        spans = [ev.spans + call.call_base[ev.row] for ev in evicted]
        lengths = [(sp[:, 1] - sp[:, 0]).tolist() for sp in spans]
        texts: list[list[str] | None]
        embs: list[np.ndarray] = []
        if self.retriever_kind == "text":
            decoded = [[rt.tokenizer.decode(row[:n].tolist()) for row, n in zip(ev.ids, ls)]
                       for ev, ls in zip(evicted, lengths)]
            flat = [t for ts in decoded for t in ts]
            emb_all = rt.memory.embed(texts=flat)
            offs = np.cumsum([0] + [len(ts) for ts in decoded])
            embs = [emb_all[offs[i]:offs[i + 1]] for i in range(len(evicted))]
            texts = list(decoded)
        else:
            texts = [None] * len(evicted)
            for ev, ls in zip(evicted, lengths):
                assert ev.retr_keys is not None
                if all(n == self.config.chunk_size for n in ls):
                    embs.append(rt.memory.embed(keys=ev.retr_keys))
                else:  # a partial chunk: the mean of its real keys only
                    embs.append(np.concatenate([rt.memory.embed(keys=ev.retr_keys[i:i + 1, :, :n])
                                                for i, n in enumerate(ls)]))
        for ev, emb, tx, sp in zip(evicted, embs, texts, spans):
            rt.memory.add_chunks(ev.keys, ev.values, emb, sp, namespace=call.namespaces[ev.row], texts=tx,
                                 token_ids=ev.ids)
