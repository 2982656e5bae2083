"""lm-evaluation-harness on memkit-wrapped models: the ``memkit`` model of lm-eval.

lm-evaluation-harness (Gao et al., EleutherAI, https://github.com/EleutherAI/lm-evaluation-harness; tested with
0.4.13) scores a model through three request types. :class:`MemkitLM` implements them for a memkit-wrapped
decoder so that prompts are never cut to the model's trained positions (``HFLM(pretrained=wrapped)`` left-
truncates every prompt to ``max_length``, which throws away exactly the long context memkit exists for):

* ``loglikelihood(context, continuation)``: one blockwise forward of context + continuation[:-1] with
  ``logits_to_keep=len(continuation)``, so only the continuation's rows of logits are ever held;
* ``loglikelihood_rolling(text)``: the whole document in one streamed forward (``labels`` + ``token_losses``,
  ``logits_to_keep=1``), every token conditioned on everything before it through memory;
* ``generate_until(context, gen_kwargs)``: memkit's ``generate`` (transformers' own), stopping at lm-eval's
  ``until`` strings (checked on every step, then cut like HFLM does) and at ``max_gen_toks``.

Requests are independent: the memory is reset before each one. Requests run one at a time (each owns the
memory), longest first, so the progress bar's ETA is an upper bound. ``mode=window`` is the same wrap with
``top_k=0``; ``mode=full`` is the plain model (it refuses inputs beyond the model's positions instead of
truncating them, and ``loglikelihood_rolling`` then uses lm-eval's rolling windows like HFLM).

Command line (lm-eval 0.4.13 has no plugin hook for third-party models, so ``memkit-lm-eval`` is lm-eval's
own CLI with this model registered; every lm-eval flag works)::

    memkit-lm-eval --model memkit --model_args pretrained=PATH,config=memkit.yaml,threads=2 --tasks lambada_openai
    memkit-lm-eval --model memkit --model_args pretrained=PATH,top_k=16 --tasks niah_single_1 \\
        --metadata '{"max_seq_lengths": [16384]}'

From Python, with a model already wrapped::

    import lm_eval, memkit
    from memkit.evaluation.lm_eval_model import MemkitLM   # also registers "memkit" in lm-eval
    lm = MemkitLM(memkit.wrap(hf_model, tokenizer=tok), tokenizer=tok)
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

Importing this module needs lm-eval (``pip install 'memkit[eval]'``); ``import memkit`` never imports it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

from memkit.errors import ConfigError, InvalidInputError, MissingDependencyError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("the lm-evaluation-harness integration needs lm-eval: pip install 'memkit[eval]' "
                                 "(lm-eval[ruler]==0.4.13)") from _exc

__all__ = ["MemkitLM", "Generation", "MODES", "main"]

MODES = ("memkit", "window", "full")
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default
_F = TypeVar("_F", bound=Callable[..., Any])


def _inference(fn: _F) -> _F:
    """Run ``fn`` without autograd, leaving the caller's grad mode as it was (a training loop in the same process
    keeps its gradients)."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


@dataclass
class Generation:
    """One ``generate_until`` answer with what produced it."""

    text: str  # the continuation, cut at the first stop string (what lm-eval scores)
    raw_text: str  # the decoded continuation before cutting
    prompt_ids: list[int]  # every prompt token the model read (no truncation)
    new_ids: list[int]  # generated token ids
    seconds: float
    stop: list[str]  # the stop strings in force (lm-eval's `until` plus the EOS text)


def _as_int(value: Any, name: str, *, minimum: int) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not an integer") from None
    if out < minimum or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return out


