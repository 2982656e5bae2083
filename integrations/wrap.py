"""``memkit.wrap``: any Hugging Face decoder reads inputs of any length through chunk-level K/V memory.

    >>> import memkit
    >>> model = memkit.wrap(hf_model, tokenizer=tok)           # doctest: +SKIP
    >>> model(input_ids, labels=input_ids).loss                  # any length, blockwise  # doctest: +SKIP
    >>> model.generate(long_prompt_ids, max_new_tokens=32)       # 80k-token prompts       # doctest: +SKIP
    >>> model.memory.ingest(document_text); model.memory.trace() # doctest: +SKIP

Training-free MemLong-style memory (Liu et al. 2024) with StreamingLLM attention sinks (Xiao et al. 2023)
and InfLLM-style position-free K/V offloading (Xiao et al. 2024). The wrapper is used like the HF model
(``__call__``, ``generate``, ``.config``, ``.device`` and every other attribute pass through) and adds
``.memory``. Memory persists across calls until ``model.memory.reset()``: every call stores what it read in
the namespace of each batch row (``"default"`` for batch 1, ``"row{i}"`` otherwise, or the ``namespaces=[...]``
you pass): chunks that left the window as it read, and at the end what is still in the window
(``flush_window``, the default), so a chat turn of any length is remembered by the next call. A chunk whose
tokens are already stored is not stored twice. ``memkit.unwrap(model)`` gives back the plain model with its
original attention; ``with model.memory_disabled():`` runs the plain model temporarily, in the calling thread
only. A wrapped model may be shared between threads: calls run one after another.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from memkit.config import MemoryConfig, load_config
from memkit.errors import ConfigError, InvalidInputError, UnsupportedModelError
from memkit.paths import user_path

from .attention import RUNTIME_ATTR
from .generate import generate as _generate
from .long_forward import check_ids, ingest, long_forward
from .runtime import Runtime
from .training import load_weights, save_weights

__all__ = ["MemkitModel", "MemoryView", "wrap", "unwrap", "from_pretrained", "CONFIG_FILE"]

CONFIG_FILE = "memkit_config.json"


class MemoryView:
    """``model.memory``: what the wrapped model remembers, per namespace."""

    def __init__(self, model: MemkitModel) -> None:
        self._model = model

    @property
    def _rt(self) -> Runtime:
        return self._model.memkit_runtime

    @property
    def manager(self) -> Any:
        """The underlying :class:`memkit.memory.MemoryManager`."""
        return self._rt.memory

    def ingest(self, text_or_ids: Any, *, namespace: str = "default", progress: bool | None = None
               ) -> dict[str, Any]:
        """Read a document into memory (blockwise, with a progress bar); returns counts and timing.

        ``text_or_ids``: a string (needs the tokenizer given to ``wrap``), a list of ids or a (1, N) tensor.
        Every token ends up in memory (the last chunk may be partial).
        """
        rt = self._rt
        if isinstance(text_or_ids, str):
            if rt.tokenizer is None:
                raise InvalidInputError("ingest(text) needs a tokenizer: memkit.wrap(model, tokenizer=tok), or "
                                        "pass token ids")
            ids = rt.tokenizer(text_or_ids, return_tensors="pt", add_special_tokens=False)["input_ids"]
        else:
            ids = text_or_ids
        ids, _ = check_ids(ids, None, rt.vocab_size, rt.device)
        if ids.shape[0] != 1:
            raise InvalidInputError(f"ingest reads one document at a time; got a batch of {ids.shape[0]}")
        if not isinstance(namespace, str) or not namespace:
            raise InvalidInputError(f"namespace must be a non-empty string, got {namespace!r}")
        return ingest(rt, ids, namespace, progress=progress)

    def reset(self, namespace: str | None = None) -> None:
        """Forget one namespace, or everything."""
        self._rt.memory.reset(namespace)

    def save(self, directory: str | Path) -> None:
        """Save the memory with a record of the model and set-up it belongs to (``load`` checks it)."""
        rt = self._rt
        rt.memory.save(directory, owner=rt.fingerprint())

    def load(self, directory: str | Path, *, check_model: bool = True) -> None:
        """Load a memory saved by ``save``; one saved by another model or set-up is refused (unless
        ``check_model=False``) with a message saying what differs."""
        rt = self._rt
        if not isinstance(check_model, bool):
            raise InvalidInputError(f"check_model must be True or False, got {check_model!r}")
        rt.memory.load(directory, owner_check=rt.check_owner if check_model else None)

    def stats(self) -> dict[str, Any]:
        """Sizes, the style's settings and counters (``added``, ``evicted``, ``retrievals``: since wrap or the last
        ``reset()``; ``reset(namespace)`` keeps them)."""
        rt = self._rt
        out = dict(rt.memory.stats())
        out.update(rt.style.describe())
        return out

    def trace(self, namespace: str = "default") -> list[dict[str, Any]]:
        """The last retrieval in ``namespace``: the chunks attended, with ids, scores, token spans and texts,
        in time order."""
        return self._rt.memory.trace(namespace)  # type: ignore[no-any-return]

    def num_chunks(self, namespace: str | None = None) -> int:
        return int(self._rt.memory.num_chunks(namespace))

    def __repr__(self) -> str:
        return f"MemoryView({self._model._runtime.memory!r})"


class MemkitModel(torch.nn.Module):
    """A wrapped HF causal LM; see the module docstring. Attributes not defined here come from the HF model."""

    _runtime: Runtime  # set with object.__setattr__: not a submodule

    def __init__(self, hf_model: Any, runtime: Runtime) -> None:
        super().__init__()
        self.hf_model = hf_model
        object.__setattr__(self, "_runtime", runtime)
        object.__setattr__(self, "memory", MemoryView(self))
        object.__setattr__(self, "memkit_lora", None)  # LoRA settings once memkit.train injected adapters
        if runtime.style.trainable is not None:  # LongMem gate / SideNet (memkit.integrations.training)
            self.memkit_modules = runtime.style.trainable

    @property
    def memkit_config(self) -> MemoryConfig:
        return self._runtime.config

    @property
    def memkit_runtime(self) -> Runtime:
        """The runtime behind this wrapper (for memkit's own training and evaluation code)."""
        rt = self._runtime
        if rt.model is None:
            raise InvalidInputError("this memkit model was unwrapped; use the model memkit.unwrap returned")
        return rt

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.get_submodule("hf_model"), name)

    def forward(self, input_ids: Any = None, attention_mask: Any = None, labels: Any = None, *,
                namespaces: list[str] | None = None, progress: bool | None = None, **kwargs: Any) -> Any:
        """Like the HF forward, for inputs of any length: ``.logits`` has one row per position unless
        ``logits_to_keep`` is given (``logits_to_keep=1`` for the last only); ``.loss`` covers every token.
        ``flush_window=False`` leaves the end of the input out of memory (default: the config's)."""
        rt = self.memkit_runtime
        if rt.disabled:
            return self.hf_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                 **_plain_kwargs(kwargs))
        if input_ids is None:
            raise InvalidInputError("memkit forward needs input_ids")
        if kwargs.pop("all_logits", None) is not None:
            warnings.warn("all_logits is no longer needed: .logits holds every position by default (pass "
                          "logits_to_keep=1 for the last only)", FutureWarning, stacklevel=2)
        return long_forward(rt, input_ids, attention_mask, labels, namespaces=namespaces, progress=progress,
                            **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: Any = None, attention_mask: Any = None, *, namespaces: list[str] | None = None,
                 progress: bool | None = None, **kwargs: Any) -> Any:
        """transformers' ``generate`` with memory; prompts of any length. Same keyword arguments."""
        rt = self.memkit_runtime
        if rt.disabled:
            return self.hf_model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                          **_plain_kwargs(kwargs))
        return _generate(rt, input_ids, attention_mask, namespaces=namespaces, progress=progress, **kwargs)

    @contextlib.contextmanager
    def memory_disabled(self) -> Iterator[MemkitModel]:
        """Within the block the model is the plain HF model (no memory, no window, original attention) for the
        calling thread only: other threads' calls keep their memory. memkit's own per-call keywords
        (``flush_window``, ``namespaces``, ``progress``) are accepted and have nothing to do."""
        rt = self.memkit_runtime
        old, rt.disabled = rt.disabled, True
        try:
            yield self
        finally:
            rt.disabled = old

    def save_pretrained(self, directory: str | Path, *, save_memory: bool = False) -> None:
        """Write memkit's config (JSON) and trained parameters, with ``save_memory`` the memory too; the HF weights
        are not written. Only memkit's own files are written in ``directory``."""
        rt = self.memkit_runtime
        d = user_path(directory, "save_pretrained")
        if d.exists() and not d.is_dir():
            raise InvalidInputError(f"{str(d)!r} is a file; save_pretrained writes into a directory")
        d.mkdir(parents=True, exist_ok=True)
        (d / CONFIG_FILE).write_text(json.dumps(rt.config.to_dict(), indent=2))
        save_weights(self, d)  # memkit's trained parameters only (gates, SideNet, LoRA), if any
        if save_memory:
            self.memory.save(d / "memory")

    def __repr__(self) -> str:
        rt = self._runtime
        return (f"MemkitModel({type(self.hf_model).__name__}, style={rt.config.style!r}, top_k={rt.config.top_k}, "
                f"window={rt.config.window}, {rt.style.describe()})")


