"""``memkit eval ruler``: RULER synthetic long-context tasks through lm-evaluation-harness, with answer locations.

RULER (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?", 2024) builds
needle-in-a-haystack, variable-tracking and word-frequency tasks at a chosen token length. This command builds
the samples with lm-evaluation-harness's own RULER task code (lm-eval 0.4.13, ``lm_eval/tasks/ruler``): its
generators, its prompts (``build_all_requests``), its generation settings and its metric (``process_results``:
the share of gold strings found in the answer). Only the tasks that build offline are offered (the rest need
the Paul Graham essays or QA sets from the Hub)::

    memkit eval ruler --lengths 4k,16k --tasks niah_single_1,niah_multikey_2,ruler_vt --limit 5 --modes memkit,full

* samples are built once per task x length x tokenizer x lm-eval version (lm-eval makes 500 whatever the
  limit) and cached as JSON under ``$MEMKIT_CACHE/ruler`` (:func:`memkit.resources.cache_dir`); reruns read
  the cache and never import the generators;
* ``--limit N`` samples per cell (the first N, as ``lm_eval --limit``) run through :class:`MemkitLM`
  (memory reset per sample, no truncation); ``full`` is the plain model and runs only where the target length
  fits its positions, ``window`` is memkit with ``top_k=0``;
* for every memkit/window sample the gold strings are located as token spans in the prompt and classified by
  where they were when the model started answering (the step that read the end of the prompt): ``window``
  (after the last chunk stored in memory: never evicted), ``sinks`` (the first ``sink_tokens``), ``retrieved``
  (inside the chunks that step attended), ``partial`` (split, only part visible) or ``missed``. With the text
  retriever the rank of the answer's chunk among all stored chunks (MiniLM similarity to the query the step
  used: the prompt's last ``chunk_size`` tokens) is recorded too;
* results go to ``--out``: ``ruler.json`` (every sample), ``ruler.md`` (score table + location breakdown),
  ``ruler.png`` and ``ruler.jsonl``, the journal each sample is written to as it finishes
  (:mod:`memkit.evaluation.journal`): ``--resume`` continues an interrupted run without rerunning its samples.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import random
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memkit.errors import IncompatibleLibraryError, InvalidInputError, MemkitError, MissingDependencyError
from memkit.evaluation.common import (
    add_common_arguments,
    load_config_arg,
    load_for_args,
    max_positions,
    parse_modes,
    set_threads,
    write_json,
)
from memkit.evaluation.haystack import parse_lengths
from memkit.evaluation.journal import SampleJournal
from memkit.evaluation.ruler_report import LOCATIONS, fmt_len, location_table, plot, score_table

__all__ = ["add_arguments", "run", "OFFLINE_TASKS", "RulerBuildError", "RulerSamples", "load_samples",
           "make_task", "answer_token_spans", "classify", "TailCapture", "evaluate_sample", "LOCATIONS"]

# task name -> YAML file in lm_eval/tasks/ruler (lm-eval 0.4.13); these build without downloads
OFFLINE_TASKS = {
    "niah_single_1": "niah_single_1.yaml",
    "niah_multikey_2": "niah_multikey_2.yaml",
    "niah_multikey_3": "niah_multikey_3.yaml",
    "ruler_vt": "vt.yaml",
    "ruler_cwe": "cwe.yaml",
    "ruler_fwe": "fwe.yaml",
}
ONLINE_TASKS = {
    **{t: "the Paul Graham essays haystack (downloaded from the Hub, and nltk's punkt_tab)" for t in
       ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multiquery", "niah_multivalue")},
    "ruler_qa_squad": "SQuAD (downloaded from the Hub)", "ruler_qa_hotpot": "HotpotQA (downloaded from the Hub)",
}
LMEVAL_VERSION = "0.4.13"
SEEDS = (0, 1234)  # lm-eval's defaults for python's random and numpy (`lm_eval --seed 0,1234,...`)
DEFAULT_OUT = "memkit-ruler"


class RulerBuildError(MemkitError, ValueError):
    """lm-eval's RULER generator cannot build this task at this length with this tokenizer."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, modes_default="memkit")
    p.add_argument("--lengths", default="4k", metavar="LIST",
                   help="comma-separated RULER lengths in tokens (prompt + answer budget); k = 1024 (default: 4k)")
    p.add_argument("--tasks", default="niah_single_1,niah_multikey_2,ruler_vt", metavar="LIST",
                   help=f"comma-separated RULER tasks that build offline: {', '.join(OFFLINE_TASKS)} "
                        "(default: niah_single_1,niah_multikey_2,ruler_vt)")
    p.add_argument("--limit", type=int, default=5, metavar="N",
                   help="samples per task x length x mode: the first N of lm-eval's 500 (default: 5)")
    p.add_argument("--full-max", default=None, metavar="LEN",
                   help="longest length run in 'full' mode (default: the model's trained positions)")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap prompts in the tokenizer's chat template (lm_eval --apply_chat_template)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached samples")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"folder for ruler.json, ruler.md, ruler.png and the per-sample journal ruler.jsonl "
                        f"(default: {DEFAULT_OUT})")
    p.add_argument("--resume", action="store_true",
                   help="continue the run journalled in --out/ruler.jsonl: samples already there are reused, "
                        "the rest run (the settings must be the same)")


