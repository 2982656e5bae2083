"""Token counts and byte sizes as people type them, read the same way by every command and API.

Lengths: ``4096``, ``16k`` (k = 1,024 tokens), ``1.5k``, ``1M`` (M = 1,048,576 tokens). Sizes: ``24GB``,
``24GiB``, ``512MB``, ``1.5T`` (K/M/G/T are powers of 1,024, as GPU and RAM specs mean them; ``B`` and ``iB`` are
optional). A bare number is refused as a size (``--gpu-memory 24`` would mean 24 bytes) and a count below one
is refused as a length.
"""

from __future__ import annotations

import re

from memkit.errors import InvalidInputError

__all__ = ["parse_length", "parse_lengths", "parse_bytes", "human_bytes"]

_LENGTH_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20}
_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_length(text: str | int) -> int:
    """'16k' -> 16384, '4096' -> 4096, '1.5k' -> 1536, '1M' -> 1048576 tokens."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([km]?)", str(text).strip().lower())
        if not m:
            raise InvalidInputError(f"length {text!r} is not a token count; write e.g. 4096, 16k, 80k or 1M")
        value = float(m.group(1)) * _LENGTH_UNITS[m.group(2)]
    if value < 1:
        raise InvalidInputError(f"length {text!r} must be at least 1 token")
    return int(value)


def parse_lengths(text: str) -> list[int]:
    """Comma-separated lengths: '16k,32k,80k'."""
    items = [t for t in str(text).split(",") if t.strip()]
    if not items:
        raise InvalidInputError("the list of lengths is empty; write e.g. 16k,32k,80k")
    return [parse_length(t) for t in items]


def parse_bytes(text: str | int) -> int:
    """'24GB', '24GiB', '8000MB', '1.5T' -> bytes; an int is taken as bytes. Must be positive."""
    if isinstance(text, bool):
        raise InvalidInputError(f"a size must be a number of bytes or text like 24GB, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])(i?B)?\s*", str(text), re.IGNORECASE)
        if not m:
            hint = (" (a bare number would mean bytes; give a unit)" if re.fullmatch(r"\s*[\d.]+\s*", str(text))
                    else "")
            raise InvalidInputError(f"cannot read {text!r} as a size{hint}; write e.g. 24GB, 512MB or 1.5TB")
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if value <= 0:
        raise InvalidInputError(f"a size must be positive, got {text!r}")
    return value


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover
