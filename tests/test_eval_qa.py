"""The long-document question set and ``memkit eval qa``.

* The set built with the bundled SmolLM2 tokenizer has at least 50 questions, every fact 8k-64k tokens before the
  end of its document, every answer word inside the fact's own tokens, and inserted answers used once.
* ``memkit eval qa`` runs end to end on a tiny random model (short documents, the memory reloaded per question).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from memkit.evaluation.qa_set import MIN_DISTANCE, build_documents, score_answer
from memkit.testing.cli import memkit_cli


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from memkit.models import _convert_gguf
    from memkit.resources import smollm2_gguf

    return AutoTokenizer.from_pretrained(_convert_gguf(smollm2_gguf()), local_files_only=True)


def test_question_set_on_the_bundled_tokenizer(smollm2_tokenizer):
    tok = smollm2_tokenizer
    docs = build_documents(tok)
    questions = [(d, q) for d in docs for q in d.questions]
    assert len(questions) >= 50
    assert Counter(q.kind for _, q in questions).keys() == {"persons", "speaker", "inserted"}
    for d, q in questions:
        distance = len(d.ids) - q.fact_span[1]
        assert MIN_DISTANCE <= distance <= 65_536, (d.name, q.question, distance)
        fact = tok.decode(d.ids[q.fact_span[0]:q.fact_span[1]])
        if q.kind == "speaker":
            assert q.meta["speech"] in fact
        else:
            assert score_answer(fact, q.answers), (fact, q.answers)
    inserted = [q.answers[0] for _, q in questions if q.kind == "inserted"]
    assert len(inserted) == len(set(inserted)) == 20


def test_score_answer_needs_every_word_by_stem():
    assert score_answer("a friend of Hamlet's", ["Friend", "Hamlet"])
    assert not score_answer("a friend of the king", ["Friend", "Hamlet"])
    assert score_answer("Larkmoor.", ["Larkmoor"]) and not score_answer("London", ["Larkmoor"])


def test_eval_qa_end_to_end(tiny, tmp_path):
    model, _text, cfg = tiny
    r = memkit_cli("eval", "qa", "--model", str(model), "--config", str(cfg), "--modes", "full,memkit",
                   "--kinds", "persons,inserted", "--doc-tokens", "1200", "--min-distance", "300", "--limit", "2",
                   "--plain-tokens", "512", "--max-new-tokens", "3", "--out", "qa.json", "--no-progress",
                   "--threads", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "qa.json").read_text())
    recs = data["results"]
    assert {r["mode"] for r in recs} == {"full", "memkit"}
    per_mode = Counter(r["mode"] for r in recs)
    assert per_mode["full"] == per_mode["memkit"] >= 4
    for rec in recs:
        assert isinstance(rec["correct"], bool) and rec["distance"] >= 1
        if rec["mode"] == "memkit":
            assert rec["distance"] >= 300 and isinstance(rec["fact_retrieved"], bool)
            assert rec["document_tokens"] <= 1200
    assert "persons" in data["table"] and "inserted" in data["table"]


def test_eval_qa_refuses_a_set_with_no_question(tiny, tmp_path):
    model, _text, _cfg = tiny
    r = memkit_cli("eval", "qa", "--model", str(model), "--doc-tokens", "400", "--min-distance", "399",
                   "--out", "qa.json", cwd=tmp_path)
    assert r.returncode != 0
    assert "min-distance" in r.stderr