def parse_tasks(text: str) -> list[str]:
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise InvalidInputError(f"--tasks is empty; choose from {', '.join(OFFLINE_TASKS)}")
    for n in names:
        if n in ONLINE_TASKS:
            raise InvalidInputError(f"RULER task {n!r} needs {ONLINE_TASKS[n]}; memkit eval ruler runs offline: "
                                    f"choose from {', '.join(OFFLINE_TASKS)}")
        if n not in OFFLINE_TASKS:
            raise InvalidInputError(f"unknown RULER task {n!r}; choose from {', '.join(OFFLINE_TASKS)}")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------- samples
def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as exc:
        raise MissingDependencyError("memkit eval ruler needs lm-evaluation-harness: pip install 'memkit[eval]' "
                                     f"(lm-eval[ruler]=={LMEVAL_VERSION})") from exc
    return lm_eval


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _ruler_dir() -> Path:
    import lm_eval.tasks

    d = Path(lm_eval.tasks.__file__).parent / "ruler"
    if not d.is_dir():
        raise IncompatibleLibraryError(f"lm-eval {_lm_eval_version()} has no tasks/ruler folder; memkit eval ruler "
                                       f"is tested with lm-eval {LMEVAL_VERSION}")
    return d


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of what decides token counts: the tokenizer's vocabulary/merges and special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return h.hexdigest()[:16]


