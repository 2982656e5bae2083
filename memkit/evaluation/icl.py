"""In-context learning with the demonstrations held in memory (LongMem, Wang et al. 2023, section 4.3).

LongMem's second headline is in-context learning with many demonstrations: the demonstrations are read into the
memory bank, the test input follows with only a few of them in the local window, and the model's label
distribution should use all of them. This module generates such a task in code, from real words:

* a **hidden mapping**: ``n_keys`` words (drawn by ``seed`` from the KJV, as the tokenizer writes them at the start
  of a line) each get one of ``labels`` (default four colour words) at random;
* **demonstrations**: ``repeats`` lines ``"word: label"`` per key, shuffled, after one instruction line. They are
  read into memory (``model.memory.ingest``), so every demonstration is beyond the local window;
* **queries**: for each key, a prompt of recent demonstration lines of *other* keys (about ``recent_tokens``
  tokens, which stay in the local window) and then ``"word:"``. The prediction is the label whose first token
  has the highest logit at the last position (the paper's label-word scoring); chance is ``1 / len(labels)``.

The window alone never holds the queried key's demonstrations, so a window-only model is at chance unless it
knows the mapping from elsewhere (it cannot: the mapping is drawn at random). Each query runs as its own call with
``flush_window=False`` and fewer tokens than the window, so queries never write to memory; :func:`evaluate`
checks that the memory's chunk count does not move.

    task = make_task(tok, n_keys=128, seed=0)
    result = evaluate(wrapped, tok, task)      # {"accuracy": ..., "n": 128, ...}
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from memkit.errors import InvalidInputError

__all__ = ["ICLTask", "make_task", "query_prompt", "evaluate", "LABELS"]

LABELS = ("red", "blue", "green", "gold")  # one token each (with a leading space) in SmolLM2's tokenizer
HEADER = "Every word below has a secret colour: red, blue, green or gold. The colour never changes.\n"
_WORD = re.compile(r"\b[a-z]{4,9}\b")


@dataclass
class ICLTask:
    """One generated task: the hidden mapping, its demonstrations and the label tokens."""

    mapping: dict[str, str]  # key word -> label word
    labels: tuple[str, ...]
    label_ids: list[int]  # first token of " label" for each label, in ``labels`` order
    demo_lines: list[str] = field(default_factory=list)  # "word: label" lines, in reading order
    demo_ids: list[int] = field(default_factory=list)  # HEADER + lines, tokenized
    seed: int = 0

    @property
    def keys(self) -> list[str]:
        return list(self.mapping)


def _key_words(tok: Any, n: int, rng: random.Random) -> list[str]:
    """``n`` distinct lowercase KJV words of 4-9 letters, 1-3 tokens each, excluding the labels."""
    from memkit.resources import kjv_verses

    seen: set[str] = set()
    words: list[str] = []
    for verse in kjv_verses()[:12000]:
        for w in _WORD.findall(verse.lower()):
            if w not in seen and w not in LABELS:
                seen.add(w)
                words.append(w)
    rng.shuffle(words)
    out = []
    for w in words:
        if 1 <= len(tok(w, add_special_tokens=False)["input_ids"]) <= 3:
            out.append(w)
            if len(out) == n:
                return out
    raise InvalidInputError(f"the KJV gives only {len(out)} usable key words, fewer than n_keys={n}")


def make_task(tok: Any, *, n_keys: int = 128, labels: tuple[str, ...] = LABELS, repeats: int = 2,
              seed: int = 0) -> ICLTask:
    """A hidden word -> label mapping and its demonstrations (``repeats`` lines per key, shuffled)."""
    if n_keys < 2 or repeats < 1 or len(labels) < 2:
        raise InvalidInputError(f"make_task needs n_keys >= 2, repeats >= 1 and 2+ labels; got {n_keys}, {repeats}, "
                                f"{len(labels)}")
    label_ids = [tok(" " + lab, add_special_tokens=False)["input_ids"][0] for lab in labels]
    if len(set(label_ids)) != len(labels):
        raise InvalidInputError(f"labels {labels} do not start with distinct tokens in this tokenizer; pick others")
    rng = random.Random(seed)
    keys = _key_words(tok, n_keys, rng)
    mapping = {k: labels[rng.randrange(len(labels))] for k in keys}
    lines = [f"{k}: {mapping[k]}" for k in keys for _ in range(repeats)]
    rng.shuffle(lines)
    ids = list(tok(HEADER + "\n".join(lines) + "\n", add_special_tokens=False)["input_ids"])
    return ICLTask(mapping=mapping, labels=tuple(labels), label_ids=label_ids, demo_lines=lines, demo_ids=ids,
                   seed=seed)


def query_prompt(tok: Any, task: ICLTask, key: str, recent_tokens: int, rng: random.Random) -> list[int]:
    """Token ids of recent demonstration lines of other keys (at most ``recent_tokens`` tokens with the query) and
    then ``"key:"``."""
    query = list(tok(f"{key}:", add_special_tokens=False)["input_ids"])
    others = [ln for ln in task.demo_lines if not ln.startswith(key + ":")]
    lines: list[int] = []
    while True:
        line = list(tok(rng.choice(others) + "\n", add_special_tokens=False)["input_ids"])
        if len(lines) + len(line) + len(query) > recent_tokens:
            break
        lines += line
    return lines + query


def evaluate(model: Any, tok: Any, task: ICLTask, *, n_queries: int | None = None, recent_tokens: int | None = None,
             seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Accuracy of ``model`` (memkit-wrapped) on ``task``: demonstrations ingested into memory, then one query per
    key (the first ``n_queries`` keys; all by default). Memory is reset before and after."""
    import torch

    cfg = model.memkit_config
    recent = recent_tokens if recent_tokens is not None else max(8, cfg.window - cfg.chunk_size)
    if recent > cfg.window:
        raise InvalidInputError(f"recent_tokens={recent} exceeds the window ({cfg.window}): the query's own lines "
                                "would leave the window and be written to memory; use at most the window")
    keys = task.keys[:n_queries] if n_queries else task.keys
    rng = random.Random(seed)
    model.memory.reset()
    try:
        with torch.no_grad():
            model.memory.ingest(torch.tensor([task.demo_ids]), progress=progress)
            chunks = model.memory.stats().get("chunks")
            rows: list[dict[str, Any]] = []
            label_ids = torch.tensor(task.label_ids)
            for key in keys:
                ids = torch.tensor([query_prompt(tok, task, key, recent, rng)], device=model.device)
                logits = model(ids, logits_to_keep=1, flush_window=False, progress=False).logits[0, -1].float().cpu()
                scores = logits[label_ids]  # (labels,)
                pred = task.labels[int(scores.argmax())]
                rows.append({"key": key, "label": task.mapping[key], "predicted": pred,
                             "correct": pred == task.mapping[key]})
            if model.memory.stats().get("chunks") != chunks:
                raise InvalidInputError("an ICL query wrote to memory; lower recent_tokens below the window")
    finally:
        model.memory.reset()
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    return {"accuracy": correct / n if n else 0.0, "correct": correct, "n": n, "chance": 1 / len(task.labels),
            "demo_tokens": len(task.demo_ids), "recent_tokens": recent, "n_keys": len(task.mapping),
            "repeats": len(task.demo_lines) // max(1, len(task.mapping)), "seed": task.seed, "queries": rows}
