"""The per-model memkit runtime: finds the attention layers, drives each step, reads and writes memory.

A step is one forward call of the model's decoder (``model.base_model``) inside a memkit call: a block of
a long input, a prefill chunk or a decode step of ``generate``. Two hooks on the decoder frame it:

* before: form the retrieval query from text the step may legally see, fetch the top-k chunks
  (MemLong, Liu et al. 2024: chunk K/V in time order), lay out positions for sinks / memory / window /
  block (:class:`~integrations.context.CallState`) and replace ``position_ids`` so the block sits right after
  its virtual context;
* after: append the step's position-free K/V to the window, evict whole chunks that left it and store
  them (K/V pages of the memory layers + a retrieval embedding) in the MemoryManager under the row's
  namespace.

Causality: a forward/ingest block's query uses only tokens before the block, so no logit depends on a later
token. In ``generate`` only the last logits are used, so a step that reaches the end of the prompt (and each
decode re-retrieval) may use its own tokens in the query: a question at the end of a prompt retrieves
its answer.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from memkit.integrations.attention import ATTN_NAME, RUNTIMES, attend_core, original_attention, register
from memkit.integrations.context import CallState, Evicted
from memkit.integrations.hf_compat import broken_assumption, cache_kwarg, check_versions, resolve_decoder
from memkit.integrations.positions import Rotary

from memkit._malloc import trim
from memkit.config import MemoryConfig, resolve_layers
from memkit.errors import ConfigError, InvalidInputError, UnsupportedModelError

__all__ = ["Runtime", "find_attention_modules"]

TRIM_EVERY = 4  # blocks between malloc_trim calls: ~15 ms each against 1-3 s per block on CPU


def find_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Self-attention modules ordered by ``layer_idx`` (class name ending in 'Attention')."""
    found: dict[int, torch.nn.Module] = {}
    for m in model.modules():
        name = type(m).__name__
        idx = getattr(m, "layer_idx", None)
        if name.endswith("Attention") and isinstance(idx, int) and not getattr(m, "is_cross_attention", False):
            found.setdefault(idx, m)
    return [found[i] for i in sorted(found)]


