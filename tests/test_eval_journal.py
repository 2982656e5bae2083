"""The per-sample journal of long evaluations (memkit.evaluation.journal): resume, refusal, torn lines, concatenation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memkit.errors import CorruptFileError, InvalidInputError
from memkit.evaluation.journal import SampleJournal

HEADER = {"model": "m", "config": {"top_k": 12}, "lm_eval": "0.4.13"}


def rec(task: str, i: int, score: float = 1.0) -> dict:
    return {"task": task, "length": 4096, "mode": "memkit", "index": i, "score": score}


def test_resume_refuse_torn_line_and_concatenation(tmp_path: Path) -> None:
    a = SampleJournal(tmp_path / "a" / "ruler.jsonl", HEADER, resume=False)
    a.append(rec("t1", 0))
    a.append(rec("t1", 1, 0.5))
    with pytest.raises(InvalidInputError, match=r"already holds 2 samples.*--resume"):
        SampleJournal(tmp_path / "a" / "ruler.jsonl", HEADER, resume=False)
    assert len((tmp_path / "a" / "ruler.jsonl").read_text().splitlines()) == 3  # refused, nothing replaced
    with pytest.raises(InvalidInputError, match="config differ"):
        SampleJournal(tmp_path / "a" / "ruler.jsonl", {**HEADER, "config": {"top_k": 3}}, resume=True)
    # a process killed while writing leaves a torn last line: it is dropped, the rest is kept
    with open(tmp_path / "a" / "ruler.jsonl", "a") as f:
        f.write(json.dumps(rec("t1", 2))[:30])
    back = SampleJournal(tmp_path / "a" / "ruler.jsonl", HEADER, resume=True)
    assert sorted(k[3] for k in back.done) == [0, 1] and back.get(("t1", 4096, "memkit", 1))["score"] == 0.5
    back.append(rec("t1", 2))
    assert [json.loads(x).get("index") for x in (tmp_path / "a" / "ruler.jsonl").read_text().splitlines()] == \
        [None, 0, 1, 2]
    # two runs of the same settings concatenate into one journal
    b = SampleJournal(tmp_path / "b" / "ruler.jsonl", HEADER, resume=False)
    b.append(rec("t2", 0))
    (tmp_path / "all").mkdir()
    (tmp_path / "all" / "ruler.jsonl").write_text((tmp_path / "a" / "ruler.jsonl").read_text()
                                                 + (tmp_path / "b" / "ruler.jsonl").read_text())
    both = SampleJournal(tmp_path / "all" / "ruler.jsonl", HEADER, resume=True)
    assert sorted(both.done) == [("t1", 4096, "memkit", 0), ("t1", 4096, "memkit", 1), ("t1", 4096, "memkit", 2),
                                 ("t2", 4096, "memkit", 0)]
    # a damaged line in the middle is not guessed around
    lines = (tmp_path / "all" / "ruler.jsonl").read_text().splitlines(keepends=True)
    lines[2] = "{not json\n"
    (tmp_path / "all" / "ruler.jsonl").write_text("".join(lines))
    with pytest.raises(CorruptFileError, match="line 3"):
        SampleJournal(tmp_path / "all" / "ruler.jsonl", HEADER, resume=True)
    lines[2] = json.dumps({"task": "t1", "score": 1.0}) + "\n"  # JSON, but not a sample
    (tmp_path / "all" / "ruler.jsonl").write_text("".join(lines))
    with pytest.raises(CorruptFileError, match="line 3, is not a sample"):
        SampleJournal(tmp_path / "all" / "ruler.jsonl", HEADER, resume=True)
