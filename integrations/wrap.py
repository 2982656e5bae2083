"""``memkit.wrap``: any Hugging Face decoder reads inputs of any length through chunk-level K/V memory.

    >>> import memkit
    >>> model = memkit.wrap(hf_model, tokenizer=tok)           # doctest: +SKIP
    >>> model(input_ids, labels=input_ids).loss                  # any length, blockwise  # doctest: +SKIP
    >>> model.generate(long_prompt_ids, max_new_tokens=32)       # 80k-token prompts       # doctest: +SKIP
    >>> model.memory.ingest(document_text); model.memory.trace() # doctest: +SKIP

Training-free MemLong-style memory (Liu et al. 2024) with StreamingLLM attention sinks (Xiao et al. 2023)
and InfLLM-style position-free K/V offloading (Xiao et al. 2024). The wrapper is used like the HF model
(``__call__``, ``generate``, ``.config``, ``.device`` and every other attribute pass through) and adds
``.memory``. Memory persists across calls until ``model.memory.reset()``: every call adds the chunks that
left its window to the namespace of each batch row (``"default"`` for batch 1, ``"row{i}"`` otherwise, or the
``namespaces=[...]`` you pass). ``memkit.unwrap(model)`` gives back the plain model with its original
attention; ``with model.memory_disabled():`` runs the plain model temporarily.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from memkit.integrations.generate import generate as _generate
from memkit.integrations.long_forward import check_ids, ingest, long_forward
from memkit.integrations.runtime import Runtime

from memkit.config import MemoryConfig, load_config
from memkit.errors import ConfigError, InvalidInputError, UnsupportedModelError

__all__ = ["MemkitModel", "MemoryView", "wrap", "unwrap", "from_pretrained", "CONFIG_FILE"]

CONFIG_FILE = "memkit_config.json"


class MemoryView:
    """``model.memory``: what the wrapped model remembers, per namespace."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt

    @property
    def manager(self) -> Any:
        """The underlying :class:`memkit.memory.MemoryManager`."""
        return self._rt.memory

    def ingest(self, text_or_ids: Any, *, namespace: str = "default", progress: bool | None = None
               ) -> dict[str, Any]:
        """Read a document into memory (blockwise, with a progress bar); returns counts and timing.

        ``text_or_ids``: a string (needs the tokenizer given to ``wrap``), a list of ids or a (1, N) tensor.
        """
        rt = self._rt
        if isinstance(text_or_ids, str):
            if rt.tokenizer is None:
                raise InvalidInputError("ingest(text) needs a tokenizer: memkit.wrap(model, tokenizer=tok), or "
                                        "pass token ids")
            ids = rt.tokenizer(text_or_ids, return_tensors="pt", add_special_tokens=False)["input_ids"]
        else:
            ids = text_or_ids
        vocab = getattr(rt.model.config.get_text_config(decoder=True), "vocab_size", None)
        ids, _ = check_ids(ids, None, vocab, rt.device)
        if ids.shape[0] != 1:
            raise InvalidInputError(f"ingest reads one document at a time; got a batch of {ids.shape[0]}")
        return ingest(rt, ids, namespace, progress=progress)

    def reset(self, namespace: str | None = None) -> None:
        """Forget one namespace, or everything."""
        self._rt.memory.reset(namespace)

    def save(self, directory: str | Path) -> None:
        self._rt.memory.save(directory)

    def load(self, directory: str | Path) -> None:
        self._rt.memory.load(directory)

    def stats(self) -> dict[str, Any]:
        out = dict(self._rt.memory.stats())
        out.update(memory_layers=self._rt.memory_layers, retrieval_layers=self._rt.retrieval_layers,
                   retriever=self._rt.retriever_kind)
        return out

    def trace(self, namespace: str = "default") -> list[dict[str, Any]]:
        """The last retrieval in ``namespace``: chunk ids, scores, token spans and texts, in time order."""
        return self._rt.memory.trace(namespace)

    def num_chunks(self, namespace: str | None = None) -> int:
        return self._rt.memory.num_chunks(namespace)

    def __repr__(self) -> str:
        return f"MemoryView({self._rt.memory!r})"