@dataclass
class RulerSamples:
    """lm-eval's samples of one task at one length, and where they came from."""

    task: str
    length: int
    docs: list[dict[str, Any]]
    cache_file: Path
    cache: str  # "hit" | "built" | "rebuilt"
    build_seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _quiet_lm_eval(*, bars: bool = False) -> Iterator[None]:
    """lm-eval's generators print a line per attempt and log a note per task; keep stdout for memkit's table.
    Their progress bars (stderr) stay unless ``bars`` is False."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), \
                (contextlib.nullcontext() if bars else contextlib.redirect_stderr(io.StringIO())):
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _no_punkt_download() -> None:
    """lm-eval's niah module downloads nltk's punkt_tab at import when it is missing; the offline tasks never
    split sentences (only the essay haystack does), so an empty placeholder at the end of nltk's search path
    stops the download (a real punkt_tab earlier in the path still wins)."""
    import nltk

    from memkit.resources import cache_dir

    root = cache_dir() / "nltk_data"
    (root / "tokenizers" / "punkt_tab").mkdir(parents=True, exist_ok=True)
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))


def _yaml_config(name: str) -> tuple[dict[str, Any], Path]:
    from lm_eval.tasks._yaml_loader import load_yaml

    ruler = _ruler_dir()
    path = ruler / OFFLINE_TASKS[name]
    if not path.is_file():
        raise IncompatibleLibraryError(f"lm-eval {_lm_eval_version()} has no {path.name} for {name}; memkit eval "
                                       f"ruler is tested with lm-eval {LMEVAL_VERSION}")
    cfg = load_yaml(path, resolve_func=False)  # "!function x.y" stays the string "<ruler dir>/x.y"
    if cfg.get("task") != name:
        raise IncompatibleLibraryError(f"{path} defines task {cfg.get('task')!r}, not {name!r} (lm-eval "
                                       f"{_lm_eval_version()}; tested with {LMEVAL_VERSION})")
    return cfg, ruler


def _resolve(value: Any, ruler: Path) -> Any:
    """An unresolved ``!function`` of a RULER YAML (a path string inside the ruler folder) -> the function."""
    from lm_eval.tasks._yaml_loader import _import_fun_from_str

    if isinstance(value, str) and value.startswith(str(ruler) + os.sep):
        return _import_fun_from_str(value)
    return value


def _precheck(name: str, length: int, tokenizer: Any) -> None:
    """Refuse lengths where lm-eval's generator would loop forever (its ``while True`` retries never shrink)."""
    state, np_state = random.getstate(), None
    import numpy as np

    np_state = np.random.get_state()
    try:
        with _quiet_lm_eval():
            if name == "ruler_vt":
                from lm_eval.tasks.ruler import vt_utils

                # the in-context example is sized at 500 tokens with 5 noise lines at least
                text, ans = vt_utils.generate_input_output(5, 1, 4, is_icl=True)
                icl = len(tokenizer(text + f" {ans}").input_ids) + 30
                body, _ = vt_utils.generate_input_output(10, 1, 4)
                need = 500 + len(tokenizer(body).input_ids) + 30
                if icl > 500 or need > length:
                    raise RulerBuildError(
                        f"ruler_vt cannot be built at {length} tokens with this tokenizer: lm-eval sizes its in-context "
                        f"example at 500 tokens ({icl} needed) and the sample needs about {need}; its generator "
                        "would retry forever. Use a longer --lengths or another task")
            elif name == "ruler_cwe":
                from lm_eval.tasks.ruler import cwe_utils

                _, text, _ = cwe_utils.generate_input_output(10, length)
                need = len(tokenizer(text).input_ids) + 120
                if need > length:
                    raise RulerBuildError(
                        f"ruler_cwe cannot be built at {length} tokens with this tokenizer: its smallest sample (10 "
                        f"words) needs {need}; lm-eval's generator would retry forever. Use a longer --lengths")
    finally:
        random.setstate(state)
        np.random.set_state(np_state)


def _cache_path(name: str, length: int, fingerprint: str, version: str) -> Path:
    from memkit.resources import cache_dir

    d = cache_dir() / "ruler"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{name}-{length}-tok{fingerprint}-lmeval{version}-seed{SEEDS[0]}.{SEEDS[1]}.json"


def _read_cache(path: Path, name: str, length: int) -> list[dict[str, Any]] | None:
    try:
        data = json.loads(path.read_text())
        docs = data["docs"]
        if data.get("task") != name or int(data.get("length")) != length or not isinstance(docs, list) or not docs:
            raise ValueError("header does not match")
        if not all(isinstance(d, dict) and {"input", "outputs", "max_length"} <= set(d) for d in docs):
            raise ValueError("a sample lacks input/outputs/max_length")
        return docs
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"RULER sample cache {path} is unreadable ({exc}); rebuilding it", stacklevel=3)
        return None


