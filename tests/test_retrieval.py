"""The retrieval pipeline: its config block, each stage on its own, and the question step's adaptive count.

Stages run over a real MemoryManager (faiss-flat bank, real K/V store); text queries use memkit's own
CallableRetriever over a fixed vocabulary, so the scores are exact and known.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from memkit import ConfigError
from memkit.config import MemoryConfig, load_config
from memkit.errors import UnknownParameterError
from memkit.memory import MemoryManager
from memkit.retrieval import STAGES, Pipeline, RetrievalConfig, Row, RowRequest, StepContext
from memkit.retrieval.stages.select import largest_gap
from memkit.retrievers import CallableRetriever

L, H, C, D = 1, 1, 8, 2
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"]
E = len(WORDS)


def bag(texts: list[str]) -> np.ndarray:
    """A bag-of-words embedding over WORDS (unit norm after CallableRetriever)."""
    out = np.full((len(texts), E), 1e-3, np.float32)
    for i, t in enumerate(texts):
        for w in t.split():
            if w in WORDS:
                out[i, WORDS.index(w)] += 1.0
    return out


def manager(**cfg: object) -> MemoryManager:
    config = MemoryConfig(chunk_size=C, top_k=int(cfg.pop("top_k", 4)), sink_tokens=2,  # type: ignore[call-overload]
                          kvstore={"device_bytes": 1 << 16, "host_bytes": 1 << 22, "dtype": "fp32"}, **cfg)
    return MemoryManager(config, num_layers=L, kv_heads=H, head_dim=D, embed_dim=E,
                         retriever=CallableRetriever(bag, E))


def fill(mm: MemoryManager, texts: list[str], *, lengths: list[int] | None = None, tokens: bool = True) -> None:
    """One chunk per text, spans in order; token ids = the word indices (+ 100) padded to C."""
    n = len(texts)
    lengths = lengths or [C] * n
    starts = np.cumsum([0, *lengths[:-1]])
    spans = np.stack([starts, starts + np.asarray(lengths)], 1)
    tok = np.full((n, C), -1, np.int64)
    for i, t in enumerate(texts):
        ids = [100 + WORDS.index(w) for w in t.split()][:lengths[i]]
        ids += [99] * (lengths[i] - len(ids))
        tok[i, :lengths[i]] = ids
    kv = torch.randn(n, L, H, C, D, generator=torch.Generator().manual_seed(n))
    mm.add_chunks(kv, kv, mm.embed(texts=texts), spans, texts=texts, token_ids=tok if tokens else None)


def words(text: str) -> np.ndarray:
    return np.asarray([100 + WORDS.index(w) for w in text.split()], np.int64)


def step(mm: MemoryManager, text: str, step_name: str = "question", **req: object) -> Row:
    return mm.retrieve_step([RowRequest("default", tokens=words(text), **req)], step_name,  # type: ignore[arg-type]
                            decode=lambda ids: " ".join(WORDS[i - 100] for i in ids if 100 <= i < 100 + E))[0]


# ---------------------------------------------------------------------------------------------- the config block
def test_defaults_and_round_trip() -> None:
    cfg = RetrievalConfig()
    assert list(cfg.stages("block")) == ["query", "candidates", "dedup", "select", "neighbours"]
    assert list(cfg.stages("question")) == ["query", "candidates", "fusion", "dedup", "select", "neighbours", "reread"]
    assert cfg.stage("question", "select").adaptive and not cfg.stage("block", "select").adaptive
    assert RetrievalConfig.from_dict(cfg.to_dict()) == cfg
    mc = MemoryConfig(retrieval={"question": {"fusion": {"lexical_tokens": 24}, "reread": False}})
    assert mc.retrieval.stage("question", "fusion").lexical_tokens == 24  # one setting changed ...
    assert mc.retrieval.stage("question", "fusion").rrf_k == 60  # ... the rest kept
    assert mc.retrieval.stage("question", "reread") is None  # a stage turned off
    assert MemoryConfig.from_dict(mc.to_dict()) == mc
    over = load_config(mc, retrieval={"question": {"select": {"k": 2}}})  # a partial override keeps the file's rest
    assert over.retrieval.stage("question", "fusion").lexical_tokens == 24 and over.retrieval.stage(
        "question", "select").k == 2


def test_unknown_stages_and_settings_list_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown stage 'rerank'.*'candidates'"):
        MemoryConfig(retrieval={"question": {"rerank": {}}})
    with pytest.raises(UnknownParameterError, match=r"fusion has no setting\(s\) \['lead_x'\]; valid settings are"):
        MemoryConfig(retrieval={"question": {"fusion": {"lead_x": 2}}})
    with pytest.raises(UnknownParameterError, match="valid steps"):
        MemoryConfig(retrieval={"answer": {}})
    with pytest.raises(ConfigError, match=r"select\.min_gap"):
        MemoryConfig(retrieval={"question": {"select": {"min_gap": 1.5}}})
    with pytest.raises(ConfigError, match="mapping of its settings"):
        MemoryConfig(retrieval={"question": {"select": 3}})


@pytest.mark.parametrize("step,stage", [("question", "select"), ("question", "query"), ("block", "candidates")])
def test_a_step_that_would_read_nothing_is_refused(step: str, stage: str) -> None:
    with pytest.raises(ConfigError, match=f"turns off the '{stage}' stage: that step would read no memory"):
        MemoryConfig(retrieval={step: {stage: False}})


def test_reread_runs_only_at_the_question_step() -> None:
    with pytest.raises(ConfigError, match=r"'reread' runs only in the \['question'\]"):
        MemoryConfig(retrieval={"block": {"reread": {}}})


def test_memkit_0_2_keys_load_with_a_warning_naming_the_new_key(tmp_path: Path) -> None:
    old = {"top_k": 8, "question_top_k": 3, "question_lexical": 0, "question_reread": False,
           "max_chunk_similarity": None, "fill_neighbors": False, "question_neighbors": 2, "question_tokens": 16}
    with pytest.warns(FutureWarning, match=r"question_top_k -> retrieval\.question\.select\.k"):
        cfg = MemoryConfig.from_dict(old)
    r = cfg.retrieval
    assert (r.stage("question", "select").k, r.stage("question", "select").adaptive) == (3, False)
    assert r.stage("question", "fusion").lexical_tokens == 0 and r.stage("question", "reread") is None
    assert r.stage("block", "dedup").max_similarity is None and r.stage("question", "dedup").max_similarity is None
    assert not r.stage("block", "neighbours").fill and r.stage("question", "neighbours").of_best == 2
    assert r.stage("question", "query").question_tokens == 16
    path = tmp_path / "old.yaml"
    path.write_text("question_top_k: 3\n")
    with pytest.warns(FutureWarning):
        assert load_config(path).retrieval.stage("question", "select").k == 3
    with pytest.raises(ConfigError, match="disagree; give one"):
        MemoryConfig.from_dict({"question_top_k": 3, "retrieval": {"question": {"select": {"k": 5}}}})
    assert "retrieval.question.select.k" in repr(cfg.question_top_k)  # the old name says where it lives now ...
    with pytest.raises(ConfigError, match=r"moved to retrieval\.question\.select\.k"):
        bool(cfg.question_top_k)  # ... and never stands in for a value
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cfg.replace(top_k=6).retrieval == cfg.retrieval  # copies carry the block, not the old keys


def test_a_save_written_before_the_retrieval_block_loads(tmp_path: Path) -> None:
    """memkit 0.2 wrote its retrieval keys at the top of the saved config: such a save loads, with those settings."""
    from memkit.files import write_json

    mm = manager()
    fill(mm, ["alpha bravo", "charlie delta"])
    mm.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    manifest.pop("_seal", None)
    config = manifest["config"]
    config.pop("retrieval")
    config.update(question_top_k=2, question_lexical=16, question_reread=True, max_chunk_similarity="auto",
                  fill_neighbors=True, question_neighbors=1, question_tokens=32)
    for k in [k for k in manifest if k.startswith("_")]:
        manifest.pop(k)
    write_json(tmp_path / "m" / "manifest.json", manifest)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the loader's own config: no warning aimed at the user
        back = MemoryManager.load(tmp_path / "m", retriever=CallableRetriever(bag, E))
    assert back.num_chunks() == 2 and back.config.retrieval.stage("question", "select").k == 2


# ---------------------------------------------------------------------------------------------- the registry
def test_every_built_in_stage_is_registered_with_its_config() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    for name in ("query", "candidates", "fusion", "dedup", "select", "focus", "neighbours", "reread"):
        kind = STAGES.get(name)
        assert kind.name == name and kind.config_class().to_dict() is not None
        for setting in kind.config_class().to_dict():  # each setting has its row (its rationale) in the docs
            assert f"`{name}` |" in doc and f"`{setting}`" in doc, (name, setting)
    with pytest.raises(ConfigError, match="unknown retrieval stage"):
        STAGES.get("nope")


def test_a_registered_stage_runs_where_a_config_names_it() -> None:
    """Adding a stage: one class with its config; a config naming it puts it in the step's pipeline."""
    from dataclasses import dataclass

    from memkit.retrieval import Stage, StageConfig, register_stage

    @dataclass
    class DropConfig(StageConfig):
        word: str = "echo"

    @register_stage
    class DropStage(Stage):  # drops candidates whose text holds a word
        name, phase, order, config_class = "drop_word", "rank", 45, DropConfig

        def run(self, rows: list[Row], ctx: StepContext) -> None:
            for r in rows:
                if r.cand is not None and r.ns is not None:
                    keep = [self.config.word not in (r.ns.texts.get(int(c)) or "") for c in r.cand.ids]
                    r.cand = r.cand.keep(np.asarray(keep, bool))

    try:
        mm = manager(top_k=2, retrieval={"block": {"drop_word": {"word": "echo"}}})
        assert "drop_word" in mm.pipeline("block").names()
        fill(mm, ["alpha echo", "alpha bravo", "charlie delta", "golf hotel"])
        got = step(mm, "alpha", "block")
        assert got.result is not None and all("echo" not in t for t in got.result.texts)
    finally:
        STAGES.forget("drop_word")


# ---------------------------------------------------------------------------------------------- each stage
def test_query_stage_embeds_the_chunk_sized_window_and_the_question() -> None:
    mm = manager()
    fill(mm, ["alpha bravo", "charlie delta"])
    text = "golf hotel india juliet kilo lima alpha bravo charlie delta"  # 10 tokens; C = 8
    row = step(mm, text, "question")  # question_tokens 32 >= 10: both queries read what they can
    assert row.queries is not None and row.queries.shape == (2, E)
    want = mm.embed(texts=[" ".join(text.split()[-C:]), text])
    np.testing.assert_allclose(row.queries, want, atol=1e-6)
    block = step(mm, text, "block")
    assert block.queries is not None and block.queries.shape == (1, E)  # no question query between blocks


def test_bad_requests_are_refused() -> None:
    from memkit.errors import InvalidInputError

    mm = manager()
    fill(mm, ["alpha bravo", "charlie delta"])
    with pytest.raises(InvalidInputError, match=r"decode=tokenizer\.decode"):
        mm.retrieve_step([RowRequest("default", tokens=words("alpha"))], "question")
    with pytest.raises(InvalidInputError, match="RowRequest"):
        mm.retrieve_step(["default"], "question")  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match="namespace"):
        mm.retrieve_step([RowRequest("", tokens=words("alpha"))], "question")
    with pytest.raises(ConfigError, match="retrieval step"):
        mm.retrieve_step([], "answer")


def test_candidates_skip_the_sinks_and_rank_by_the_best_query() -> None:
    mm = manager(top_k=2)
    fill(mm, ["alpha bravo", "alpha charlie", "delta echo", "golf hotel"])
    row = step(mm, "alpha", "block", exclude=(0, C))  # chunk 0 lies inside the sinks
    assert row.cand is not None and 0 not in row.cand.ids.tolist() and row.cand.ids.tolist()[0] == 1
    assert row.result is not None and 0 not in row.result.ids.tolist()


def test_fusion_lets_the_question_rare_word_lead_and_records_bm25() -> None:
    mm = manager(top_k=1, retrieval={"question": {"select": {"adaptive": False}, "neighbours": {"of_best": 0}}})
    fill(mm, ["alpha alpha alpha", "alpha bravo", "alpha charlie", "kilo lima", "alpha delta"])
    row = step(mm, "alpha alpha kilo")  # the embeddings favour the alpha chunks; kilo is rare
    assert row.cand is not None and "bm25" in row.cand.signals
    assert row.cand.ids.tolist()[0] == 3 and row.result is not None and row.result.ids.tolist() == [3]
    off = manager(top_k=1, retrieval={"question": {"select": {"adaptive": False}, "neighbours": {"of_best": 0},
                                                   "fusion": {"lexical_tokens": 0}}})
    fill(off, ["alpha alpha alpha", "alpha bravo", "alpha charlie", "kilo lima", "alpha delta"])
    assert step(off, "alpha alpha kilo").result.ids.tolist() == [0]  # type: ignore[union-attr]


