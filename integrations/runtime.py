"""The per-model memkit runtime: finds the attention layers, frames each step, and hands the rest to the style.

A *call* is one memkit forward, ``generate`` or ``ingest``; everything it knows lives in one
:class:`~.context.CallState` (rows, namespaces, mode, prompt, window, sinks, retrieved memory, the step's layout).
A *step* is one forward of the model's decoder inside a call: a block of a long input, a prefill chunk or a decode
step of ``generate``. Two hooks on the decoder frame it:

* before: the style retrieves for the block (MemLong: top-k chunks by the text before the block; LongMem: marks
  the rows that have memory), :meth:`CallState.build_layout` places sinks / memory / window / block, and
  ``position_ids`` are replaced so the block sits right after its virtual context;
* after: the step's position-free K/V join the window; whole chunks that leave it go to the style's ``store``
  (K/V pages + a retrieval embedding in the MemoryManager, under the row's namespace).

Attention goes through transformers' ``AttentionInterface`` (:mod:`.attention`) to :meth:`Runtime.attend`, which
asks the style; both styles build on :meth:`Runtime.attend_context`, the causal attention over
[sinks | memory | window | block]. The style is a registered strategy (:data:`memkit.styles.STYLES`):
:mod:`.memlong` (MemLong, Liu et al. 2024) and :mod:`.longmem` (LongMem, Wang et al. 2023).

Threads: a call holds the runtime's lock from start to end, so concurrent calls on one model run one after
another, and a step is visible only to the thread that owns its call; ``memory_disabled()`` applies to the thread
that entered it only (:attr:`Runtime.disabled` is per thread). Checkpoint replay (gradient checkpointing
with memory, :mod:`.replay`) is declared here: while a checkpointed layer runs, :meth:`Runtime.current_call`
and :meth:`Runtime.memo` record what it read, and its recomputation in backward gets exactly that back.

Causality: a forward/ingest block's query uses only tokens before the block, so no logit depends on a later
token. In ``generate`` only the last logits are used, so a step that reaches the end of the prompt (and each
decode re-retrieval) may use its own tokens in the query: a question at the end of a prompt retrieves its answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from memkit._malloc import trim
from memkit.config import MemoryConfig
from memkit.errors import ConfigError, IncompatibleMemoryError, InvalidInputError, UnsupportedModelError
from memkit.styles import STYLES

from .attention import ATTN_NAME, RUNTIME_ATTR, RUNTIMES, attend_core, attention_of_last, register
from .context import CallState, Evicted
from .hf_compat import broken_assumption, cache_kwarg, check_versions, resolve_decoder
from .positions import Rotary
from .replay import Replay, checkpoint_layers

__all__ = ["Runtime", "ProbeReader", "find_attention_modules"]

TRIM_EVERY = 4  # blocks between malloc_trim calls: ~15 ms each against 1-3 s per block on CPU
PROBE_TOKENS = 8  # tokens of the set-up probe; their keys fingerprint the model for memory saves
FINGERPRINT_DIM = 32  # random projection of each memory layer's probe keys
FINGERPRINT_MIN_COSINE = 0.98  # bf16 vs fp32 weights agree to > 0.999; another model or seed is near 0


def find_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Self-attention modules ordered by ``layer_idx`` (class name ending in 'Attention')."""
    found: dict[int, torch.nn.Module] = {}
    for m in model.modules():
        name = type(m).__name__
        idx = getattr(m, "layer_idx", None)
        if name.endswith("Attention") and isinstance(idx, int) and not getattr(m, "is_cross_attention", False):
            found.setdefault(idx, m)
    return [found[i] for i in sorted(found)]