def load_samples(name: str, length: int, tokenizer: Any, tokenizer_folder: str | Path, *,
                 rebuild: bool = False, progress: bool = False) -> RulerSamples:
    """lm-eval's 500 samples of ``name`` at ``length`` tokens for ``tokenizer`` (saved in ``tokenizer_folder``,
    which lm-eval's generator loads by path), from the cache or built now and cached."""
    _lm_eval()
    version = _lm_eval_version()
    fp = tokenizer_fingerprint(tokenizer)
    path = _cache_path(name, length, fp, version)
    meta = {"lm_eval": version, "tokenizer_fingerprint": fp, "seeds": list(SEEDS), "tokenizer": str(tokenizer_folder)}
    state = "built"
    if path.is_file() and not rebuild:
        docs = _read_cache(path, name, length)
        if docs is not None:
            return RulerSamples(name, length, docs, path, "hit", meta=meta)
        state = "rebuilt"
    _no_punkt_download()
    _precheck(name, length, tokenizer)
    cfg, ruler = _yaml_config(name)
    build = _resolve(cfg["custom_dataset"], ruler)
    import numpy as np

    random.seed(SEEDS[0])
    np.random.seed(SEEDS[1])
    t0 = time.perf_counter()
    with _quiet_lm_eval(bars=progress):
        dataset = build(tokenizer=str(tokenizer_folder), max_seq_lengths=[length])
    docs = [dict(d) for d in dataset["test"]]
    seconds = time.perf_counter() - t0
    empty = [d.get("index") for d in docs if not d.get("outputs") or not all(str(o) for o in d["outputs"])]
    if empty:
        raise RulerBuildError(f"{name} at {length} tokens: lm-eval built {len(empty)} samples with no answer (this "
                              "tokenizer leaves no room for the task's words at this length); use a longer --lengths")
    payload = {"task": name, "length": length, **meta, "build_seconds": round(seconds, 1), "docs": docs}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)
    return RulerSamples(name, length, docs, path, state, build_seconds=seconds, meta=meta)


def make_task(samples: RulerSamples, tokenizer_folder: str | Path) -> Any:
    """lm-eval's ConfigurableTask for the samples: the task's own YAML (prompt, generation settings, metric)
    with its dataset taken from ``samples`` instead of the generator (which is never imported)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    cfg, ruler = _yaml_config(samples.task)
    docs = samples.docs

    def cached(**_: Any) -> dict[str, Any]:
        return {"test": datasets.Dataset.from_list(docs, split=datasets.Split.TEST)}

    cfg["custom_dataset"] = cached
    for key in ("process_results", "doc_to_text", "doc_to_target", "process_docs"):
        if key in cfg:
            cfg[key] = _resolve(cfg[key], ruler)
    cfg["metric_list"] = [{k: _resolve(v, ruler) for k, v in m.items()} for m in cfg.get("metric_list", [])]
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    cfg["metadata"] = {**(cfg.get("metadata") or {}), "tokenizer": str(tokenizer_folder),
                       "max_seq_lengths": [samples.length], "config_source": str(ruler / OFFLINE_TASKS[samples.task])}
    with _quiet_lm_eval():
        return ConfigurableTask(config=cfg)


def requests_for(task: Any, limit: int, *, chat_template: Any = None, tokenizer_name: str = "") -> list[Any]:
    """The first ``limit`` generate_until requests exactly as ``lm_eval --limit`` builds them."""
    with _quiet_lm_eval():
        task.build_all_requests(limit=limit, rank=0, world_size=1, apply_chat_template=chat_template is not None,
                                chat_template=chat_template, tokenizer_name=tokenizer_name)
    return list(task.instances)


def score_of(task: Any, doc: dict[str, Any], text: str) -> float:
    """The task's own metric for one answer (RULER: share of gold strings contained in the answer)."""
    metrics = task.process_results(doc, [text])
    return float(metrics[str(doc["max_length"])])


def aggregate(task: Any, length: int, scores: list[float]) -> float | None:
    if not scores:
        return None
    agg = task.aggregation().get(str(length))
    if agg is not None:
        return float(agg(scores))
    return sum(scores) / len(scores)  # lengths outside the YAML's metric list: the same mean


