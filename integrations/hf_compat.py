"""What memkit assumes about transformers and peft, in one place, checked instead of trusted.

memkit lives on transformers' internals (design.md, "Living on transformers' internals"): the name of the
cache argument, how ``generate`` slices the prompt against a cache, ``AttentionInterface``; and on peft's
``PeftModel`` layout. Those move every month. This module

* states the tested ranges (:data:`TESTED_TRANSFORMERS`, :data:`TESTED_PEFT`; ``pyproject.toml`` admits
  exactly these, a test keeps them equal, and ``make test`` runs the wrap tests at both ends);
* answers the version-dependent questions (:func:`cache_kwarg`: ``cache=`` from 5.24, ``past_key_values=``
  before);
* unwraps a peft model to the decoder memkit hooks (:func:`resolve_decoder`), refusing what cannot work;
* and gives the error raised when transformers breaks an assumption at run time (:func:`broken_assumption`):
  memkit never computes a silently wrong answer on a version it was not tested with.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch

from memkit.errors import IncompatibleLibraryError, UnsupportedModelError

__all__ = ["TESTED_TRANSFORMERS", "TESTED_PEFT", "cache_kwarg", "check_versions", "resolve_decoder",
           "broken_assumption", "library_version", "outside_range"]

# Keep equal to pyproject.toml (tests/test_hf_compat.py checks); widen only after `make test` is green at both ends.
TESTED_TRANSFORMERS = ">=5.18.0,<5.25"
TESTED_PEFT = ">=0.18.0,<0.22"


def library_version(name: str) -> str | None:
    """Installed version of ``name`` ("transformers", "peft"), or None when it is not importable."""
    try:
        module = __import__(name)
    except ImportError:
        return None
    return str(getattr(module, "__version__", "unknown"))


def outside_range(name: str, spec: str) -> str | None:
    """The installed version of ``name`` when it lies outside ``spec`` (None when inside or not installed)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    have = library_version(name)
    if have is None:
        return None
    try:
        ok = Version(have) in SpecifierSet(spec)
    except InvalidVersion:
        ok = False
    return None if ok else have


def check_versions() -> None:
    """Warn when the installed transformers or peft lies outside the tested range (once per process: the
    warnings module shows a warning once per call site)."""
    for name, spec in (("transformers", TESTED_TRANSFORMERS), ("peft", TESTED_PEFT)):
        have = outside_range(name, spec)
        if have is not None:
            warnings.warn(f"memkit was tested with {name}{spec}; {name} {have} is installed. memkit checks its "
                          f"assumptions at run time and raises IncompatibleLibraryError where one fails; "
                          f"`pip install '{name}{spec}'` to stay on the tested range", stacklevel=3)


def broken_assumption(what: str) -> IncompatibleLibraryError:
    """The error for a transformers behaviour memkit relies on and did not get (names the version)."""
    return IncompatibleLibraryError(
        f"{what}. This is transformers {library_version('transformers')} (memkit is tested with "
        f"transformers{TESTED_TRANSFORMERS}); memkit refuses to continue rather than compute a wrong answer: "
        f"install a tested version (`pip install 'transformers{TESTED_TRANSFORMERS}'`) or report the version")


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword a causal LM's ``forward``/``generate`` takes its cache by: ``cache`` (5.24+) or ``past_key_values``."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def resolve_decoder(model: Any) -> tuple[Any, torch.nn.Module]:
    """(causal LM, decoder) memkit hooks for ``model``: the model itself, or the model inside a ``PeftModel``.

    The decoder is the module whose forward runs once per step (``LlamaModel`` in ``LlamaForCausalLM``). For a
    peft model the causal LM is ``model.get_base_model()`` (LoRA layers injected in place), so every path —
    the peft model's ``forward``/``generate`` and HF ``generate``'s own steps — passes the decoder's hooks.
    Prompt-learning methods (prefix/prompt tuning) feed virtual tokens through the cache and are refused.
    """
    lm = model
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        active = getattr(model, "active_peft_config", None)
        if getattr(active, "is_prompt_learning", False):
            raise UnsupportedModelError(
                f"{type(model).__name__} uses {getattr(active, 'peft_type', 'prompt learning')}, which feeds virtual "
                "tokens through the cache; memkit keeps the context itself. Use LoRA-style adapters (or merge the "
                "adapter) with memkit")
        lm = get_base()
    decoder = getattr(lm, "base_model", None)
    if not isinstance(decoder, torch.nn.Module) or decoder is lm:
        raise UnsupportedModelError(f"{type(lm).__name__} has no base_model decoder to attach memkit to")
    return lm, decoder
