"""Eviction policies: property tests against plain-Python models of fifo, lru and recency_frequency."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memkit import ConfigError, CorruptFileError, UnknownParameterError
from memkit.policy import available_policies, make_policy

ops = st.lists(st.tuples(st.sampled_from(["add", "retrieve", "remove"]),
                         st.lists(st.integers(0, 25), min_size=0, max_size=5)), max_size=40)


class Model:
    """Reference: a list of (id, added_clock, retrievals, last_use_clock)."""

    def __init__(self, name: str, protect: float) -> None:
        self.name, self.protect, self.clock = name, protect, 0
        self.rows: dict[int, list[int]] = {}

    def apply(self, op: str, ids: list[int]) -> None:
        for i in ids:
            self.clock += 1
            if op == "add":
                self.rows[i] = [self.clock, 0, self.clock]
            elif op == "retrieve" and i in self.rows:
                self.rows[i][1] += 1
                self.rows[i][2] = self.clock
            elif op == "remove":
                self.rows.pop(i, None)

    def order(self) -> list[int]:
        r = self.rows
        if self.name == "fifo":
            return sorted(r, key=lambda i: r[i][0])
        if self.name == "lru":
            return sorted(r, key=lambda i: r[i][2])
        by_age = sorted(r, key=lambda i: r[i][0])
        n_protect = math.floor(self.protect * len(r))
        old, young = by_age[: len(r) - n_protect], by_age[len(r) - n_protect :]
        return sorted(old, key=lambda i: (r[i][1], r[i][0])) + young


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(["fifo", "lru", "recency_frequency"]), seq=ops, protect=st.sampled_from([0.0, 0.3, 0.5, 0.9]),
       n=st.integers(0, 30))
def test_policy_matches_model(name, seq, protect, n):
    kw = {"protect_recent": protect} if name == "recency_frequency" else {}
    p, model = make_policy(name, **kw), Model(name, protect)
    for op, ids in seq:
        ids = list(dict.fromkeys(ids)) if op == "add" else ids
        getattr(p, f"on_{op}")(ids)
        model.apply(op, ids)
        assert len(p) == len(model.rows)
    order = model.order()
    before = p.ids().tolist()
    victims = p.evict(n).tolist()
    assert victims == order[:n] and p.ids().tolist() == before == order  # evict only chooses
    assert len(set(victims)) == len(victims) <= n
    if name == "recency_frequency" and n <= len(order) - math.floor(protect * len(order)):
        newest = sorted(model.rows, key=lambda i: model.rows[i][0])[len(order) - math.floor(protect * len(order)):]
        assert not set(victims) & set(newest)  # the protected newest fraction is never chosen first
    state = json.loads(json.dumps(p.state_dict()))
    q = make_policy(name, **kw)
    q.load_state_dict(state)
    assert q.ids().tolist() == order and q.state_dict() == p.state_dict()


def test_recency_frequency_example_from_memlong():
    p = make_policy("recency_frequency", protect_recent=0.5)
    p.on_add([10, 11, 12, 13, 14, 15])
    p.on_retrieve([10, 10, 12])
    # 13, 14, 15 protected; 11 never retrieved goes first, then 12 (once), then 10 (twice)
    assert p.evict(3).tolist() == [11, 12, 10]
    assert p.evict(6).tolist() == [11, 12, 10, 13, 14, 15]  # then the protected, oldest first
    p.on_remove([11, 12])
    assert p.evict(1).tolist() == [13] and len(p) == 4  # 14, 15 protected; 13 never retrieved, 10 twice
    p.on_add([10])  # re-adding makes it new (and resets its count)
    assert p.evict(2).tolist() == [13, 14]


def test_registry_and_errors():
    assert set(available_policies()) >= {"fifo", "lru", "recency_frequency"}
    with pytest.raises(ConfigError, match="unknown policy"):
        make_policy("random")
    with pytest.raises(UnknownParameterError):
        make_policy("fifo", protect_recent=0.5)
    with pytest.raises(ConfigError):
        make_policy("recency_frequency", protect_recent=1.5)
    p = make_policy("lru")
    p.on_add([1, 2, 3])
    with pytest.raises(CorruptFileError, match="fifo"):
        p.load_state_dict({"name": "fifo", "order": [1]})
    with pytest.raises(CorruptFileError, match="malformed"):
        p.load_state_dict({"name": "lru", "order": [1, "x"]})
    with pytest.raises(CorruptFileError, match="malformed"):
        p.load_state_dict({"name": "lru", "order": [1, 1]})
    rf = make_policy("recency_frequency")
    rf.on_add([5, 6])
    with pytest.raises(CorruptFileError):
        rf.load_state_dict({"name": "recency_frequency", "ids": [1], "added": [0, 1], "counts": [0], "clock": 3})
    assert p.ids().tolist() == [1, 2, 3] and rf.ids().tolist() == [5, 6]  # unchanged after bad state
    from memkit import InvalidInputError

    with pytest.raises(InvalidInputError):
        p.evict(-1)
    with pytest.raises(InvalidInputError):
        p.on_add([1, 1])
