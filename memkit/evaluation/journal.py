"""A per-sample journal for long evaluations: every finished sample is on disk at once, and a rerun resumes.

RULER at 16k-32k tokens costs minutes per sample on a CPU (Hsieh et al., "RULER: What's the Real Context Size of
Your Long-Context Language Models?", 2024, builds 500 per cell); a run of hours must not lose its samples to a
crash, a closed laptop or a session that ends. The journal is a JSON-lines file in the run's output folder:

* line 1 is a header ``{"header": {...}}`` naming what the samples depend on (model, memkit config, lm-eval
  version, chat template); every other line is one finished sample, written and flushed when it finishes;
* ``resume=True`` reads it back: samples already there are reused, not rerun; a header that differs from this
  run's raises (mixing two configs in one table would be silently wrong); a torn last line (the process died
  while writing it) is dropped and rewritten;
* without ``resume`` an existing journal with samples is refused rather than replaced: it may hold hours of
  work, and memkit does not delete what a user may still need.

Journals of separate runs with the same header concatenate (``cat a/ruler.jsonl b/ruler.jsonl``): a rerun with
``resume`` over the union of their cells then only writes the combined report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from memkit.errors import CorruptFileError, InvalidInputError

__all__ = ["SampleJournal", "sample_key"]


def sample_key(rec: dict[str, Any]) -> tuple[str, int, str, int]:
    """(task, length, mode, index): what identifies one sample of one cell."""
    return (str(rec["task"]), int(rec["length"]), str(rec["mode"]), int(rec["index"]))


class SampleJournal:
    """Append-only JSON-lines file of finished samples; see the module docstring."""

    def __init__(self, path: str | Path, header: dict[str, Any], *, resume: bool, flag: str = "--resume") -> None:
        self.path = Path(path)
        self.header = json.loads(json.dumps(header))  # plain JSON types, as read back
        self.done: dict[tuple[str, int, str, int], dict[str, Any]] = {}
        exists = self.path.is_file() and self.path.stat().st_size > 0
        if exists and not resume:
            count = sum(1 for _ in self._lines()) - 1
            raise InvalidInputError(
                f"{self.path} already holds {max(count, 0)} samples of an earlier run; pass {flag} to continue it "
                "(samples already there are not rerun), or choose another output folder")
        if exists:
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"header": self.header}) + "\n")

    def _lines(self) -> list[str]:
        return self.path.read_text(encoding="utf-8").splitlines(keepends=True)

    def _load(self) -> None:
        lines = self._lines()
        good: list[str] = []
        for i, line in enumerate(lines):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # torn last line: the process died while writing it
                    break
                raise CorruptFileError(f"{self.path}, line {i + 1}, is not JSON; the journal was edited or damaged: "
                                       "fix or remove that line, or choose another output folder") from None
            if not line.endswith("\n"):
                break
            if "header" in obj:
                if obj["header"] != self.header:
                    diff = sorted(k for k in set(obj["header"]) | set(self.header)
                                  if obj["header"].get(k) != self.header.get(k))
                    raise InvalidInputError(
                        f"{self.path} was written by a run with other settings ({', '.join(diff)} differ); resuming "
                        "would mix them in one table: rerun with the same settings or choose another output folder")
            else:
                try:
                    self.done[sample_key(obj)] = obj
                except (KeyError, TypeError, ValueError):
                    raise CorruptFileError(f"{self.path}, line {i + 1}, is not a sample (task, length, mode, index); "
                                           "fix or remove that line, or choose another output folder") from None
            good.append(line)
        if len(good) != len(lines):  # drop the torn tail so the next append starts on a fresh line
            tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
            tmp.write_text("".join(good), encoding="utf-8")
            os.replace(tmp, self.path)

    def get(self, key: tuple[str, int, str, int]) -> dict[str, Any] | None:
        return self.done.get(key)

    def append(self, rec: dict[str, Any]) -> None:
        """Write one finished sample and flush it to disk."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[sample_key(rec)] = rec