# ---------------------------------------------------------------------------------------------- answer locations
def answer_token_spans(tokenizer: Any, context: str, prompt_ids: list[int], answer: str) -> list[tuple[int, int]]:
    """Token spans [a, b) of every occurrence of ``answer`` (as a whole word) in ``context``, in ``prompt_ids``.

    ``prompt_ids`` are the ids the model read (``context`` tokenized, possibly after a BOS); characters map to
    tokens through the tokenizer's offsets. Returns [] when the tokenizer has no offsets or ids disagree."""
    enc = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc.get("offset_mapping")
    if offsets is None:
        return []
    shift = len(prompt_ids) - len(ids)
    if shift < 0 or prompt_ids[shift:] != ids:
        return []
    spans = []
    for m in re.finditer(r"(?<![A-Za-z0-9])" + re.escape(answer) + r"(?![A-Za-z0-9])", context):
        cs, ce = m.span()
        toks = [i for i, (s, e) in enumerate(offsets) if e > cs and s < ce]
        if toks:
            spans.append((toks[0] + shift, toks[-1] + 1 + shift))
    return spans


def classify(span: tuple[int, int], *, window_start: int, sinks: int, retrieved: list[tuple[int, int]]) -> str:
    """Where the tokens [a, b) were when the model started answering; one of :data:`LOCATIONS` but 'partial'
    means some of them were visible."""
    a, b = span
    if a >= window_start:
        return "window"
    if b <= sinks:
        return "sinks"
    visible = [False] * (b - a)
    for i in range(a, b):
        visible[i - a] = i < sinks or i >= window_start or any(s <= i < e for s, e in retrieved)
    if all(visible):
        return "retrieved"
    return "partial" if any(visible) else "missed"


def best_location(locations: list[str]) -> str:
    if not locations:
        return "not found"
    return min(locations, key=LOCATIONS.index)


class TailCapture:
    """What the step that read the end of the prompt saw: its retrieval and where the window began.

    A forward pre-hook on the input embeddings runs inside each decoder step after memkit has retrieved for it
    and before the step's K/V are committed, so at the step whose tokens reach the prompt's end the memory
    holds exactly the chunks evicted before it (the window starts after the last of them) and ``trace()`` is
    that step's retrieval: the chunks it attends. Probe reads inside a step (the keys retriever's question
    query, the ``reread`` stage) pass through the embeddings too and are not counted.
    """

    def __init__(self, model: Any, prompt_len: int) -> None:
        self.model, self.n = model, prompt_len
        self.seen = 0
        self.done = False
        self.window_start = 0
        self.trace: list[dict[str, Any]] = []
        self.stored: list[tuple[int, int]] = []
        self._handle: Any = None

    def __enter__(self) -> TailCapture:
        emb = self.model.get_input_embeddings()
        self._handle = emb.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()

    def _hook(self, module: Any, args: tuple[Any, ...]) -> None:
        if self.done or not args:
            return
        call = self.model.memkit_runtime.current_call()
        if call is not None and call.mode == "probe":  # a probe read inside a step (question query, re-read)
            return
        self.seen += int(args[0].shape[-1])
        if self.seen < self.n:
            return
        self.done = True
        mgr = self.model.memory.manager
        end = mgr.span_end("default")
        self.window_start = int(end or 0)
        self.stored = [(int(a), int(b)) for a, b in mgr.spans("default")] if end else []
        self.trace = self.model.memory.trace() if self.stored else []