class ProbeReader:
    """The narrow interface a retrieval pipeline is given (:class:`memkit.retrieval.Reader`): read token ids afresh in
    a probe step of this model, nothing stored. The pipeline never sees the runtime itself."""

    def __init__(self, runtime: Runtime) -> None:
        self._read, self._queries, self._attention = runtime.reread, runtime.probe_queries, runtime.probe_attention

    def read(self, ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        return self._read(ids)

    def queries(self, ids: torch.Tensor) -> torch.Tensor:
        return self._queries(ids)

    def attention(self, ids: torch.Tensor, last: int) -> tuple[torch.Tensor, float]:
        return self._attention(ids, last)


class Runtime:
    """Per-model state and the hooks that make one HF model memory-augmented; see the module docstring."""

    def __init__(self, model: Any, config: MemoryConfig, *, tokenizer: Any = None, memory: Any = None) -> None:
        self.model, self.config, self.tokenizer = model, config, tokenizer
        check_versions()
        # lm: the causal LM (inside a PeftModel if one is given); base: its decoder, hooked once per step.
        self.lm, self.base = resolve_decoder(model)  # (PreTrainedModel, its decoder)
        self.cache_kwarg = cache_kwarg(self.lm)
        self.hf_config: Any = self.lm.config
        self.attn = find_attention_modules(self.lm)
        self.L = len(self.attn)
        text = self.hf_config.get_text_config(decoder=True)
        n_cfg = getattr(text, "num_hidden_layers", self.L)
        if self.L == 0 or [getattr(m, "layer_idx", -1) for m in self.attn] != list(range(self.L)) or self.L != n_cfg:
            raise UnsupportedModelError(
                f"{type(model).__name__}: found {self.L} attention modules with layer_idx 0..L-1 but the config "
                f"has {n_cfg} layers; memkit needs one self-attention module per layer that carries layer_idx")
        self.original_impl = self.hf_config._attn_implementation or "sdpa"
        self.rotary = Rotary(self.base, self.attn)
        self.max_positions = int(getattr(text, "max_position_embeddings", 0) or getattr(self.hf_config, "n_positions",
                                                                                        0) or 0)
        self.vocab_size = getattr(text, "vocab_size", None)
        self.lock = threading.RLock()  # held by a call from begin to end: calls on one model run one after another
        self.call: CallState | None = None
        self._tls = threading.local()  # .replay: the checkpoint record of the layer running in this thread;
        # .disabled: memory_disabled() is active in this thread (never another thread's)
        self.kv_shapes: dict[int, tuple[int, int]] = {}  # layer -> (kv heads, head dim), seen by the probe
        self.offsets: dict[str, int] = {}  # next token index per namespace: spans keep time order across calls
        self.hooks: list[Any] = []
        self.stores = 0  # blocks that stored chunks; every TRIM_EVERY-th returns free heap to the OS
        self.calls = 0  # attention calls routed to memkit (tests count them)
        self.probe_keys: dict[int, torch.Tensor] = {}  # layer -> (H, PROBE_TOKENS, D) position-free probe keys
        self.style = STYLES.get(config.style)(self, config)  # the registered strategy; resolves its layers
        self.checkpointing: Callable[[], None] | None = None
        self.reader = ProbeReader(self)  # what the retrieval pipeline may ask of the model (a probe read)
        self._install()
        try:
            self._probe()
            self.kv_heads, self.head_dim = self.kv_shapes[self.style.memory_layers[0]]
            self.memory = memory if memory is not None else self.style.make_memory()
        except BaseException:
            self.remove()
            raise

    # ------------------------------------------------------------------ set-up
    def _install(self) -> None:
        register()
        self.style.install()
        for m in self.attention_modules():
            setattr(m, RUNTIME_ATTR, self)  # read by the attention function of this module
        RUNTIMES[id(self.hf_config)] = self
        self.lm.set_attn_implementation(ATTN_NAME)
        if self.hf_config._attn_implementation != ATTN_NAME:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} does not let transformers set its attention implementation: it does "
                "not route attention through AttentionInterface, so memkit cannot wrap it")
        self.hooks.append(self.base.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self.hooks.append(self.base.register_forward_hook(self._post_hook, with_kwargs=True))

    def attention_modules(self) -> list[torch.nn.Module]:
        """Every attention module memkit routes: the model's, plus the style's own (LongMem's SideNet)."""
        return self.attn + self.style.extra_attention()

    def _probe(self) -> None:
        """Run a few fixed tokens through a memkit step: every layer must call the registered attention function;
        their position-free keys fingerprint the model (memory saves record it)."""
        vocab = int(self.vocab_size or 2)
        ids = (torch.arange(PROBE_TOKENS) * 7919 + 13) % vocab  # (T,) fixed, any vocabulary
        with self.calling(1, ["__probe__"], mode="probe") as call, torch.no_grad():
            self.base(input_ids=ids[None].to(self.device))
            self.probe_keys = {layer: k[0].float().cpu() for layer, k in call.pending_k.items()}
        missing = [i for i in range(self.L) if i not in self.kv_shapes]
        if missing:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: layers {missing} never called the attention function registered in "
                "transformers' AttentionInterface; memkit needs every layer to route attention through it")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def remove(self) -> None:
        """Undo everything :meth:`_install` did: hooks, attributes, attention implementation."""
        if self.checkpointing is not None:
            self.checkpointing()
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        for m in self.attention_modules():
            if getattr(m, RUNTIME_ATTR, None) is self:
                delattr(m, RUNTIME_ATTR)
        RUNTIMES.pop(id(self.hf_config), None)
        if self.hf_config._attn_implementation == ATTN_NAME:
            self.lm.set_attn_implementation(self.original_impl)

    # ------------------------------------------------------------------ calls
    @contextlib.contextmanager
    def calling(self, batch: int, namespaces: list[str] | None, *, mode: str, prompt_cols: int = 0,
                prompt_ids: torch.Tensor | None = None, progress: Any = None,
                flush_window: bool | None = None) -> Iterator[CallState]:
        """One call: waits for any other thread's call on this model, yields its :class:`CallState`, and at the end
        stores what is still in the window (``flush_window``; None = the config's), releases the lock and frees
        heap."""
        if flush_window is not None and not isinstance(flush_window, bool):
            raise InvalidInputError(f"flush_window must be True, False or None (the config's), got {flush_window!r}")
        flush = self.config.flush_window if flush_window is None else flush_window
        self.lock.acquire()
        try:
            if self.call is not None:
                raise InvalidInputError("a memkit call is already running in this thread (calls cannot be nested: "
                                        "do not call the model from inside a streamer or stopping criterion)")
            call = self._new_call(batch, namespaces, mode, prompt_cols, prompt_ids, progress)
        except BaseException:
            self.lock.release()
            raise
        self.call = call
        ok = False
        try:
            yield call
            ok = True
        finally:
            try:
                if ok and mode != "probe" and flush:
                    self.flush(call)
            finally:
                self._end(call)

    def _new_call(self, batch: int, namespaces: list[str] | None, mode: str, prompt_cols: int,
                  prompt_ids: torch.Tensor | None, progress: Any) -> CallState:
        if namespaces is None:
            namespaces = ["default"] if batch == 1 else [f"row{r}" for r in range(batch)]
        if not isinstance(namespaces, (list, tuple)) or len(namespaces) != batch or \
                not all(isinstance(n, str) and n for n in namespaces):
            raise InvalidInputError(f"namespaces must be {batch} non-empty strings, one per batch row; got "
                                    f"{namespaces!r}")
        probe = mode == "probe"
        cfg = self.config
        call = CallState(batch=batch, num_layers=self.L + len(self.style.extra_attention()),
                         sink_tokens=cfg.sink_tokens, window=cfg.window, chunk_size=cfg.chunk_size,
                         memory_layers=self.style.memory_layers,
                         retriever_layer=self.style.query_layer(), device=self.device, mode=mode,
                         namespaces=namespaces, call_base=[0] * batch if probe else
                         [self._span_end(ns) for ns in namespaces], prompt_cols=prompt_cols, prompt_ids=prompt_ids,
                         progress=progress)
        self.style.begin_call(call)
        return call

    def _span_end(self, namespace: str) -> int:
        """Where this namespace's next tokens start: after every span stored so far (calls never overlap).

        A namespace the memory no longer holds (``memory.reset()``) starts again at 0, so trace spans stay
        the token positions of the new input."""
        end = self.memory.span_end(namespace)
        if end is None:
            self.offsets.pop(namespace, None)
            return 0
        return max(end, self.offsets.get(namespace, 0))

    def _end(self, call: CallState) -> None:
        try:
            if call.mode != "probe":
                for r, ns in enumerate(call.namespaces):
                    self.offsets[ns] = max(self.offsets.get(ns, 0), call.call_base[r] + int(call.n_real[r]))
                trim()
            self.style.end_call(call)
            if call.progress is not None:
                call.progress.close()
        finally:
            call.step_active = False
            self.call = None
            self.lock.release()

    def flush(self, call: CallState) -> int:
        """Store what is still in the call's window (whole chunks, then a partial one); returns chunks stored."""
        rest = call.flush()
        if rest:
            self.style.store(call, rest)
        return sum(int(ev.keys.shape[0]) for ev in rest)

    def reread(self, ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Read ``ids`` (1, N) afresh, as the plain model reads a short prompt: one probe step of causal attention
        over these tokens alone at positions 0..N-1, nothing stored, while this thread's call waits. Returns per
        layer the position-free keys and the values (1, Hkv, N, D). Used by :meth:`Style.before_step` at the
        question step to read retrieved chunks in the context the question sees (the ``reread`` stage)."""
        keys, values, _, _ = self._probe_read(ids)
        return keys, values

    def probe_queries(self, ids: torch.Tensor) -> torch.Tensor:
        """Position-free queries (1, Hkv, N, D) (averaged over each key head's query group) at the retriever layer
        when ``ids`` (1, N) are read afresh, as :meth:`reread` reads them. The ``keys`` retriever's question query
        (:meth:`Style.before_step` at generate's question step) is their mean: the question's own queries, not
        those of whatever the window held before it."""
        _, _, q, _ = self._probe_read(ids)
        if q is None:
            raise InvalidInputError("the probe read recorded no queries: this style has no query layer")
        return q

    def probe_attention(self, ids: torch.Tensor, last: int) -> tuple[torch.Tensor, float]:
        """When ``ids`` (1, N) are read afresh as :meth:`reread` reads them: how much attention their last ``last``
        tokens give each token, (N,) float32 on the CPU, averaged over those tokens, the query heads and every layer
        that attends the whole sequence (sliding-window layers are left out: they cannot see far back; sums to 1),
        and the model's probability of its most likely next token after ``ids`` (how sure it is of an answer's
        first token given this reading). The ``focus`` retrieval stage reads both."""
        if not isinstance(last, int) or last < 1:
            raise InvalidInputError(f"probe_attention needs last >= 1 tokens, got {last!r}")
        probe = self._probe_read(ids, attend_last=last)[3]
        if probe.attention is None or probe.attention_layers == 0:
            raise InvalidInputError("the probe read recorded no attention: no layer of this model attends the whole "
                                    "sequence through memkit's attention (turn the focus stage off)")
        assert probe.last_hidden is not None
        head = self.lm.get_output_embeddings()
        if head is None:
            raise broken_assumption(f"{type(self.lm).__name__}.get_output_embeddings() returned None: memkit reads the "
                                    "next-token probability of a probe through the LM head")
        with torch.no_grad():
            logits = head(probe.last_hidden).float()  # (1, V)
            cap = getattr(self.hf_config.get_text_config(decoder=True), "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            sure = float(torch.softmax(logits, -1).max())
        return (probe.attention[0] / probe.attention_layers).cpu(), sure  # (N,), probability

    def _probe_read(self, ids: torch.Tensor, attend_last: int = 0
                    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor | None, CallState]:
        """One probe step over ``ids`` (1, N) at positions 0..N-1, nothing stored: per layer K and V (1, Hkv, N, D),
        the style's query layer's position-free queries (1, Hkv, N, D) (None when it keeps none), and the probe's
        call state (its ``attention`` when ``attend_last`` > 0)."""
        outer = self.call
        if outer is None or outer.thread != threading.get_ident():
            raise InvalidInputError("a probe read runs inside this thread's memkit call")
        probe = self._new_call(int(ids.shape[0]), ["__reread__"], "probe", 0, None, None)
        probe.attend_last = attend_last
        self.call = probe
        try:
            with torch.no_grad():
                out = self.base(input_ids=ids.to(self.device), use_cache=False)
            if attend_last:
                hidden = getattr(out, "last_hidden_state", None)  # (1, N, hidden)
                if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[1] != ids.shape[1]:
                    raise broken_assumption(f"{type(self.base).__name__} returned no last_hidden_state of shape (1, "
                                            f"{ids.shape[1]}, hidden) for a probe read")
                probe.last_hidden = hidden[:, -1]  # (1, hidden) the last position's final hidden state
            return dict(probe.pending_k), dict(probe.pending_v), probe.pending_q, probe
        finally:
            self.style.end_call(probe)
            self.call = outer

    def current_call(self) -> CallState | None:
        """The call whose step runs in this thread, or None; under checkpoint replay, the step as first run."""
        call = self.call
        live = call if call is not None and call.step_active and call.thread == threading.get_ident() else None
        rec = self.replay
        if rec is None:
            return live
        first = rec.memo(lambda: None if live is None else live.snapshot())
        return first if rec.replaying else live

    @property
    def disabled(self) -> bool:
        """True while this thread is inside ``model.memory_disabled()``; other threads keep their memory."""
        return bool(getattr(self._tls, "disabled", False))

    @disabled.setter
    def disabled(self, value: bool) -> None:
        self._tls.disabled = bool(value)

    @property
    def replay(self) -> Replay | None:
        """The checkpoint record of the layer running in this thread (None outside checkpointed layers)."""
        return getattr(self._tls, "replay", None)

    @replay.setter
    def replay(self, value: Replay | None) -> None:
        self._tls.replay = value

    def memo(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, recorded while a checkpointed layer runs and handed back when backward recomputes it."""
        return fn() if self.replay is None else self.replay.memo(fn)

    def enable_gradient_checkpointing(self) -> Callable[[], None]:
        """Checkpoint every decoder layer (and the style's extra layers); returns the function that undoes it.

        Non-reentrant ``torch.utils.checkpoint`` per layer; each layer call records what memkit's attention read
        (:meth:`current_call`, :meth:`memo`) and its recomputation in backward replays exactly that, so gradients
        equal those without checkpointing.
        """
        if self.checkpointing is None:
            from .sidenet import decoder_layers

            layers = decoder_layers(self.base, self.attn) + self.style.extra_layers()
            undo = checkpoint_layers(self, layers)

            def off() -> None:
                undo()
                self.checkpointing = None

            self.checkpointing = off
        return self.checkpointing

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        call = self.call
        if call is None or call.thread != threading.get_ident():
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise InvalidInputError("memkit needs input_ids (inputs_embeds is not supported inside a memkit call)")
        B, T = input_ids.shape
        if B != call.B:
            raise InvalidInputError(f"batch size changed from {call.B} to {B} inside one memkit call")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            blk_valid = mask[:, -T:].to(device=call.device, dtype=torch.bool)  # (B, T)
        elif mask is None:
            blk_valid = torch.ones(B, T, dtype=torch.bool, device=call.device)
        else:
            raise InvalidInputError("memkit takes a 2-D attention_mask (batch, tokens) of 1 = token, 0 = padding")
        if call.mode == "generate":
            self._check_new_tokens(call, input_ids)
        kept = call.start_step(T, self.config.block_size)
        if kept:
            self._store(call, kept)
        if call.mode != "probe":
            self.style.before_step(call, input_ids, blk_valid)
        layout = call.build_layout(blk_valid, self.config.position_scheme, include_memory_in_positions=True)
        if not self.rotary.enabled and self.max_positions and int(layout.blk_pos.max()) >= self.max_positions:
            raise ConfigError(
                f"position {int(layout.blk_pos.max())} exceeds this model's {self.max_positions} learned positions; "
                "use position_scheme='contiguous' and lower top_k, window or block_size")
        call.layout, call.blk_ids = layout, input_ids
        call.rope_cache = {}
        args = args[1:] if args else args
        kwargs = dict(kwargs, input_ids=input_ids, position_ids=layout.blk_pos,
                      attention_mask=None if bool(blk_valid.all()) else blk_valid.long())
        call.step_active = True
        return args, kwargs

    def _store(self, call: CallState, evicted: list[Evicted]) -> None:
        """Write chunks that left the window to memory (through the style)."""
        self.style.store(call, evicted)
        self.stores += 1
        if self.stores % TRIM_EVERY == 0:
            trim()  # pages pile up between freed activations: hand free heap back (memkit/_malloc.py)

    def _check_new_tokens(self, call: CallState, input_ids: torch.Tensor) -> None:
        """generate must hand each prompt token over exactly once, then one new token per step.

        memkit keeps the context itself, so a token handed over twice would be attended and stored twice and
        the answer would be wrong without any error (transformers 5.24 with an empty-layer cache did that).
        """
        c, T, N = call.cols, int(input_ids.shape[1]), call.prompt_cols
        prompt = call.prompt_ids
        if c < N:
            ok = c + T <= N and (prompt is None or torch.equal(input_ids, prompt[:, c:c + T].to(input_ids.device)))
            seen = f"{T} tokens at prompt position {c} of {N}"
        else:
            ok = T == 1
            seen = f"{T} tokens after the {N}-token prompt was read (expected one new token per step)"
        if not ok:
            raise broken_assumption(f"generate handed memkit {seen}: tokens it has already read would be attended "
                                    "and stored twice")

    def _post_hook(self, module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        call = self.call
        if call is None or not call.step_active or call.thread != threading.get_ident():
            return None
        assert call.blk_ids is not None
        if call.mode == "probe":
            call.step_active = False
            return None
        try:
            self.style.after_step(call, output)  # still inside the step: LongMem's SideNet layers attend here
        finally:
            call.step_active = False
        evicted = call.commit(call.blk_ids)
        if evicted:
            self._store(call, evicted)
        if call.progress is not None:
            before = call.cols - call.blk_ids.shape[1]
            call.progress.update(max(0, min(call.cols, call.prompt_cols) - min(before, call.prompt_cols)))
        return output

    # ------------------------------------------------------------------ attention
    def attend(self, call: CallState, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               **kwargs: Any) -> torch.Tensor:
        """One layer's attention inside a memkit step: the style's (returns (B, T, Hq, D))."""
        self.calls += 1
        return self.style.attend(call, module, query, key, value, **kwargs)  # type: ignore[no-any-return]

    def attend_context(self, call: CallState, module: Any, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor] | None = None,
                       **kwargs: Any) -> torch.Tensor:
        """Causal attention of the block over [sinks | memory | window | block] under one softmax.

        query (B, Hq, T, D); key/value (B, Hkv, T, D) rotated at the block positions; ``memory`` = position-free
        (B, Hkv, M, D) keys and values placed at the layout's memory positions, or None. Records the block's
        position-free K/V (and, at the query layer, its queries) for the commit after the step.
        Returns (B, T, Hq, D).
        """
        layer, lay = module.layer_idx, call.layout
        assert lay is not None
        rot = call.rope_cache
        self.kv_shapes[layer] = (key.shape[1], key.shape[3])
        k_free = self.rotary.rotate(layer, key, lay.blk_pos, inverse=True, tag="blk", cache=rot)  # (B, Hkv, T, D)
        call.pending_k[layer], call.pending_v[layer] = k_free.detach(), value.detach()
        if layer == call.retriever_layer:
            q_free = self.rotary.rotate(layer, query, lay.blk_pos, inverse=True, tag="blk", cache=rot)  # (B, Hq, T, D)
            B, Hq, T, D = q_free.shape
            call.pending_q = q_free.reshape(B, key.shape[1], Hq // key.shape[1], T, D).mean(2).detach()
        if call.attend_last and kwargs.get("sliding_window") is None:  # a probe asked what its last tokens attend
            mass = attention_of_last(query, key, call.attend_last, scaling=kwargs.get("scaling"),
                                     softcap=kwargs.get("softcap"))  # (B, T)
            call.attention = mass if call.attention is None else call.attention + mass
            call.attention_layers += 1
        ks, vs = [], []
        if call.S:
            sk, sv = call.sink_k[layer], call.sink_v[layer]
            if sk is None:
                sk = key.new_zeros(key.shape[0], key.shape[1], call.S, key.shape[3])
                sv = value.new_zeros(sk.shape)
            else:
                sk = self.rotary.rotate(layer, sk, lay.sink_pos, tag="sink", cache=rot)
            assert sv is not None
            ks.append(sk.to(key.dtype))
            vs.append(sv.to(value.dtype))
        if memory is not None:
            ks.append(self.rotary.rotate(layer, memory[0], lay.mem_pos, tag="mem", cache=rot).to(key.dtype))
            vs.append(memory[1].to(value.dtype))
        wk, wv = call.win_k[layer], call.win_v[layer]
        if wk is not None and wv is not None and wk.shape[2]:
            ks.append(self.rotary.rotate(layer, wk, lay.win_pos, tag="win", cache=rot))
            vs.append(wv)
        ks.append(key)
        vs.append(value)
        k_all, v_all = torch.cat(ks, 2), torch.cat(vs, 2)  # (B, Hkv, S + M + Wb + T, D)
        mask = lay.mask(memory is not None, kwargs.get("sliding_window"))
        return attend_core(query, k_all, v_all, mask, scaling=kwargs.get("scaling"), softcap=kwargs.get("softcap"),
                           dropout=float(kwargs.get("dropout", 0.0) or 0.0), training=module.training)

    # ------------------------------------------------------------------ what a memory save belongs to
    def fingerprint(self) -> dict[str, Any]:
        """What this memory belongs to: model config, layers, K/V shapes, retriever, chunking and a fingerprint of
        the keys the model produces (random projection of the probe's position-free keys per memory layer)."""
        text = self.hf_config.get_text_config(decoder=True)
        cfg = {k: getattr(text, k, None) for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                                                     "num_attention_heads", "num_key_value_heads", "head_dim")}
        kv = {}
        for layer in self.style.memory_layers:
            k = self.probe_keys.get(layer)
            if k is not None:
                flat = k.reshape(-1).numpy().astype(np.float64)
                proj = np.random.default_rng(1234 + flat.size).standard_normal((flat.size, FINGERPRINT_DIM))
                kv[str(layer)] = [round(float(x), 6) for x in flat @ proj]
        return {"model": cfg, "style": self.config.style, **self.style.describe(), "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "chunk_size": self.config.chunk_size, "kv_fingerprint": kv,
                "config_sha": hashlib.sha256(repr(sorted(cfg.items())).encode()).hexdigest()[:16]}

    def check_owner(self, saved: Any) -> None:
        """Refuse a memory saved by another model or set-up; the message lists what differs."""
        if not isinstance(saved, dict):
            raise IncompatibleMemoryError("this memory save does not record which model it belongs to (it was "
                                          "written by MemoryManager.save without owner); load it with "
                                          "MemoryManager.load, or re-create it with model.memory.save")
        mine = self.fingerprint()
        diffs = [f"{k}: saved {saved.get(k)!r}, here {v!r}" for k, v in mine.items()
                 if k not in ("kv_fingerprint", "config_sha") and saved.get(k) != v]
        theirs = saved.get("kv_fingerprint") or {}
        for layer, vec in mine["kv_fingerprint"].items():
            other = theirs.get(layer) if isinstance(theirs, dict) else None
            if not isinstance(other, list) or len(other) != len(vec):
                diffs.append(f"keys of layer {layer}: not recorded")
                break
            a, b = np.asarray(vec), np.asarray(other, dtype=np.float64)
            cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
            if cos < FINGERPRINT_MIN_COSINE:
                diffs.append(f"the model's keys differ (layer {layer}: cosine {cos:.2f}; other weights or seed)")
                break
        if diffs:
            raise IncompatibleMemoryError("this memory was saved by another model or set-up: " + "; ".join(diffs[:6])
                                          + ". Load it into the model that wrote it (memory.load(dir, check_model="
                                          "False) skips this check)")

    def warn_positions(self, worst: int, what: str) -> None:
        """Warn (rotary models) or refuse (learned positions) when a layout can exceed the trained positions."""
        if self.max_positions and worst > self.max_positions and self.config.position_scheme != "original":
            advice = f"{what} = {worst} exceeds the model's {self.max_positions} positions; lower top_k, window or " \
                     "block_size"
            if not self.rotary.enabled:
                raise ConfigError(advice + " (this model has learned absolute positions)")
            warnings.warn(advice + " to stay inside the trained range", stacklevel=4)
