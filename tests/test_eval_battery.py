"""memkit eval battery: the plan of a run, the table of its journal, and bad input refused before anything runs."""

from __future__ import annotations

import argparse

import pytest

from memkit.errors import InvalidInputError
from memkit.evaluation.battery import Plan, summarise


def args(**kw: object) -> argparse.Namespace:
    base = {"tasks": "chat,qa,passkey,ruler,ppl,speed", "quick": False, "n": None, "lengths": None}
    return argparse.Namespace(**{**base, **kw})


def test_the_full_and_the_quick_plan() -> None:
    full = Plan(args())
    assert full.n == 20 and full.passkey_lengths == [16384, 32768, 81920] and full.ruler_lengths == [16384, 32768]
    assert len(full.ruler_tasks) == 6 and len(full.ppl_plays) == 2
    quick = Plan(args(quick=True))
    assert quick.n == 5 and quick.passkey_lengths == [16384] and quick.ruler_lengths == [16384]
    assert len(quick.ruler_tasks) == 3 and quick.header()["quick"]


def test_the_table_heading_says_when_a_config_replaced_the_defaults() -> None:
    from memkit.evaluation.battery import heading

    quick = Plan(args(quick=True, tasks="qa"))
    plain = heading(quick, None, "2026-12-07", ["abc1234"], "2 cores")
    assert "`memkit eval battery --quick --tasks qa` with the defaults (no config file)" in plain
    mine = heading(quick, "focus.yaml", "2026-12-07", ["abc1234"], "2 cores")
    assert "--config focus.yaml` with that config, not the defaults" in mine and "no config file" not in mine


@pytest.mark.parametrize("bad", [{"tasks": "chat,poetry"}, {"tasks": ""}, {"n": 0}])
def test_bad_input_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError):
        Plan(args(**bad))


def test_the_table_reads_the_journal() -> None:
    sel = {"chosen": 1, "reason": "bm25: 1 chunk(s) above a gap of 0.75 of the spread"}
    recs = [{"task": "chat", "length": 6000, "index": i, "correct": i < 3, "fact_read": True, "selection": sel}
            for i in range(5)]
    recs += [{"task": "niah_single_1", "length": 16384, "index": i, "score": 1.0, "selection": sel} for i in range(2)]
    recs.append({"task": "ppl", "length": 8192, "index": 0, "play": "romeo_and_juliet", "window": 34.13,
                 "memkit": 32.77, "full": 31.93, "gap_closed": 0.62})
    rows, table = summarise(recs)
    by = {r["task"]: r for r in rows}
    assert by["chat"]["score"] == "3/5" and by["chat"]["answer read"] == "5/5" and by["chat"]["beside"] == "goal >= 90%"
    assert by["niah_single_1"]["score"] == "1.00" and by["niah_single_1"]["length"] == "16k"
    assert "62% of the gap" in by["ppl"]["score"] and "| chat" in table