def _chunk_ranks(model: Any, prompt_ids: list[int], stored: list[tuple[int, int]], tokenizer: Any
                 ) -> tuple[list[float], str]:
    """MiniLM similarity of every stored chunk to the query of the prompt-end step (the prompt's last
    ``chunk_size`` tokens, as memkit's text retriever forms it), and the query text."""
    import numpy as np

    C = model.memkit_config.chunk_size
    query = tokenizer.decode(prompt_ids[-C:])
    texts = [tokenizer.decode(prompt_ids[s:e]) for s, e in stored]
    emb = model.memory.manager.embed(texts=[query, *texts])  # (1 + n, 384), unit vectors
    scores = (emb[1:] @ emb[0]).astype(np.float64)
    return scores.tolist(), query


# ---------------------------------------------------------------------------------------------- one sample
def evaluate_sample(lm: Any, task: Any, request: Any, *, locate: bool = True) -> dict[str, Any]:
    """Run one RULER request through ``lm`` (a :class:`MemkitLM`); score it; locate its answers (memkit modes)."""
    context, gen_kwargs = request.args
    doc = request.doc
    rec: dict[str, Any] = {"index": int(doc.get("index", request.doc_id)), "target_length": int(doc["max_length"]),
                           "answers": list(doc["outputs"])}
    wrapped = lm.mode != "full"
    ids = lm.tok_encode(context)
    rec["prompt_tokens"] = len(ids)
    cap = TailCapture(lm.model, len(ids)) if wrapped and locate else None
    with cap if cap is not None else contextlib.nullcontext():
        gen = lm.generate_one(context, gen_kwargs)
    rec.update(prediction=gen.text, score=score_of(task, doc, gen.text), seconds=round(gen.seconds, 2),
               new_tokens=len(gen.new_ids))
    if cap is None:
        return rec
    cfg = lm.model.memkit_config
    attended = cap.trace
    retrieved = [(int(t["span"][0]), int(t["span"][1])) for t in attended]
    rec.update(window_start=cap.window_start, sinks=min(cfg.sink_tokens, cap.window_start),
               retrieved=[{"span": list(s), "score": round(float(t["score"]), 4)} for s, t in zip(retrieved, attended)],
               stored_chunks=len(cap.stored))
    ranks = None
    if lm.model.memory.stats().get("retriever") == "text" and cap.stored and cfg.top_k > 0:
        sims, query = _chunk_ranks(lm.model, gen.prompt_ids, cap.stored, lm.tokenizer)
        ranks = sims
        rec["query_text"] = query
    locs = []
    for ans in rec["answers"]:
        spans = answer_token_spans(lm.tokenizer, context, gen.prompt_ids, str(ans))
        where = [classify(s, window_start=cap.window_start, sinks=cfg.sink_tokens, retrieved=retrieved) for s in spans]
        item: dict[str, Any] = {"answer": ans, "occurrences": len(spans), "location": best_location(where),
                                "visible_occurrences": sum(w in ("window", "sinks", "retrieved") for w in where),
                                "spans": [list(s) for s in spans[:8]]}
        if ranks is not None and spans:
            # best rank over the stored chunks holding an occurrence (1 = the most similar to the query)
            order = sorted(range(len(ranks)), key=lambda i: -ranks[i])
            rank_of = {i: r + 1 for r, i in enumerate(order)}
            holding = [i for i, (s, e) in enumerate(cap.stored) for a, b in spans if a < e and b > s]
            if holding:
                item["chunk_rank"] = min(rank_of[i] for i in holding)
        locs.append(item)
    rec["locations"] = locs
    return rec


# ---------------------------------------------------------------------------------------------- command
def tokenizer_folder(args: argparse.Namespace, tok: Any) -> Path:
    """A local folder lm-eval's generators can load the tokenizer from (they call AutoTokenizer by name)."""
    from memkit.models import resolve_model_path

    kind, p = resolve_model_path(args.model)
    folder = Path(p) if kind == "hf" and p is not None else Path(str(getattr(tok, "name_or_path", "")))
    if not folder.is_dir() or not any(folder.glob("tokenizer*")):
        raise InvalidInputError(f"cannot find the tokenizer files of this model in {str(folder)!r}; lm-eval's RULER "
                                "generators load the tokenizer from a local folder: pass --model FOLDER with "
                                "tokenizer.json")
    return folder