def test_dedup_keeps_one_of_near_duplicates() -> None:
    mm = manager(top_k=2, retrieval={"block": {"dedup": {"max_similarity": 0.95}, "neighbours": {"fill": False}}})
    fill(mm, ["alpha bravo", "alpha bravo", "alpha bravo charlie", "golf"], tokens=False)  # 0 and 1: the same
    got = step(mm, "alpha bravo", "block").result
    assert got is not None and len({0, 1} & set(got.ids.tolist())) == 1


def test_largest_gap_finds_the_head() -> None:
    assert largest_gap(np.asarray([0.9, 0.3, 0.28, 0.25, 0.2]), 4) == (pytest.approx(0.6 / 0.7), 1)
    share, head = largest_gap(np.asarray([0.5, 0.48, 0.46, 0.44, 0.42]), 4)
    assert share == pytest.approx(0.25) and head in (1, 2, 3, 4)  # even steps: no head stands apart
    assert largest_gap(np.asarray([0.5]), 4) == (0.0, 0) and largest_gap(np.ones(5), 4) == (0.0, 0)
    assert largest_gap(np.asarray([0.9, 0.8, 0.1, 0.1, 0.1]), 4) == (pytest.approx(0.7 / 0.8), 2)


def test_select_reads_the_head_when_one_chunk_stands_apart() -> None:
    """A question whose evidence has a clear head reads it (and the neighbours of its best); the trace says why and
    memory.selection() gives the count and the reason. Without a clear head the whole budget is read."""
    mm = manager(top_k=6, retrieval={"question": {"select": {"min_gap": 0.7}}})  # the threshold of these examples
    texts = ["golf hotel", "golf india", "kilo lima juliet", "golf juliet", "golf delta", "golf bravo", "golf echo",
             "golf hotel india"]
    fill(mm, texts)
    row = step(mm, "kilo lima")  # only chunk 2 holds the question's words
    assert row.result is not None
    assert row.result.ids.tolist() == [1, 2, 3]  # the head and its neighbours, time order
    trace = mm.trace()
    assert {t["id"]: t["why"] for t in trace} == {1: "neighbour", 2: "head", 3: "neighbour"}
    sel = mm.selection()
    assert sel["mode"] == "adaptive" and sel["head"] == 1 and sel["chosen"] == 3 and sel["gap"] >= 0.7
    assert sel["signal"] in ("question", "query", "bm25") and "above a gap" in sel["reason"]
    flat = step(mm, "golf")  # seven chunks hold golf alike: their head is more than the budget
    assert flat.result is not None and len(flat.result) == 6 and mm.selection()["reason"] == "the head fills the budget"
    step(mm, "golf hotel india")  # two chunks hold two of the words, one holds all three: no gap stands out
    assert mm.selection()["reason"].startswith("no clear head") and len(mm.trace()) == 6
    fixed = manager(top_k=6, retrieval={"question": {"select": {"adaptive": False}}})
    fill(fixed, texts)
    assert len(step(fixed, "kilo lima").result) == 6  # type: ignore[arg-type]
    assert fixed.selection() == {"mode": "fixed", "k": 6, "candidates": 8, "chosen": 6}