def _plain_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keywords of a call made inside ``memory_disabled()``, less memkit's own (the plain model refuses them)."""
    flush = kwargs.pop("flush_window", None)
    if flush is not None and not isinstance(flush, bool):
        raise InvalidInputError(f"flush_window must be True, False or None (the config's), got {flush!r}")
    kwargs.pop("memkit_tail", None)
    return kwargs


def wrap(model: Any, config: MemoryConfig | dict[str, Any] | str | Path | None = None, *, tokenizer: Any = None,
         memory: Any = None, **overrides: Any) -> MemkitModel:
    """Wrap a HF causal LM so it reads inputs of any length through chunk memory.

    ``config``: a MemoryConfig, a dict, or a YAML/JSON path; ``overrides`` change single fields
    (``top_k=16``, ``window=1024``, ``backend="usearch"``...). ``tokenizer`` enables the text retriever (MiniLM
    of chunk text) and ``memory.ingest(text)``. ``memory`` injects an existing MemoryManager. Every setting is
    checked here (the bank backend is built once), so a bad one fails now, not at the first stored chunk.
    """
    if isinstance(model, MemkitModel):
        raise InvalidInputError("this model is already wrapped by memkit; call memkit.unwrap(model) first")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config") or not hasattr(model, "generate"):
        raise UnsupportedModelError(f"memkit.wrap needs a Hugging Face causal LM (PreTrainedModel with generate), "
                                    f"got {type(model).__name__}")
    if any(getattr(m, RUNTIME_ATTR, None) is not None for m in model.modules()):
        raise InvalidInputError("this HF model is already wrapped by memkit; unwrap the existing wrapper first")
    cfg = load_config(config, **overrides)
    rt = Runtime(model, cfg, tokenizer=tokenizer, memory=memory)
    return _wrapper_class(model)(model, rt)


_CLASSES: dict[str, type[MemkitModel]] = {}


def _wrapper_class(model: Any) -> type[MemkitModel]:
    """MemkitModel under the wrapped class's name (``LlamaForCausalLM``...): HF pipelines check the model's class
    name against the task's supported models and would otherwise log "not supported" on every call."""
    name = type(model).__name__
    if name not in _CLASSES:
        _CLASSES[name] = type(name, (MemkitModel,), {"__module__": __name__, "__qualname__": f"MemkitModel[{name}]",
                                                     "__doc__": MemkitModel.__doc__})
    return _CLASSES[name]


def unwrap(model: Any) -> Any:
    """Return the plain HF model with its original attention implementation, hooks removed."""
    if not isinstance(model, MemkitModel):
        raise InvalidInputError(f"memkit.unwrap expects a model returned by memkit.wrap, got {type(model).__name__}")
    rt = model._runtime
    hf = model.get_submodule("hf_model")
    if rt.model is not None:
        with rt.lock:  # never while another thread's call runs
            rt.remove()
            rt.model = None
    return hf


def from_pretrained(base_model: Any, directory: str | Path | None = None, *, tokenizer: Any = None,
                    **overrides: Any) -> MemkitModel:
    """Wrap ``base_model`` (a model or a local HF folder) with the memkit config saved in ``directory``.

    Loads the saved memory too when ``directory/memory`` exists.
    """
    if isinstance(base_model, (str, Path)):
        from memkit.models import load_model

        base_model, tok = load_model(str(base_model))
        tokenizer = tokenizer or tok
    cfg: Any = None
    mem_dir = None
    d = None if directory is None else user_path(directory, "from_pretrained", error=ConfigError)
    if d is not None:
        if not (d / CONFIG_FILE).is_file():
            raise ConfigError(f"{d} has no {CONFIG_FILE}; write one with model.save_pretrained(dir)")
        cfg = d / CONFIG_FILE
        mem_dir = d / "memory" if (d / "memory").is_dir() else None
    wrapped = wrap(base_model, cfg, tokenizer=tokenizer, **overrides)
    if d is not None:
        load_weights(wrapped, d)  # trained gates / SideNet / LoRA written by save_pretrained
    if mem_dir is not None:
        wrapped.memory.load(mem_dir)
    return wrapped