def _chat_fn(tok: Any) -> Any:
    if not getattr(tok, "chat_template", None):
        raise InvalidInputError("--chat-template needs a tokenizer with a chat template; this one has none")

    def apply(history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return tok.apply_chat_template(history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       continue_final_message=not add_generation_prompt)

    return apply


def run(args: argparse.Namespace) -> int:
    from memkit.evaluation.haystack import parse_length

    tasks = parse_tasks(args.tasks)
    lengths = parse_lengths(args.lengths)
    modes = parse_modes(args.modes)
    if args.limit < 1:
        raise InvalidInputError(f"--limit must be >= 1, got {args.limit}")
    config = load_config_arg(args.config) if any(m != "full" for m in modes) else None
    from memkit.models import resolve_model_path

    resolve_model_path(args.model)  # a bad --model fails here, before torch and transformers load
    _lm_eval()
    out_dir = Path(args.out)
    journal = SampleJournal(out_dir / "ruler.jsonl", {
        "model": str(args.model or "bundled SmolLM2"), "lm_eval": _lm_eval_version(),
        "chat_template": bool(args.chat_template), "config": config.to_dict() if config is not None else None},
        resume=args.resume)
    from memkit.evaluation.lm_eval_model import MemkitLM

    set_threads(args.threads)
    t_start = time.perf_counter()
    model, tok = load_for_args(args)
    folder = tokenizer_folder(args, tok)
    npos = max_positions(model)
    full_max = parse_length(args.full_max) if args.full_max else npos
    chat = _chat_fn(tok) if args.chat_template else None

    samples: dict[tuple[str, int], RulerSamples] = {}
    requests: dict[tuple[str, int], tuple[Any, list[Any]]] = {}
    for name in tasks:
        for n in lengths:
            print(f"samples: {name} at {n} tokens ...", end="\n" if not args.no_progress else " ", flush=True)
            s = load_samples(name, n, tok, folder, rebuild=args.rebuild, progress=not args.no_progress)
            print(f"{s.cache} ({len(s.docs)} samples{f', built in {s.build_seconds:.0f}s' if s.build_seconds else ''}; "
                  f"{s.cache_file})", flush=True)
            samples[(name, n)] = s
            task = make_task(s, folder)
            requests[(name, n)] = (task, requests_for(task, args.limit, chat_template=chat,
                                                      tokenizer_name=str(folder).replace("/", "__")))

    plan = [(m, name, n) for m in modes for name in tasks for n in lengths if not (m == "full" and n > full_max)]
    total = sum(len(requests[(name, n)][1]) for _, name, n in plan)
    results: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    reused = 0
    for m in modes:
        for name in tasks:
            for n in lengths:
                if m == "full" and n > full_max:
                    summary[f"{name}|{n}|{m}"] = {"skipped": f"length {n} > {full_max} (the model's positions; "
                                                             "--full-max)"}
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="ruler", unit="sample", disable=args.no_progress, dynamic_ncols=True)
    try:
        for m in modes:
            if not any(mm == m for mm, _, _ in plan):
                continue
            todo = [(name, n) for mm, name, n in plan if mm == m]
            if all(journal.get((name, n, m, int(r.doc.get("index", r.doc_id)))) is not None
                   for name, n in todo for r in requests[(name, n)][1]):
                lm = None  # every sample of this mode is in the journal: nothing to run
            else:
                lm = MemkitLM(model, tokenizer=tok, mode=m, config=None if m == "full" else config)
            try:
                for mm, name, n in plan:
                    if mm != m:
                        continue
                    task, reqs = requests[(name, n)]
                    scores = []
                    for req in reqs:
                        bar.set_description(f"ruler {m} {name} {fmt_len(n)}")
                        index = int(req.doc.get("index", req.doc_id))
                        rec = journal.get((name, n, m, index))
                        if rec is None:
                            assert lm is not None  # set whenever a sample of this mode is not journalled
                            try:
                                rec = evaluate_sample(lm, task, req)
                            except InvalidInputError as exc:
                                if m != "full":
                                    raise
                                rec = {"index": index, "skipped": str(exc)}
                            rec.update(task=name, length=n, mode=m)
                            journal.append(rec)
                            bar.write(_log_line(rec))
                        else:
                            reused += 1
                        results.append(rec)
                        if "score" in rec:
                            scores.append(rec["score"])
                        bar.update(1)
                    summary[f"{name}|{n}|{m}"] = {"score": aggregate(task, n, scores), "samples": len(scores)}
            finally:
                if lm is not None:
                    lm.close()
    finally:
        bar.close()
    if reused:
        print(f"{reused} samples reused from {journal.path}", flush=True)
    elapsed = time.perf_counter() - t_start
    table = score_table(results, summary, tasks, lengths, modes)
    locs = location_table(results)
    png = plot(results, summary, tasks, lengths, modes, out_dir / "ruler.png")
    command = "memkit eval ruler " + " ".join(
        f"--{k} {v}" for k, v in (("lengths", args.lengths), ("tasks", ",".join(tasks)), ("limit", args.limit),
                                  ("modes", ",".join(modes)), ("model", args.model), ("config", args.config),
                                  ("threads", args.threads)) if v is not None)
    md = [f"# RULER (lm-eval {_lm_eval_version()}) on {args.model or 'the bundled SmolLM2-135M-Instruct'}", "",
          f"`{command}` — {time.strftime('%Y-%m-%d')}, {elapsed / 60:.1f} min"
          + (f" ({reused} samples reused from the journal {journal.path.name})" if reused else ""), "",
          "Score: the task's own metric (share of gold strings found in the answer), mean over the samples "
          "(count in brackets).", "", table, "",
          "Where the gold answers were when the model started answering (memkit/window modes; counts of answers):",
          "", locs, ""]
    (out_dir / "ruler.md").write_text("\n".join(md))
    where = write_json({"command": command, "lm_eval": _lm_eval_version(), "model": args.model or "bundled SmolLM2",
                        "model_max_positions": npos, "tasks": tasks, "lengths": lengths, "modes": modes,
                        "limit": args.limit, "chat_template": bool(args.chat_template), "reused_samples": reused,
                        "journal": str(journal.path),
                        "config": config.to_dict() if config is not None else None, "seconds": round(elapsed, 1),
                        "samples": {f"{k[0]}|{k[1]}": {"cache": v.cache, "file": str(v.cache_file), **v.meta}
                                    for k, v in samples.items()},
                        "summary": summary, "results": results, "table": table, "locations": locs},
                       str(out_dir / "ruler.json"))
    print()
    print(table)
    print()
    print(locs)
    print(f"\nJSON: {where}\nmarkdown: {out_dir / 'ruler.md'}" + (f"\nplot: {png}" if png else ""))
    return 0


def _log_line(rec: dict[str, Any]) -> str:
    if "skipped" in rec:
        return f"[{rec['mode']}] {rec['task']} {rec['length']} #{rec['index']} skipped: {rec['skipped']}"
    where = ""
    if "locations" in rec:
        parts = []
        for it in rec["locations"][:4]:
            rank = f" rank {it['chunk_rank']}" if "chunk_rank" in it else ""
            parts.append(f"{it['location']}{rank}")
        more = f" +{len(rec['locations']) - 4}" if len(rec["locations"]) > 4 else ""
        where = " answer@" + ",".join(parts) + more
    pred = rec["prediction"].strip().replace("\n", " ")[:60]
    return (f"[{rec['mode']}] {rec['task']} {rec['length']} #{rec['index']} score={rec['score']:.2f}{where} "
            f"{rec['prompt_tokens']} tok {rec['seconds']:.1f}s {pred!r}")