class Runtime:
    """State and hooks that make one HF model memory-augmented; see the module docstring."""

    def __init__(self, model: Any, config: MemoryConfig, *, tokenizer: Any = None, memory: Any = None) -> None:
        self.model, self.config, self.tokenizer = model, config, tokenizer
        check_versions()
        # lm: the causal LM (inside a PeftModel if one is given); base: its decoder, hooked once per step.
        self.lm, self.base = resolve_decoder(model)
        base = self.base
        self.cache_kwarg = cache_kwarg(self.lm)
        self.hf_config = self.lm.config
        self.attn = find_attention_modules(model)
        self.L = len(self.attn)
        n_cfg = getattr(self.hf_config.get_text_config(decoder=True), "num_hidden_layers", self.L)
        if self.L == 0 or [getattr(m, "layer_idx", -1) for m in self.attn] != list(range(self.L)) or self.L != n_cfg:
            raise UnsupportedModelError(
                f"{type(model).__name__}: found {self.L} attention modules with layer_idx 0..L-1 but the config "
                f"has {n_cfg} layers; memkit needs one self-attention module per layer that carries layer_idx")
        self.original_impl = self.hf_config._attn_implementation or "sdpa"
        self.rotary = Rotary(base, self.attn)
        self.max_positions = int(getattr(self.hf_config.get_text_config(decoder=True), "max_position_embeddings",
                                         0) or getattr(self.hf_config, "n_positions", 0) or 0)
        self._resolve_layers()
        self.step_active = False
        self.call_active = False
        self.disabled = False
        self.state: CallState | None = None
        self.namespaces: list[str] = []
        self.mode = "forward"
        self.prompt_cols = 0
        self.calls = 0
        self.kv_shapes: dict[int, tuple[int, int]] = {}
        self.progress: Any = None
        self.call_base: list[int] = []  # token offset of this call in each row's namespace
        self._offsets: dict[str, int] = {}  # next token index per namespace: spans keep time order across calls
        self._hooks: list[Any] = []
        self._stores = 0  # blocks that stored chunks; every TRIM_EVERY-th returns free heap to the OS
        self._install()
        try:
            self._probe()
            self.kv_heads, self.head_dim = self.kv_shapes[self.memory_layers[0]]
            self.retriever_kind = self._pick_retriever()
            self.memory = memory if memory is not None else self._make_memory()
        except BaseException:
            self.remove()
            raise

    # ------------------------------------------------------------------ set-up
    def _resolve_layers(self) -> None:
        cfg = self.config
        layer_types = getattr(self.hf_config.get_text_config(decoder=True), "layer_types", None)
        sliding = set()
        if layer_types and "full_attention" in layer_types:
            sliding = {i for i, t in enumerate(layer_types) if t != "full_attention"}
        self.memory_layers = resolve_layers(cfg.memory_layers, self.L)
        if sliding and isinstance(cfg.memory_layers, str):  # named specs: keep global-attention layers only
            kept = [i for i in self.memory_layers if i not in sliding]
            self.memory_layers = kept or [max(i for i in range(self.L) if i not in sliding)]
        spec = cfg.retrieval_layers if cfg.retrieval_layers is not None else self.memory_layers
        self.retrieval_layers = resolve_layers(spec, self.L)
        if sliding and isinstance(cfg.retrieval_layers, str):
            self.retrieval_layers = [i for i in self.retrieval_layers if i not in sliding] or self.memory_layers
        # Each retrieval layer reads the K/V of a stored layer: its own when stored (default), otherwise the
        # nearest memory layer below it (MemLong's setup: one middle layer's K/V feed all upper layers).
        self.stored_index: dict[int, int] = {}
        for l in self.retrieval_layers:
            if l in self.memory_layers:
                self.stored_index[l] = self.memory_layers.index(l)
            else:
                below = [j for j, m in enumerate(self.memory_layers) if m < l]
                self.stored_index[l] = below[-1] if below else 0
        self.retriever_layer = cfg.retriever_layer if cfg.retriever_layer is not None else self.L // 2
        if not 0 <= self.retriever_layer < self.L:
            raise ConfigError(f"retriever_layer={cfg.retriever_layer} is outside [0, {self.L}) for this model")
        if cfg.sink_tokens > cfg.chunk_size or cfg.window < cfg.chunk_size:
            raise ConfigError(f"need sink_tokens <= chunk_size <= window, got sink_tokens={cfg.sink_tokens}, "
                              f"chunk_size={cfg.chunk_size}, window={cfg.window}")
        worst = cfg.sink_tokens + cfg.top_k * cfg.chunk_size + cfg.window + cfg.chunk_size - 1 + cfg.block_size
        if self.max_positions and worst > self.max_positions and cfg.position_scheme != "original":
            advice = (f"sink_tokens + top_k*chunk_size + window + chunk_size - 1 + block_size = {worst} exceeds the "
                      f"model's {self.max_positions} positions; lower top_k, window or block_size")
            if not self.rotary.enabled:
                raise ConfigError(advice + " (this model has learned absolute positions)")
            warnings.warn(advice + " to stay inside the trained range", stacklevel=3)

    def _install(self) -> None:
        register()
        for m in self.attn:
            m._memkit_runtime = self
        RUNTIMES[id(self.hf_config)] = self
        self.lm.set_attn_implementation(ATTN_NAME)
        if self.hf_config._attn_implementation != ATTN_NAME:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} does not let transformers set its attention implementation: it does "
                "not route attention through AttentionInterface, so memkit cannot wrap it")
        self._hooks.append(self.base.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self._hooks.append(self.base.register_forward_hook(self._post_hook, with_kwargs=True))

    def _probe(self) -> None:
        """Run two tokens through a memkit step; every layer must call the registered attention function."""
        dev = self.device
        self.begin_call(1, ["__probe__"], mode="probe")
        try:
            with torch.no_grad():
                self.base(input_ids=torch.zeros(1, 2, dtype=torch.long, device=dev))
        finally:
            self.end_call()
        missing = [i for i in range(self.L) if i not in self.kv_shapes]
        if missing:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: layers {missing} never called the attention function registered in "
                "transformers' AttentionInterface; memkit needs every layer to route attention through it")

    def _pick_retriever(self) -> str:
        kind = self.config.retriever
        if kind == "text" and self.tokenizer is None:
            raise ConfigError("retriever='text' needs a tokenizer: memkit.wrap(model, tokenizer=tok)")
        if kind == "auto":
            kind = "text" if self.tokenizer is not None else "keys"
        return kind

    def _make_memory(self) -> Any:
        from memkit.memory import MemoryManager

        embed_dim = 384 if self.retriever_kind == "text" else self.kv_shapes[self.retriever_layer][0] * \
            self.kv_shapes[self.retriever_layer][1]
        if self.retriever_kind == "text":
            from memkit.retrievers import get_text_retriever

            retriever: Any = get_text_retriever()
        else:
            from memkit.retrievers import KeyMeanRetriever

            retriever = KeyMeanRetriever(embed_dim)
        return MemoryManager(self.config, num_layers=len(self.memory_layers), kv_heads=self.kv_heads,
                             head_dim=self.head_dim, embed_dim=embed_dim, device=self.device, retriever=retriever)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def original_fn(self, module: torch.nn.Module) -> Any:
        return original_attention(module, self.original_impl)

    def remove(self) -> None:
        """Undo everything :meth:`_install` did: hooks, attributes, attention implementation."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for m in self.attn:
            if getattr(m, "_memkit_runtime", None) is self:
                del m._memkit_runtime
        RUNTIMES.pop(id(self.hf_config), None)
        if self.hf_config._attn_implementation == ATTN_NAME:
            self.lm.set_attn_implementation(self.original_impl)

    # ------------------------------------------------------------------ calls
    def begin_call(self, batch: int, namespaces: list[str] | None, *, mode: str, prompt_cols: int = 0,
                   progress: Any = None, prompt_ids: torch.Tensor | None = None) -> None:
        """Start a call; ``prompt_ids`` (B, N) in generate mode lets each step check it reads new tokens only."""
        if self.call_active:
            raise InvalidInputError("a memkit call is already running on this model (calls cannot be nested)")
        if namespaces is None:
            namespaces = ["default"] if batch == 1 else [f"row{r}" for r in range(batch)]
        if len(namespaces) != batch or not all(isinstance(n, str) and n for n in namespaces):
            raise InvalidInputError(f"namespaces must be {batch} non-empty strings, one per batch row; got "
                                    f"{namespaces!r}")
        self.namespaces, self.mode, self.prompt_cols, self.progress = list(namespaces), mode, prompt_cols, progress
        self.call_base = [self._span_end(ns) for ns in self.namespaces] if mode != "probe" else [0] * batch
        cfg = self.config
        self.state = CallState(batch=batch, num_layers=self.L, sink_tokens=cfg.sink_tokens, window=cfg.window,
                               chunk_size=cfg.chunk_size, memory_layers=self.memory_layers,
                               retriever_layer=self.retriever_layer if mode != "probe" and
                               self.retriever_kind == "keys" else None, device=self.device)
        self.state.prompt_ids = prompt_ids
        self.call_active = True

    def _span_end(self, namespace: str) -> int:
        """Where this namespace's next tokens start: after every span stored so far (calls never overlap).

        A namespace the memory no longer holds (``memory.reset()``) starts again at 0, so trace spans stay
        the token positions of the new input."""
        end = self.memory.span_end(namespace) if hasattr(self, "memory") else None
        if end is None:
            self._offsets.pop(namespace, None)
            return 0
        return max(end, self._offsets.get(namespace, 0))

    def end_call(self) -> None:
        if self.state is not None and self.mode != "probe":
            for r, ns in enumerate(self.namespaces):
                end = self.call_base[r] + int(self.state.n_real[r])
                self._offsets[ns] = max(self._offsets.get(ns, 0), end)
        self.call_active = self.step_active = False
        self.state = None
        if self.mode != "probe":
            trim()
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.call_active:
            return None
        state = self.state
        assert state is not None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise InvalidInputError("memkit needs input_ids (inputs_embeds is not supported inside a memkit call)")
        B, T = input_ids.shape
        if B != state.B:
            raise InvalidInputError(f"batch size changed from {state.B} to {B} inside one memkit call")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            blk_valid = mask[:, -T:].to(device=state.device, dtype=torch.bool)
        elif mask is None:
            blk_valid = torch.ones(B, T, dtype=torch.bool, device=state.device)
        else:
            raise InvalidInputError("memkit takes a 2-D attention_mask (batch, tokens) of 1 = token, 0 = padding")
        if self.mode == "generate":
            self._check_new_tokens(state, input_ids)
        if self.mode != "probe":
            self._maybe_retrieve(state, input_ids, blk_valid)
        layout = state.build_layout(blk_valid, self.config.position_scheme, include_memory_in_positions=True)
        if not self.rotary.enabled and self.max_positions and int(layout.blk_pos.max()) >= self.max_positions:
            raise ConfigError(
                f"position {int(layout.blk_pos.max())} exceeds this model's {self.max_positions} learned positions; "
                "use position_scheme='contiguous' and lower top_k, window or block_size")
        state.layout, state.blk_ids = layout, input_ids
        self.rotary.clear()
        args = args[1:] if args else args
        kwargs = dict(kwargs, input_ids=input_ids, position_ids=layout.blk_pos,
                      attention_mask=None if bool(blk_valid.all()) else blk_valid.long())
        self.step_active = True
        return args, kwargs

    def _check_new_tokens(self, state: CallState, input_ids: torch.Tensor) -> None:
        """generate must hand each prompt token over exactly once, then one new token per step.

        memkit keeps the context itself, so a token handed over twice would be attended and stored twice and
        the answer would be wrong without any error (transformers 5.24 with an empty-layer cache did that).
        """
        c, T, N = state.cols, int(input_ids.shape[1]), self.prompt_cols
        prompt = state.prompt_ids
        if c < N:
            ok = c + T <= N and (prompt is None or torch.equal(input_ids, prompt[:, c:c + T].to(input_ids.device)))
            seen = f"{T} tokens at prompt position {c} of {N}"
        else:
            ok = T == 1
            seen = f"{T} tokens after the {N}-token prompt was read (expected one new token per step)"
        if not ok:
            self.step_active = False
            raise broken_assumption(f"generate handed memkit {seen}: tokens it has already read would be attended "
                                    "and stored twice")

    def _post_hook(self, module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        if not self.step_active:
            return None
        self.step_active = False
        state = self.state
        assert state is not None and state.blk_ids is not None
        if self.mode == "probe":
            return None
        evicted = state.commit(state.blk_ids)
        if evicted:
            self._store(evicted)
            self._stores += 1
            if self._stores % TRIM_EVERY == 0:
                trim()  # pages pile up between freed activations: hand free heap back (memkit/_malloc.py)
        if self.progress is not None:
            before = state.cols - state.blk_ids.shape[1]
            self.progress.update(max(0, min(state.cols, self.prompt_cols) - min(before, self.prompt_cols)))
        return None

    # ------------------------------------------------------------------ attention of one layer
    def attend(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
        """query (B, Hq, T, D); key/value (B, Hkv, T, D) rotated at the block positions."""
        state, layer = self.state, module.layer_idx
        assert state is not None and state.layout is not None
        lay = state.layout
        self.kv_shapes[layer] = (key.shape[1], key.shape[3])
        k_free = self.rotary.rotate(layer, key, lay.blk_pos, inverse=True, tag="blk")  # (B, Hkv, T, D)
        state.pending_k[layer], state.pending_v[layer] = k_free.detach(), value.detach()
        if layer == state.retriever_layer and self.retriever_kind == "keys":
            q_free = self.rotary.rotate(layer, query, lay.blk_pos, inverse=True, tag="blk")  # (B, Hq, T, D)
            B, Hq, T, D = q_free.shape
            state.pending_q = q_free.reshape(B, key.shape[1], Hq // key.shape[1], T, D).mean(2).detach()
        with_mem = layer in self.stored_index and state.mem_valid.shape[1] > 0
        ks, vs = [], []
        if state.S:
            sk, sv = state.sink_k[layer], state.sink_v[layer]
            if sk is None:
                sk = key.new_zeros(key.shape[0], key.shape[1], state.S, key.shape[3])
                sv = value.new_zeros(sk.shape)
            else:
                sk = self.rotary.rotate(layer, sk, lay.sink_pos, tag="sink")
            ks.append(sk.to(key.dtype))
            vs.append(sv.to(value.dtype))
        if with_mem:
            j = self.stored_index[layer]
            ks.append(self.rotary.rotate(layer, state.mem_k[j], lay.mem_pos, tag="mem").to(key.dtype))
            vs.append(state.mem_v[j].to(value.dtype))
        wk = state.win_k[layer]
        if wk is not None and wk.shape[2]:
            ks.append(self.rotary.rotate(layer, wk, lay.win_pos, tag="win"))
            vs.append(state.win_v[layer])
        ks.append(key)
        vs.append(value)
        k_all, v_all = torch.cat(ks, 2), torch.cat(vs, 2)  # (B, Hkv, S + M + Wb + T, D)
        mask = lay.mask(with_mem, kwargs.get("sliding_window"))
        out = attend_core(query, k_all, v_all, mask, scaling=kwargs.get("scaling"), softcap=kwargs.get("softcap"),
                          dropout=float(kwargs.get("dropout", 0.0) or 0.0), training=module.training)
        return out, None

    # ------------------------------------------------------------------ memory reads
    def _maybe_retrieve(self, state: CallState, input_ids: torch.Tensor, blk_valid: torch.Tensor) -> None:
        cfg = self.config
        if cfg.top_k == 0 or not self.retrieval_layers:
            return
        T = input_ids.shape[1]
        col_start, col_end = state.cols, state.cols + T
        inclusive = self.mode == "generate" and col_end >= self.prompt_cols
        if self.mode == "generate" and col_start >= self.prompt_cols and \
                col_end - state.last_retrieval_col < cfg.block_size:
            return  # decoding: keep the chunks retrieved at the end of the prompt for a block's worth of tokens
        rows = [r for r in range(state.B) if self.memory.num_chunks(self.namespaces[r]) > 0]
        queries = self._queries(state, rows, input_ids, blk_valid, inclusive)
        state.last_retrieval_col = col_end
        rows = [r for r in rows if queries.get(r) is not None]
        if not rows:
            state.set_memory({}, {}, state.mem_valid[:, :0], state.mem_true_pos[:, :0], [[] for _ in range(state.B)])
            return
        q = np.stack([queries[r] for r in rows])
        extra = 1 if state.S else 0  # a chunk inside this call's sinks is attended already: fetch one more
        got = self.memory.retrieve_batch(q, [self.namespaces[r] for r in rows], k=cfg.top_k + extra,
                                         device=state.device, dtype=self.dtype)
        self._set_memory(state, {r: self._drop_sink_chunks(state, r, res) for r, res in zip(rows, got)})

    def _drop_sink_chunks(self, state: CallState, r: int, res: Any) -> Any:
        """Remove chunks that lie inside row r's sinks, keep the top_k best scores, in time order."""
        base, s = self.call_base[r], int(state.sink_valid[r].sum())
        keep = ~((res.spans[:, 0] >= base) & (res.spans[:, 1] <= base + s))
        idx = torch.nonzero(keep).reshape(-1)
        if len(idx) > self.config.top_k:
            best = torch.argsort(res.scores[idx], descending=True, stable=True)[: self.config.top_k]
            idx = idx[best.sort().values]
        if len(idx) == len(res.ids):
            return res
        dev = res.keys.device
        return type(res)(res.ids[idx], res.scores[idx], res.spans[idx], res.keys[idx.to(dev)],
                         res.values[idx.to(dev)], res.namespace, [res.texts[i] for i in idx.tolist()])

    def _queries(self, state: CallState, rows: list[int], input_ids: torch.Tensor, blk_valid: torch.Tensor,
                 inclusive: bool) -> dict[int, np.ndarray | None]:
        out: dict[int, np.ndarray | None] = {}
        if not rows:
            return out
        if self.retriever_kind == "keys":
            got = state.query_vectors()
            if got is None:
                return out
            vec, ok = got
            vec = torch.nn.functional.normalize(vec, dim=-1).cpu().numpy()
            return {r: vec[r] for r in rows if bool(ok[r])}
        ids, valid = state.win_ids, state.win_valid
        if inclusive:
            ids = torch.cat([ids, input_ids.to(ids.device)], 1)
            valid = torch.cat([valid, blk_valid], 1)
        texts, keep = [], []
        for r in rows:
            row = ids[r][valid[r]][-self.config.chunk_size:].tolist()
            if row:
                texts.append(self.tokenizer.decode(row))
                keep.append(r)
        if texts:
            emb = self.memory.embed(texts=texts)
            out = {r: emb[i] for i, r in enumerate(keep)}
        return out

    def _set_memory(self, state: CallState, got: dict[int, Any]) -> None:
        """Stack retrieved chunks (k', L_mem, H, C, D) per row into (B, H, M, D) per needed stored layer."""
        C = self.config.chunk_size
        counts = [int(got[r].keys.shape[0]) * C if r in got else 0 for r in range(state.B)]
        M = max(counts)
        needed = sorted(set(self.stored_index.values()))
        H, D = self.kv_heads, self.head_dim
        dev, dt = state.device, self.dtype
        mk = {j: torch.zeros(state.B, H, M, D, device=dev, dtype=dt) for j in needed}
        mv = {j: torch.zeros(state.B, H, M, D, device=dev, dtype=dt) for j in needed}
        valid = torch.zeros(state.B, M, dtype=torch.bool, device=dev)
        true_pos = torch.zeros(state.B, M, dtype=torch.long, device=dev)
        ids: list[list[int]] = [[] for _ in range(state.B)]
        for r, res in got.items():
            n = counts[r]
            if n == 0:
                continue
            for j in needed:
                # (k', H, C, D) -> (H, k'C, D)
                mk[j][r, :, :n] = res.keys[:, j].permute(1, 0, 2, 3).reshape(H, n, D)
                mv[j][r, :, :n] = res.values[:, j].permute(1, 0, 2, 3).reshape(H, n, D)
            valid[r, :n] = True
            starts = (res.spans[:, 0] - self.call_base[r]).clamp_min(0).to(dev)
            true_pos[r, :n] = (starts[:, None] + torch.arange(C, device=dev)[None]).reshape(-1)
            ids[r] = res.ids.tolist()
        state.set_memory(mk, mv, valid, true_pos, ids)

    # ------------------------------------------------------------------ memory writes
    def _store(self, evicted: list[Evicted]) -> None:
        if self.retriever_kind == "text":
            texts = [[self.tokenizer.decode(row.tolist()) for row in ev.ids] for ev in evicted]
            flat = [t for ts in texts for t in ts]
            emb_all = self.memory.embed(texts=flat)
            offs = np.cumsum([0] + [len(ts) for ts in texts])
            embs = [emb_all[offs[i]:offs[i + 1]] for i in range(len(evicted))]
        else:
            texts = [None] * len(evicted)  # type: ignore[list-item]
            embs = [self.memory.embed(keys=ev.retr_keys) for ev in evicted]
        for ev, emb, tx in zip(evicted, embs, texts):
            spans = ev.spans + self.call_base[ev.row]
            self.memory.add_chunks(ev.keys, ev.values, emb, spans, namespace=self.namespaces[ev.row], texts=tx)