class MemkitModel(torch.nn.Module):
    """A wrapped HF causal LM; see the module docstring. Attributes not defined here come from the HF model."""

    def __init__(self, hf_model: Any, runtime: Runtime) -> None:
        super().__init__()
        self.hf_model = hf_model
        object.__setattr__(self, "_rt", runtime)
        object.__setattr__(self, "memory", MemoryView(runtime))
        if getattr(runtime, "trainable", None) is not None:  # LongMem gate / SideNet (memkit.integrations.training)
            self.memkit_modules = runtime.trainable

    @property
    def memkit_config(self) -> MemoryConfig:
        return self._rt.config

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["hf_model"], name)

    def _live(self) -> Runtime:
        rt = self._rt
        if rt.model is None:
            raise InvalidInputError("this memkit model was unwrapped; use the model memkit.unwrap returned")
        return rt

    def forward(self, input_ids: Any = None, attention_mask: Any = None, labels: Any = None, *,
                namespaces: list[str] | None = None, progress: bool | None = None, **kwargs: Any) -> Any:
        """Like the HF forward, for inputs of any length: ``.logits`` has one row per position unless
        ``logits_to_keep`` is given (``logits_to_keep=1`` for the last only); ``.loss`` covers every token."""
        rt = self._live()
        if rt.disabled:
            return self.hf_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
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
        rt = self._live()
        if rt.disabled:
            return self.hf_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return _generate(rt, input_ids, attention_mask, namespaces=namespaces, progress=progress, **kwargs)

    @contextlib.contextmanager
    def memory_disabled(self) -> Iterator[MemkitModel]:
        """Within the block the model is the plain HF model (no memory, no window, original attention)."""
        rt = self._live()
        old, rt.disabled = rt.disabled, True
        try:
            yield self
        finally:
            rt.disabled = old

    def save_pretrained(self, directory: str | Path, *, save_memory: bool = False) -> None:
        """Write memkit's config (JSON) and, with ``save_memory``, the memory; the HF weights are not written."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / CONFIG_FILE).write_text(json.dumps(self._rt.config.to_dict(), indent=2))
        from memkit.integrations.training import save_weights

        save_weights(self, d)  # memkit's trained parameters only (gates, SideNet, LoRA), if any
        if save_memory:
            self._rt.memory.save(d / "memory")

    def __repr__(self) -> str:
        rt = self._rt
        return (f"MemkitModel({type(self.hf_model).__name__}, memory_layers={rt.memory_layers}, "
                f"top_k={rt.config.top_k}, window={rt.config.window}, retriever={rt.retriever_kind!r})")


def wrap(model: Any, config: MemoryConfig | dict[str, Any] | str | Path | None = None, *, tokenizer: Any = None,
         memory: Any = None, **overrides: Any) -> MemkitModel:
    """Wrap a HF causal LM so it reads inputs of any length through chunk memory.

    ``config``: a MemoryConfig, a dict, or a YAML/JSON path; ``overrides`` change single fields
    (``top_k=16``, ``window=1024``...). ``tokenizer`` enables the text retriever (MiniLM of chunk text) and
    ``memory.ingest(text)``. ``memory`` injects an existing MemoryManager (or a compatible store).
    """
    if isinstance(model, MemkitModel):
        raise InvalidInputError("this model is already wrapped by memkit; call memkit.unwrap(model) first")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config") or not hasattr(model, "generate"):
        raise UnsupportedModelError(f"memkit.wrap needs a Hugging Face causal LM (PreTrainedModel with generate), "
                                    f"got {type(model).__name__}")
    if any(getattr(m, "_memkit_runtime", None) is not None for m in model.modules()):
        raise InvalidInputError("this HF model is already wrapped by memkit; unwrap the existing wrapper first")
    cfg = load_config(config, **overrides)
    if cfg.style != "memlong":
        try:
            from memkit.integrations.longmem import LongMemRuntime
        except ImportError as exc:
            raise ConfigError(f"style={cfg.style!r} is not available in this build; use style='memlong'") from exc
    rt = (Runtime if cfg.style == "memlong" else LongMemRuntime)(model, cfg, tokenizer=tokenizer, memory=memory)
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
    rt = model._rt
    hf = model._modules["hf_model"]
    if rt.model is not None:
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
    if directory is not None:
        d = Path(directory)
        if not (d / CONFIG_FILE).is_file():
            raise ConfigError(f"{d} has no {CONFIG_FILE}; write one with model.save_pretrained(dir)")
        cfg = d / CONFIG_FILE
        mem_dir = d / "memory" if (d / "memory").is_dir() else None
    wrapped = wrap(base_model, cfg, tokenizer=tokenizer, **overrides)
    if directory is not None:
        from memkit.integrations.training import load_weights

        load_weights(wrapped, Path(directory))  # trained gates / SideNet / LoRA written by save_pretrained
    if mem_dir is not None:
        wrapped.memory.load(mem_dir)
    return wrapped