@register_model("memkit")
class MemkitLM(TemplateLM):
    """lm-eval model for a memkit-wrapped decoder; see the module docstring.

    ``pretrained``: a local HF folder / .gguf path (``None`` or ``"smollm2"``: the bundled SmolLM2-135M-Instruct),
    a model returned by :func:`memkit.wrap`, or a plain HF causal LM (wrapped here). ``config``: a memkit
    YAML/JSON file (or a ``MemoryConfig``/dict from Python) for paths and plain models; any other keyword
    naming a ``MemoryConfig`` field (``top_k=16``, ``window=1024``) overrides it. ``mode``: ``memkit`` |
    ``window`` (top_k=0) | ``full`` (plain model). ``threads``: torch CPU threads.
    ``batch_size``/``max_batch_size``/``device`` are accepted because lm-eval's CLI always passes them; requests
    run one by one (each owns the memory), and the device is the model's.
    """

    backend = "causal"

    def __init__(self, pretrained: Any = None, *, tokenizer: Any = None, config: Any = None,
                 mode: str = "memkit", threads: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 add_bos_token: bool = False, progress: bool = False, dtype: str = "float32",
                 batch_size: Any = 1, max_batch_size: Any = None, device: Any = None, **overrides: Any) -> None:
        super().__init__()

        from memkit.evaluation.common import set_threads

        if mode not in MODES:
            raise ConfigError(f"mode={mode!r} is unknown; choose one of {list(MODES)}")
        if threads is not None:
            set_threads(_as_int(threads, "threads", minimum=1))
        self.max_gen_toks = _as_int(max_gen_toks, "max_gen_toks", minimum=1)
        if str(batch_size) not in ("1", "auto") and not str(batch_size).startswith("auto"):
            import warnings

            warnings.warn(f"memkit runs lm-eval requests one at a time (each owns the memory); batch_size="
                          f"{batch_size} is ignored", stacklevel=2)
        self.mode = mode
        self.add_bos_token = bool(add_bos_token)
        self._wrapped_here = False
        model, tok = self._resolve(pretrained, tokenizer, dtype)
        self.tokenizer = tok
        self.plain, self.model = self._setup(model, mode, config, progress, overrides)
        self._device = next(self.plain.parameters()).device
        self.vocab_size = int(getattr(self.plain.config.get_text_config(decoder=True), "vocab_size", 0) or 0)
        from memkit.evaluation.common import max_positions

        self.max_positions = max_positions(self.plain)
        import inspect

        # memkit's forward always takes logits_to_keep; a plain model that does not gets its logits sliced after
        self._keep_kw = self.model is not self.plain or "logits_to_keep" in inspect.signature(self.plain.forward).parameters
        if self.tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no eos_token_id; lm-eval needs one (it ends generations and "
                              "prefixes empty contexts); use a tokenizer that defines eos_token")

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _resolve(pretrained: Any, tokenizer: Any, dtype: str) -> tuple[Any, Any]:
        """(model object, tokenizer object) from what lm-eval or the caller passed."""
        if pretrained is None or isinstance(pretrained, (str, Path)):
            from memkit.models import load_model, load_smollm2

            name = None if pretrained in (None, "", "smollm2") else str(pretrained)
            model, tok = load_smollm2(dtype=dtype) if name is None else load_model(name, dtype=dtype)
        else:
            model, tok = pretrained, None
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
            except (OSError, ValueError) as exc:
                raise InvalidInputError(f"tokenizer={str(tokenizer)!r} is not a local tokenizer folder: "
                                        f"{str(exc).splitlines()[0]}") from exc
        elif tokenizer is not None:
            tok = tokenizer
        if tok is None:
            rt = getattr(model, "_rt", None)
            tok = getattr(rt, "tokenizer", None)
        if tok is None:
            raise InvalidInputError("MemkitLM needs a tokenizer: MemkitLM(model, tokenizer=tok) (or wrap the model "
                                    "with memkit.wrap(model, tokenizer=tok))")
        return model, tok

    def _setup(self, model: Any, mode: str, config: Any, progress: bool, overrides: dict[str, Any]
               ) -> tuple[Any, Any]:
        """(plain HF model, the model requests run on) for ``mode``."""
        import memkit
        from memkit.integrations.wrap import MemkitModel

        if isinstance(model, MemkitModel):
            if config is not None or overrides:
                raise ConfigError("this model is already wrapped: its memkit config is fixed (pass a plain model or "
                                  "a path to set config= or field overrides)")
            if mode == "window":
                raise ConfigError("mode=window needs its own wrap with top_k=0: pass the plain model or a path")
            return model.hf_model, model
        if not hasattr(model, "generate") or not hasattr(model, "config"):
            raise InvalidInputError(f"pretrained must be a local model path, a memkit-wrapped model or a Hugging Face "
                                    f"causal LM; got {type(model).__name__}")
        if mode == "full":
            if config is not None or overrides:
                raise ConfigError(f"mode=full runs the plain model; memkit settings {sorted(overrides) or ['config']} "
                                  "do not apply")
            return model, model
        from memkit.config import load_config
        from memkit.evaluation.common import check_file

        if isinstance(config, (str, Path)):
            check_file(str(config), "config file")
            config = str(config)
        cfg = load_config(config, **overrides)  # a path, a dict or a MemoryConfig
        cfg = cfg.replace(progress=bool(progress))
        if mode == "window":
            cfg = cfg.replace(top_k=0)
        wrapped = memkit.wrap(model, cfg, tokenizer=self.tokenizer)
        self._wrapped_here = True
        return model, wrapped

    def close(self) -> None:
        """Give back the plain model (undo the wrap this object made, if any)."""
        if self._wrapped_here:
            import memkit

            memkit.unwrap(self.model)
            self._wrapped_here = False
            self.model = self.plain

    # ------------------------------------------------------------------ lm-eval plumbing
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def device(self) -> Any:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return super().chat_template(chat_template)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidInputError("--apply_chat_template needs a tokenizer with a chat template; this one has none")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        ids = list(self.tokenizer(string, add_special_tokens=False)["input_ids"])
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        bos = self.tokenizer.bos_token_id
        if add and bos is not None and (not ids or ids[0] != bos):
            ids = [int(bos), *ids]
        return ids

    def tok_decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _reset(self) -> None:
        mem = getattr(self.model, "memory", None)
        if mem is not None:
            mem.reset()

    def _check_fits(self, n: int, what: str) -> None:
        if self.mode == "full" and self.max_positions and n > self.max_positions:
            raise InvalidInputError(f"{what} has {n:,} tokens but the plain model (mode=full) has "
                                    f"{self.max_positions:,} positions; use mode=memkit to read it whole (memkit "
                                    "never truncates)")

    def _ids(self, ids: list[int]) -> Any:
        import torch

        return torch.tensor([ids], dtype=torch.long, device=self._device)  # (1, N)

    # ------------------------------------------------------------------ scoring
    @_inference
    def score(self, context_enc: list[int], continuation_enc: list[int]) -> tuple[float, bool]:
        """(sum of log p(continuation | context), whether greedy decoding would produce the continuation)."""
        import torch

        if not continuation_enc:
            return 0.0, True
        if not context_enc:
            raise InvalidInputError("score needs at least one context token (lm-eval passes the prefix token)")
        ids = (context_enc + continuation_enc)[:-1]  # the last continuation token is only a target
        n = len(continuation_enc)
        self._check_fits(len(ids), "a loglikelihood request")
        self._reset()
        out = self.model(self._ids(ids), **({"logits_to_keep": n} if self._keep_kw else {}))
        logits = out.logits[0, -n:].float()  # (n, V): rows predicting each continuation token
        target = torch.tensor(continuation_enc, dtype=torch.long, device=logits.device)  # (n,)
        logp = torch.log_softmax(logits, -1)
        ll = float(logp.gather(1, target[:, None]).sum())
        greedy = bool((logits.argmax(-1) == target).all())
        return ll, greedy

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        from tqdm.auto import tqdm

        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for i in tqdm(order, desc=f"memkit loglikelihood ({self.mode})", disable=disable_tqdm):
            key, ctx, cont = requests[i]
            res = self.score(ctx, cont)
            out[i] = res
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return [r for r in out if r is not None]

    @_inference
    def rolling_loglikelihood(self, text: str) -> float:
        """log p(text) token by token, conditioned on the prefix token: the whole text through memory."""
        import torch

        tokens = self.tok_encode(text, add_special_tokens=False)
        if not tokens:
            return 0.0
        ids = [self.prefix_token_id, *tokens]
        if self.mode == "full" and self.max_positions and len(ids) > self.max_positions:
            # the plain model: lm-eval's rolling windows of its positions, as HFLM scores long documents
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            total = 0.0
            for pair in get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                                  max_seq_len=self.max_positions, context_len=1):
                ctx, cont = make_disjoint_window(pair)
                total += self.score(ctx, cont)[0]
            return total
        if self.mode == "full":
            return self.score(ids[:1], ids[1:])[0]
        self._reset()
        t = self._ids(ids)
        out = self.model(t, labels=t, token_losses=True, logits_to_keep=1)
        per_token = out.token_losses[0, 1:]  # (N - 1,) loss of token i given tokens < i
        return -float(torch.nansum(per_token.double()))

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from tqdm.auto import tqdm

        out = []
        for req in tqdm(requests, desc=f"memkit loglikelihood_rolling ({self.mode})", disable=disable_tqdm):
            (text,) = req.args
            res = self.rolling_loglikelihood(text)
            out.append(res)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), res)
        return out

    # ------------------------------------------------------------------ generation
    @_inference
    def generate_one(self, context: str, gen_kwargs: dict[str, Any] | None = None, *,
                     logits_processor: Any = None, prompt_ids: list[int] | None = None) -> Generation:
        """Answer one lm-eval ``generate_until`` request: ``until`` stops and cuts, ``max_gen_toks`` caps.
        ``prompt_ids`` replaces the encoded ``context`` (a prompt built from token ids, e.g. chunks read afresh)."""
        import torch
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
        from lm_eval.models.utils_hf import stop_sequences_criteria

        kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_new = _as_int(kwargs.pop("max_gen_toks"), "max_gen_toks", minimum=1)
        if "max_length" in kwargs:
            raise InvalidInputError("gen_kwargs max_length is not supported with memkit (prompts have any length); "
                                    "use max_gen_toks")
        temperature = kwargs.get("temperature", 0.0)
        if not kwargs.get("do_sample") and temperature == 0.0:
            kwargs.pop("temperature", None)
            kwargs["do_sample"] = False
        ids = list(prompt_ids) if prompt_ids is not None else self.tok_encode(context)
        if not ids:
            ids = [self.prefix_token_id]
        self._check_fits(len(ids) + max_new, "a generate_until request (prompt + max_gen_toks)")
        prompt = self._ids(ids)  # (1, N)
        criteria = stop_sequences_criteria(self.tokenizer, [s for s in until if s], prompt.shape[1], 1)
        extra: dict[str, Any] = {}
        if logits_processor is not None:
            extra["logits_processor"] = logits_processor
        self._reset()
        pad = self.tokenizer.pad_token_id
        t0 = time.perf_counter()
        out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new,
                                  stopping_criteria=criteria, pad_token_id=self.eot_token_id if pad is None else pad,
                                  **extra, **kwargs)
        seconds = time.perf_counter() - t0
        new = out[0, prompt.shape[1]:].tolist()
        raw = self.tok_decode(new)
        text = postprocess_generated_text(generation=raw, stop=until, think_end_token=None)
        return Generation(text=text, raw_text=raw, prompt_ids=ids, new_ids=new, seconds=seconds, stop=list(until))

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        args = [req.args for req in requests]
        order = sorted(range(len(args)), key=lambda i: -len(args[i][0]))  # longest first: the ETA is an upper bound
        out: list[str | None] = [None] * len(args)
        for i in tqdm(order, desc=f"memkit generate_until ({self.mode})", disable=disable_tqdm):
            context, gen_kwargs = args[i]
            text = self.generate_one(context, gen_kwargs).text
            out[i] = text
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return [t if t is not None else "" for t in out]

    def get_model_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"memkit_mode": self.mode, "model_max_positions": self.max_positions}
        cfg = getattr(self.model, "memkit_config", None)
        if cfg is not None:
            info["memkit_config"] = cfg.to_dict()
        return info


def main(argv: Sequence[str] | None = None) -> int:
    """``memkit-lm-eval``: lm-eval's own command line with the ``memkit`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    old = sys.argv
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else list(argv))]
    try:
        result: Any = cli_evaluate()
    finally:
        sys.argv = old
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