def test_neighbours_of_the_best_and_free_slots_never_cross_a_call_boundary() -> None:
    """A partial chunk ends a call (a chat turn): the chunk after it is another call's text, not a neighbour."""
    mm = manager(top_k=4, retrieval={"question": {"select": {"adaptive": False, "k": 3}}})
    fill(mm, ["golf hotel", "kilo lima", "india juliet", "echo delta"], lengths=[C, 5, C, C])  # chunk 1 ends a call
    got = step(mm, "kilo lima").result
    assert got is not None and 1 in got.ids.tolist() and 0 in got.ids.tolist() and 2 not in got.ids.tolist()
    mm2 = manager(top_k=4, retrieval={"question": {"select": {"adaptive": False, "k": 3}}})
    fill(mm2, ["golf hotel", "kilo lima", "india juliet", "echo delta"])  # whole chunks: one text
    got2 = step(mm2, "kilo lima").result
    assert got2 is not None and {0, 1, 2} <= set(got2.ids.tolist())


class Recorder:
    """A reader that records what a stage asks (zeros for K/V); reading through a model is tested in
    tests/test_wrap_generate.py."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def read(self, ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        self.calls.append(ids)
        kv = torch.zeros(1, H, ids.shape[1], D)
        return {0: kv}, {0: kv}

    def queries(self, ids: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the text retriever needs no probe queries")


def test_reread_stage_reads_sinks_chunks_and_window_through_the_reader() -> None:
    """The pipeline asks the reader for one probe read of [sinks | chunks | window] and hands the K/V back."""
    from memkit.retrieval.pipeline import Reread

    recorder = Recorder()
    calls = recorder.calls
    mm = manager(top_k=2, retrieval={"question": {"select": {"adaptive": False, "k": 1}, "neighbours": {"of_best": 0}}})
    fill(mm, ["golf hotel", "kilo lima", "india juliet"])
    call = np.arange(24) + 100  # this call read the whole stream: chunks 0-2 then 0 window tokens
    row = mm.retrieve_step([RowRequest("default", tokens=words("kilo lima"), call_tokens=call, call_base=0, sinks=2,
                                       window=np.asarray([7, 8, 9]))], "question", reader=recorder,
                           decode=lambda ids: " ".join(WORDS[i - 100] for i in ids if 100 <= i < 100 + E))[0]
    assert row.result is not None and row.result.ids.tolist() == [1]
    assert isinstance(row.reread, Reread) and (row.reread.sinks, row.reread.lengths, row.reread.window) == (2, [C], 3)
    assert calls[0].tolist() == [[100, 101, *range(108, 116), 7, 8, 9]]  # sinks | chunk 1's tokens | window


def test_reread_reads_only_the_recent_tokens_of_a_lookup() -> None:
    """``reread: {recent: R}``: a lookup (the selection read a head) reads its own step and the window's latest tokens,
    R in all; the window's older tokens are skipped (``Reread.skip``, which the style hides). 0 reads the whole
    window, and so does a question whose selection read no head (an aggregate over the text)."""
    window = np.asarray([1, 2, 3, 4, 5])
    texts = ["golf hotel", "kilo lima", "india juliet", "echo delta", "alpha bravo"]
    for adaptive in (True, False):
        for recent, skip in ((0, 0), (4, 3), (7, 0), (9, 0), (2, 5), (1, 5)):
            recorder = Recorder()
            select = {"adaptive": True, "min_candidates": 2} if adaptive else {"adaptive": False, "k": 1}
            mm = manager(top_k=3, retrieval={"question": {"select": select, "neighbours": {"of_best": 0},
                                                          "reread": {"recent": recent}}})
            fill(mm, texts)
            call = np.arange(8 * len(texts)) + 100
            tokens = np.concatenate([window, words("kilo lima")])  # the window, then the question's step (2 tokens)
            row = mm.retrieve_step([RowRequest("default", tokens=tokens, call_tokens=call, call_base=0, sinks=2,
                                               window=window)], "question", reader=recorder,
                                   decode=lambda ids: " ".join(WORDS[i - 100] for i in ids if 100 <= i < 100 + E))[0]
            assert row.result is not None and row.result.ids.tolist() == [1]
            assert ("head" in row.why.values()) == adaptive, row.selection
            skip = skip if adaptive else 0
            assert row.reread is not None and (row.reread.skip, row.reread.window) == (skip, 5 - skip), recent
            assert recorder.calls[0][0, 2 + C:].tolist() == window[skip:].tolist()  # sinks | chunk | recent window
    with pytest.raises(ConfigError, match=r"reread\.recent"):
        manager(retrieval={"question": {"reread": {"recent": -1}}})


def test_reread_reads_the_best_chunk_last_when_asked() -> None:
    """``reread: {order: best_last}`` reads (and hands the style) the chunks by merit with the best last, next to the
    question; the default reads them in time order."""
    recorder = Recorder()
    calls = recorder.calls
    rows = {}
    for order in ("time", "best_last"):
        mm = manager(top_k=3, retrieval={"question": {"select": {"adaptive": False}, "neighbours": {"of_best": 0},
                                                      "fusion": False, "reread": {"order": order}}})
        fill(mm, ["kilo lima", "golf hotel", "kilo india", "echo delta"])  # kilo lima: best; kilo india: second
        rows[order] = mm.retrieve_step([RowRequest("default", tokens=words("kilo lima"), exclude=(0, 0))], "question",
                                       reader=recorder, decode=lambda ids: " ".join(WORDS[i - 100] for i in ids
                                                                                      if 100 <= i < 100 + E))[0]
    assert rows["time"].result.ids.tolist() == sorted(rows["time"].result.ids.tolist())  # type: ignore[union-attr]
    best = rows["best_last"]
    assert best.result is not None and best.result.ids.tolist()[-1] == 0 and best.result.ids.tolist()[-2] == 2
    assert best.result.spans[-1].tolist() == [0, C]  # every field moved with its chunk
    assert calls[-1][0, -C:].tolist()[:2] == words("kilo lima").tolist()  # the best chunk's tokens are read last
    with pytest.raises(ConfigError, match=r"reread\.order"):
        manager(retrieval={"question": {"reread": {"order": "random"}}})


def test_the_runtime_calls_the_pipeline_once_per_step() -> None:
    """One retrieve_step per memory step of the model (each block of a forward, the question of a generate)."""
    import memkit
    from memkit.testing.tiny_models import tiny_model

    wrapped = memkit.wrap(tiny_model("llama"), window=32, chunk_size=8, block_size=16, top_k=3, sink_tokens=2,
                          progress=False)
    mm = wrapped.memkit_runtime.memory
    seen: list[str] = []
    original = mm.retrieve_step

    def counting(requests, step, **kw):  # type: ignore[no-untyped-def]
        seen.append(step)
        return original(requests, step, **kw)

    mm.retrieve_step = counting  # type: ignore[method-assign]
    ids = torch.randint(3, 200, (1, 120), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        wrapped(ids)
    # memory first holds chunks when the window (32) overflows after the block ending at 48: the blocks starting
    # at 48, 64, 80, 96 and 112 retrieve, once each
    assert seen == ["block"] * 5
    seen.clear()
    with torch.no_grad():
        wrapped.generate(ids[:, :20], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert seen[-1] == "question" and seen.count("question") == 1
    assert isinstance(Pipeline.build("block", RetrievalConfig().stages("block")), Pipeline)



def test_focus_reads_the_chunk_the_question_attends_when_retrieval_has_no_head() -> None:
    """Retrieval reads its whole budget (here: a fixed selection): the focus stage asks the reader what the question's last
    tokens attend in [sinks | candidates | question] and reads the chunk whose attention stands apart (then the
    neighbours of it); an even spread of attention leaves the candidates as they were."""
    from memkit.retrieval.stages.focus import chunk_masses

    asked: list[tuple[list[int], int]] = []

    class Attends:  # stands in for the model: attention peaked on the tokens of one chunk (the stage is under test)
        def __init__(self, token: int | None, sure: Any = None) -> None:
            self.token, self.sure = token, sure

        def read(self, ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
            kv = torch.zeros(1, H, ids.shape[1], D)
            return {0: kv}, {0: kv}

        def queries(self, ids: torch.Tensor) -> torch.Tensor:
            raise AssertionError("the text retriever needs no probe queries")

        def attention(self, ids: torch.Tensor, last: int) -> tuple[torch.Tensor, float]:
            asked.append((ids[0].tolist(), last))
            w = torch.ones(ids.shape[1])
            if self.token is not None:
                w[ids[0] == self.token] = 50.0
            sure = 0.9 if int(ids.shape[1]) < 4 * C else 0.5  # surer of its answer with fewer chunks read
            return w / w.sum(), sure if self.sure is None else self.sure(int(ids.shape[1]))

    texts = ["golf hotel", "golf india", "golf kilo", "golf juliet", "golf delta", "golf bravo", "golf echo",
             "golf lima"]
    cfg = {"question": {"select": {"adaptive": False}, "reread": False, "focus": {}}}  # focus on (off by default);
    # retrieval reads its whole budget
    mm = manager(top_k=6, retrieval=cfg)
    fill(mm, texts)
    kilo = 100 + WORDS.index("kilo")

    def ask(reader: Attends) -> Row:
        return mm.retrieve_step([RowRequest("default", tokens=words("golf golf"), exclude=(0, 2))], "question",
                                reader=reader,
                                decode=lambda ids: " ".join(WORDS[i - 100] for i in ids if 100 <= i < 100 + E))[0]

    row = ask(Attends(kilo))
    (ids, last), (alone, _) = asked[-2:]
    assert last == 2 and ids[-2:] == words("golf golf").tolist()  # the question is read last, its 2 tokens attend
    assert len(ids) == 2 + 6 * C + 2  # the stream's 2 sink tokens | the six candidates | the question
    assert len(alone) == 2 + C + 2 and kilo in alone  # then the head alone is read and scored
    assert row.result is not None and 2 in row.result.ids.tolist() and len(row.result) <= 3  # kilo's chunk + neighbours
    assert {t["id"]: t["why"] for t in mm.trace()}[2] == "focus"
    sel = mm.selection()
    assert sel["reason"].startswith("focus: 1 chunk") and sel["focus"]["gap"] >= 0.5
    assert (sel["focus"]["sure_head"], sel["focus"]["sure_all"]) == (0.9, 0.5)
    unsure = ask(Attends(kilo, sure=lambda n: 0.4 if n < 4 * C else 0.5))  # no surer with the head alone
    assert unsure.result is not None and len(unsure.result) == 6 and "sure_head" in mm.selection()["focus"]
    even = ask(Attends(None))  # attention spread evenly: no chunk stands apart, the budget is read
    assert even.result is not None and len(even.result) == 6 and mm.selection()["focus"]["gap"] < 0.5
    off = manager(top_k=6, retrieval={"question": {"select": {"adaptive": False}, "reread": False}})  # the default
    fill(off, texts)
    assert len(off.retrieve_step([RowRequest("default", tokens=words("golf golf"))], "question",
                                 reader=Attends(kilo), decode=lambda ids: "golf golf")[0].result) == 6  # type: ignore
    assert chunk_masses(np.asarray([1.0, 1, 2, 3, 4, 5]), 1, [2, 3]).tolist() == [3.0, 12.0]


def test_probe_attention_is_the_models_own_attention_of_the_last_tokens() -> None:
    """Runtime.probe_attention equals what the plain model's eager attention gives: the mean over the last tokens,
    heads and layers of each token's weight (rows sum to 1, no token sees the future); and its confidence is the
    plain model's probability of its most likely next token."""
    import memkit
    from memkit.testing.tiny_models import tiny_model

    ids = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(3))
    plain = tiny_model("llama")
    plain.set_attn_implementation("eager")
    with torch.no_grad():
        att = plain(ids, output_attentions=True).attentions  # per layer (1, Hq, T, T)
    want = torch.stack([a[0, :, -5:].float().mean(dim=(0, 1)) for a in att]).mean(0)  # (T,)
    wrapped = memkit.wrap(tiny_model("llama"), window=32, chunk_size=8, block_size=16, top_k=3, sink_tokens=2,
                          progress=False)
    rt = wrapped.memkit_runtime
    with rt.calling(1, ["probe-test"], mode="probe"):
        got, sure = rt.reader.attention(ids, 5)
    assert got.shape == (40,) and float(got.sum()) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert sure == pytest.approx(float(torch.softmax(plain(ids).logits[0, -1].float(), -1).max()), rel=1e-4)
    with rt.calling(1, ["probe-test"], mode="probe"), pytest.raises(memkit.MemkitError, match="last >= 1"):
        rt.reader.attention(ids, 0)
