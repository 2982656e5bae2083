"""Fuzzing: hypothesis state machines drive every backend and the MemoryManager against plain models.

* ``BankMachine`` — add (auto or explicit ids, replacing live ids), remove (live and unknown ids), search,
  save + load, reset, on every backend, compared with a dict of numpy vectors. Exact backends must return
  the brute-force ids; approximate ones must return live, distinct ids whose scores equal the score of the
  stored vector, sorted, padded with -1 only at the end; ``len`` and ``ids()`` must always be identical.
* ``MemoryMachine`` — add_chunks / remove_chunks / retrieve / save + load / reset over several namespaces
  with a token capacity and a small K/V byte budget (pages spill to a disk tier): pages come back bit-exact,
  no namespace sees another's chunks, no capacity or budget is ever exceeded, ids are never reused.

The K/V store's paged-vs-unpaged equivalence and the policies' reference models are property-tested in
``tests/test_kvstore.py`` and ``tests/test_policy.py``; this file covers the combinations.
``MEMKIT_FUZZ_EXAMPLES`` scales the number of examples (default 1 = the CI budget).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import memkit
from memkit.testing.conformance import brute_force
from memkit.testing.reliability import BACKENDS, EXACT, backend_available, backend_params, report

DIM = 8
FACTOR = max(1, int(os.environ.get("MEMKIT_FUZZ_EXAMPLES", "1")))
EXAMPLES = {"faiss-flat": 30, "faiss-hnsw": 25, "faiss-ivf": 25, "hnswlib": 25, "usearch": 25, "disk": 15,
            "qdrant": 10, "milvus": 10}
COUNTS: dict[str, list[int]] = {}  # backend -> [examples, steps]
# Shrinking a failure can take minutes; set MEMKIT_FUZZ_SHRINK=1 to get the minimal failing sequence.
PHASES = tuple(Phase) if os.environ.get("MEMKIT_FUZZ_SHRINK") else (Phase.explicit, Phase.reuse, Phase.generate)
# Bugs this fuzzer found in backends being finished by their owners (reported; remove when fixed).
KNOWN_BUGS: dict[str, str] = {}  # backend -> reason; empty: the hnswlib and qdrant bugs found here are fixed


def _vectors(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


class BankMachine(RuleBasedStateMachine):
    backend = "faiss-flat"
    metric = "ip"

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="memkit-fuzz-"))
        self.bank = memkit.create_bank(self.backend, dim=DIM, metric=self.metric, **backend_params(self.backend))
        self.model: dict[int, np.ndarray] = {}
        self.next_id = 0
        self.saves = 0
        COUNTS.setdefault(self.backend, [0, 0])[0] += 1

    def teardown(self) -> None:
        self.bank.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _stored(self, v: np.ndarray) -> np.ndarray:
        if self.metric == "cosine":
            return v / np.linalg.norm(v, axis=1, keepdims=True)
        return v

    def _step(self) -> None:
        COUNTS[self.backend][1] += 1

    @initialize(metric=st.sampled_from(["ip", "l2", "cosine"]))
    def choose_metric(self, metric: str) -> None:
        if metric != self.metric:
            self.bank.close()
            self.metric = metric
            self.bank = memkit.create_bank(self.backend, dim=DIM, metric=metric, **backend_params(self.backend))

    @rule(n=st.integers(0, 12), seed=st.integers(0, 2**16))
    def add_auto(self, n: int, seed: int) -> None:
        self._step()
        v = _vectors(seed, n)
        ids = self.bank.add(v)
        assert ids.tolist() == list(range(self.next_id, self.next_id + n)), "auto ids must continue the sequence"
        for i, row in zip(ids.tolist(), self._stored(v)):
            self.model[i] = row
        self.next_id += n

    @rule(ids=st.lists(st.integers(0, 80), min_size=1, max_size=8, unique=True), seed=st.integers(0, 2**16))
    def add_explicit(self, ids: list[int], seed: int) -> None:
        self._step()
        v = _vectors(seed, len(ids))
        assert self.bank.add(v, ids=ids).tolist() == ids
        for i, row in zip(ids, self._stored(v)):
            self.model[i] = row  # re-adding a live id replaces it
        self.next_id = max(self.next_id, max(ids) + 1)

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        self._step()
        live = sorted(self.model)
        pick = data.draw(st.lists(st.sampled_from(live), unique=True, max_size=6)) if live else []
        unknown = data.draw(st.lists(st.integers(200, 300), unique=True, max_size=2))
        assert self.bank.remove(pick + unknown) == len(pick)
        for i in pick:
            del self.model[i]

    @rule(k=st.integers(1, 12), seed=st.integers(0, 2**16), m=st.integers(1, 4))
    def search(self, k: int, seed: int, m: int) -> None:
        self._step()
        q = _vectors(seed + 1, m)
        scores, ids = self.bank.search(q, k)
        assert scores.shape == ids.shape == (m, k)
        if not self.model:
            assert (ids == -1).all()
            return
        live = np.array(sorted(self.model))
        base = np.stack([self.model[i] for i in live.tolist()])
        qq = self._stored(q)
        if self.backend in EXACT:
            ref_s, ref_i = brute_force(base, live, qq, min(k, len(live)), "ip" if self.metric != "l2" else "l2")
            np.testing.assert_array_equal(ids[:, : len(live)], ref_i)
            np.testing.assert_allclose(scores[:, : len(live)], ref_s, rtol=1e-4, atol=1e-4)
            assert (ids[:, len(live):] == -1).all()
            return
        for row_s, row_i, qv in zip(scores, ids, qq):
            valid = row_i >= 0
            n_valid = int(valid.sum())
            assert valid[:n_valid].all(), "-1 padding only at the end"
            got = row_i[:n_valid].tolist()
            assert len(set(got)) == len(got) and set(got) <= set(self.model), f"not live or repeated: {got}"
            assert n_valid >= min(k, len(live)) // 2, f"only {n_valid} of {min(k, len(live))} results"
            want = [(-((qv - self.model[i]) ** 2).sum()) if self.metric == "l2" else float(qv @ self.model[i])
                    for i in got]
            np.testing.assert_allclose(row_s[:n_valid], want, rtol=2e-3, atol=2e-3)
            assert (np.diff(row_s[:n_valid]) <= 1e-4).all(), "scores sorted, higher = closer"

    @rule()
    def save_and_load(self) -> None:
        self._step()
        self.saves += 1
        path = self.tmp / f"save{self.saves % 2}"  # alternate: also saving over an older save
        self.bank.save(path)
        loaded = memkit.load_bank(path)
        self.bank.close()
        self.bank = loaded

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def reset(self) -> None:
        self._step()
        self.bank.reset()
        self.model.clear()
        self.next_id = 0

    @invariant()
    def same_ids(self) -> None:
        assert len(self.bank) == len(self.model)
        assert self.bank.ids().tolist() == sorted(self.model)

    @invariant()
    def same_vectors(self) -> None:
        if self.model and self.backend != "usearch":  # usearch reconstructs from its own storage (f32 here)
            ids = sorted(self.model)
            np.testing.assert_allclose(self.bank.get(ids), np.stack([self.model[i] for i in ids]),
                                       rtol=1e-5, atol=1e-5)


def _machine_test(backend: str):
    cls = type(f"Bank_{backend.replace('-', '_')}", (BankMachine,), {"backend": backend})
    cls.TestCase.settings = settings(max_examples=EXAMPLES[backend] * FACTOR, stateful_step_count=25,
                                     deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                                     phases=PHASES)
    return cls.TestCase


@pytest.mark.parametrize("backend", [
    pytest.param(b, marks=pytest.mark.xfail(reason=KNOWN_BUGS[b], strict=False)) if b in KNOWN_BUGS else b
    for b, _ in BACKENDS])
def test_bank_state_machine(backend: str) -> None:
    if not backend_available(backend):
        pytest.skip(f"{backend} is not installed")
    COUNTS[backend] = [0, 0]
    case = _machine_test(backend)("runTest")
    case.runTest()
    examples, steps = COUNTS[backend]
    report(f"fuzz_bank[{backend}]", examples=examples, steps=steps)
    assert examples >= EXAMPLES[backend] * FACTOR // 2


# ---------------------------------------------------------------------- MemoryManager
L, H, C, D, E = 1, 2, 4, 4, DIM
NAMESPACES = ("ann", "bob", "cy")


def _chunk(cid_seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(cid_seed)
    return torch.randn(n, L, H, C, D, generator=g), torch.randn(n, L, H, C, D, generator=g), _vectors(cid_seed, n)


class MemoryMachine(RuleBasedStateMachine):
    CAP = 12 * C  # tokens per namespace

    def __init__(self) -> None:
        super().__init__()
        from memkit.config import MemoryConfig
        from memkit.memory import MemoryManager

        self.tmp = Path(tempfile.mkdtemp(prefix="memkit-fuzz-mm-"))
        page = L * 2 * H * C * D * 4
        self.budget = {"device_bytes": 3 * page, "host_bytes": 8 * page, "disk_bytes": 40 * page}
        self.config = MemoryConfig(chunk_size=C, top_k=4, capacity_tokens=self.CAP, policy="recency_frequency",
                                   kvstore={"dtype": "fp32", "disk_dir": str(self.tmp / "spill"), **self.budget})
        self.MM = MemoryManager
        self.mm = MemoryManager(self.config, num_layers=L, kv_heads=H, head_dim=D, embed_dim=E)
        self.pages: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # every id ever stored -> its K/V
        self.owner: dict[int, str] = {}
        self.max_id = -1
        COUNTS.setdefault("memory", [0, 0])[0] += 1

    def teardown(self) -> None:
        self.mm.reset()
        shutil.rmtree(self.tmp, ignore_errors=True)

    @rule(ns=st.sampled_from(NAMESPACES), n=st.integers(1, 5), seed=st.integers(0, 2**16))
    def add(self, ns: str, n: int, seed: int) -> None:
        COUNTS["memory"][1] += 1
        k, v, e = _chunk(seed, n)
        start = self.mm.num_tokens(ns) * 10 + seed % 7
        spans = np.stack([np.arange(n) * C + start, np.arange(n) * C + start + C], 1)
        try:
            ids = self.mm.add_chunks(k, v, e, spans, namespace=ns)
        except memkit.CapacityError:  # all tiers full: nothing may have changed
            return
        assert int(ids.min()) > self.max_id, "ids are never reused"
        self.max_id = int(ids.max())
        for j, cid in enumerate(ids.tolist()):
            self.pages[cid] = (k[j], v[j])
            self.owner[cid] = ns

    @rule(ns=st.sampled_from(NAMESPACES), data=st.data())
    def remove(self, ns: str, data: st.DataObject) -> None:
        COUNTS["memory"][1] += 1
        mine = self.mm.chunk_ids(ns).tolist()
        others = [i for i in self.owner if self.owner[i] != ns]
        pick = data.draw(st.lists(st.sampled_from(mine), unique=True, max_size=3)) if mine else []
        foreign = data.draw(st.lists(st.sampled_from(others), unique=True, max_size=2)) if others else []
        assert self.mm.remove_chunks(pick + foreign, namespace=ns) == len(pick), "other namespaces' ids ignored"

    @rule(ns=st.sampled_from(NAMESPACES), seed=st.integers(0, 2**16), k=st.integers(1, 6))
    def retrieve(self, ns: str, seed: int, k: int) -> None:
        COUNTS["memory"][1] += 1
        r = self.mm.retrieve(_vectors(seed, 1)[0], k=k, namespace=ns)
        mine = set(self.mm.chunk_ids(ns).tolist())
        assert set(r.ids.tolist()) <= mine, "a namespace returned another namespace's chunk"
        assert len(r) == min(k, len(mine))
        assert r.spans[:, 0].tolist() == sorted(r.spans[:, 0].tolist()), "time order"
        for j, cid in enumerate(r.ids.tolist()):
            torch.testing.assert_close(r.keys[j], self.pages[cid][0], rtol=0, atol=0)
            torch.testing.assert_close(r.values[j], self.pages[cid][1], rtol=0, atol=0)

    @rule(in_place=st.booleans())
    def save_and_load(self, in_place: bool) -> None:
        COUNTS["memory"][1] += 1
        path = self.tmp / "saved"
        before = {ns: self.mm.chunk_ids(ns).tolist() for ns in self.mm.namespaces()}
        self.mm.save(path)
        if in_place:
            self.mm.load(path)
        else:
            old, self.mm = self.mm, self.MM.load(path)
            old.reset()
        assert {ns: self.mm.chunk_ids(ns).tolist() for ns in self.mm.namespaces()} == before

    @rule(ns=st.one_of(st.none(), st.sampled_from(NAMESPACES)))
    def reset(self, ns: str | None) -> None:
        COUNTS["memory"][1] += 1
        self.mm.reset(ns)

    @invariant()
    def limits_and_isolation(self) -> None:
        every: list[int] = []
        for ns in self.mm.namespaces():
            ids = self.mm.chunk_ids(ns).tolist()
            assert all(self.owner[i] == ns for i in ids), "a chunk moved to another namespace"
            assert self.mm.num_tokens(ns) <= self.CAP, "capacity_tokens exceeded"
            assert len(self.mm._ns[ns].bank) == len(ids) == len(self.mm._ns[ns].policy)
            every += ids
        assert len(every) == len(set(every)) == len(self.mm.store), "pages and chunks disagree"
        for name, t in self.mm.store.stats()["tiers"].items():
            assert t["peak_bytes"] <= t["budget_bytes"], f"{name} tier over its byte budget"


def test_memory_state_machine() -> None:
    COUNTS["memory"] = [0, 0]
    MemoryMachine.TestCase.settings = settings(max_examples=20 * FACTOR, stateful_step_count=30, deadline=None,
                                               suppress_health_check=list(HealthCheck), derandomize=True,
                                               phases=PHASES)
    MemoryMachine.TestCase("runTest").runTest()
    examples, steps = COUNTS["memory"]
    report("fuzz_memory_manager", examples=examples, steps=steps)
    assert examples >= 10 * FACTOR
