"""A question set over long real documents: facts stated once, asked 8k-64k tokens later.

Built in code from the bundled texts, the same on every run (no randomness outside fixed seeds), in the spirit of
the needle tests of Kamradt (2023) and RULER (Hsieh et al. 2024) but over real documents:

* ``persons`` — "In the list of persons represented, who is Tybalt?": a play's dramatis personae, read at the
  start of the play and asked at its end (the whole play is the distance).
* ``speaker`` — 'Who says "<a one-line speech>"?': the speaker tag above a short speech, asked from the end of
  the play; speeches of the two most frequent speakers are left out, so naming the lead cannot score.
* ``inserted`` — "In which town was Tobias Quill born?": sentences with invented names inserted into 64k tokens
  of King James Bible prose (20 facts, 8k-60k tokens before the end); the answers are invented words, so the
  model cannot know them from training.

A :class:`Document` holds token ids and its :class:`Question` s, each with the token span of its fact; a
question counts as answered when every ``answers`` word stem appears in the generated text.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Question", "Document", "build_documents", "score_answer", "PLAYS", "QA_KINDS"]

PLAYS = ("romeo_and_juliet", "midsummer_nights_dream", "winters_tale")  # none of them in corpora.TRAIN_PLAYS
QA_KINDS = ("persons", "speaker", "inserted")
PERSONS_PER_PLAY = 7
SPEAKERS_PER_PLAY = 6
INSERTED = 20
MIN_DISTANCE = 8192  # tokens between a fact and the end of its document, at least
KJV_TOKENS = 65_536
_STOP = {"a", "an", "the", "to", "of", "and", "his", "her", "in", "on", "with", "at", "for", "by", "from", "same",
         "other", "another", "two", "three", "one"}
_PERSON = re.compile(r"^([A-Z][A-Za-z']+(?: [A-Z][A-Za-z']+)?), ([^\"}]{6,80}?)\.?\s*$")
_TAG = re.compile(r"^([A-Z][A-Za-z']+(?: [A-Z][A-Za-z']+)?)\.?$")

FIRST = ("Tobias", "Marisol", "Edwin", "Ottilie", "Caspar", "Henrietta", "Ambrose", "Philippa", "Lucan", "Rosalind",
         "Barnaby", "Isolde", "Silas", "Wilhelmina", "Jasper", "Cordelia", "Fenwick", "Mirabel", "Quentin", "Delphine")
LAST = ("Quill", "Venn", "Hartwell", "Pemberton", "Ashdown", "Larkspur", "Moberly", "Crane", "Dunmore", "Fairweather",
        "Gosling", "Holloway", "Inchbold", "Jessop", "Kettering", "Lovegrove", "Marchbank", "Nettleford", "Oakes",
        "Pargeter")
TOWNS = ("Larkmoor", "Quenby", "Thistledown", "Brackenford", "Wyndmere", "Oxlade", "Farrowgate", "Kilmarden",
         "Penhallow", "Stavely")
PETS = ("Bartholomew", "Pipkin", "Marmaduke", "Clementine", "Humbug", "Tiberius", "Figaro", "Winnifred", "Dumpling",
        "Ptolemy")
SHIPS = ("Gannet", "Morningstar", "Kestrel", "Bluebell", "Halcyon", "Sandpiper", "Corvina", "Wayfarer", "Merrow",
         "Saltash")
# (fact sentence, question, answer prefix, answer key in the filled slots)
TEMPLATES = (
    ("{p} was born in the town of {town}.", "In which town was {p} born?", "{p} was born in the town of", "town"),
    ("The dog that {p} owns is named {pet}.", "What is the name of the dog that {p} owns?",
     "The dog that {p} owns is named", "pet"),
    ("{p} sails a small boat called the {ship}.", "What is the boat that {p} sails called?",
     "The boat that {p} sails is called the", "ship"),
)


@dataclass
class Question:
    """One question about a document; ``fact_span`` = [start, end) token positions of its fact."""

    kind: str  # persons | speaker | inserted
    question: str
    prefix: str  # start of the answer the model continues
    answers: list[str]  # words that must all appear (by stem) in the answer
    fact_span: tuple[int, int]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Document:
    """A long document as token ids with its questions."""

    name: str
    ids: list[int]
    questions: list[Question]


def _stem(word: str) -> str:
    return word.lower()[:5]


def score_answer(text: str, answers: list[str]) -> bool:
    """True when every answer word's stem (first 5 letters, case-insensitive) is in ``text``."""
    low = text.lower()
    return all(_stem(a) in low for a in answers)


def _content_words(description: str) -> list[str]:
    words = re.findall(r"[A-Za-z']+", description)
    return [w for w in words if w.lower() not in _STOP and len(w) > 2]


def _token_span(offsets: list[tuple[int, int]], lo: int, hi: int) -> tuple[int, int]:
    """Token span covering characters [lo, hi)."""
    start = next((i for i, (_a, b) in enumerate(offsets) if b > lo), len(offsets))
    end = next((i for i, (a, _b) in enumerate(offsets) if a >= hi), len(offsets))  # past the cut: len(offsets)
    return start, end


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _play_document(tokenizer: Any, name: str, doc_tokens: int | None, min_distance: int) -> Document:
    from memkit.corpora import play_text

    text = play_text(name).replace("\r\n", "\n")
    ids, offsets = _encode(tokenizer, text)
    if doc_tokens:
        ids, offsets = ids[:doc_tokens], offsets[:doc_tokens]
    n = len(ids)
    questions: list[Question] = []
    head_end = text.find("ACT I")
    seen_desc: set[str] = set()
    persons = []
    pos = 0
    for line in text[:head_end].splitlines(keepends=True):
        m = _PERSON.match(line.strip())
        if m:
            who, desc = m.group(1), m.group(2).strip().rstrip(",")
            words = _content_words(desc)
            key = " ".join(w.lower() for w in words)
            own = desc.split()[0].lower() not in ("his", "her")  # "his son" says nothing without the line above
            if 1 <= len(words) <= 4 and key not in seen_desc and len(who.split()) == 1 and own:
                seen_desc.add(key)
                persons.append((who, desc, words[:2], pos, pos + len(line)))
        pos += len(line)
    step = max(1, len(persons) // PERSONS_PER_PLAY)
    for who, desc, words, lo, hi in persons[::step][:PERSONS_PER_PLAY]:
        if _token_span(offsets, lo, hi)[1] > n - min_distance:
            continue
        name_cased = who.title()
        questions.append(Question("persons", f"In the list of persons represented, who is {name_cased}?",
                                  f"{name_cased} is", words, _token_span(offsets, lo, hi),
                                  {"description": desc}))
    # one-line speeches: "TAG\nline\n" paragraphs
    speeches = []
    counts: Counter[str] = Counter()
    pos = 0
    for para in re.split(r"(\n\s*\n)", text):
        lines = para.strip("\n").split("\n")
        if len(lines) >= 2 and _TAG.match(lines[0].strip()) and pos > head_end:
            tag = _TAG.match(lines[0].strip()).group(1)  # type: ignore[union-attr]
            counts[tag] += 1
            if len(lines) == 2:
                speech = lines[1].strip()
                if 6 <= len(speech.split()) <= 14 and "[" not in speech:
                    start = pos + para.find(lines[1])
                    speeches.append((tag, speech, start, start + len(lines[1])))
        pos += len(para)
    leads = {t for t, _ in counts.most_common(2)}
    texts = Counter(s for _, s, _, _ in speeches)
    usable = [s for s in speeches if s[0] not in leads and texts[s[1]] == 1 and counts[s[0]] >= 5
              and " " not in s[0]]  # one-word speaker names ("FIRST LORD" names nobody)
    usable = [s for s in usable if s[3] <= offsets[-1][1] and _token_span(offsets, s[2], s[3])[1] <= n - min_distance]
    step = max(1, len(usable) // SPEAKERS_PER_PLAY)
    for tag, speech, lo, hi in usable[::step][:SPEAKERS_PER_PLAY]:
        questions.append(Question("speaker", f'In the play, who says "{speech}"?', "It is said by", [tag],
                                  _token_span(offsets, lo, hi), {"speech": speech}))
    return Document(name, ids, questions)


def _inserted_document(tokenizer: Any, n_tokens: int, min_distance: int, seed: int = 0) -> Document:
    from memkit.resources import kjv_verses

    rng = random.Random(f"memkit-qa-inserted-{seed}")
    verses = kjv_verses()[5_000:40_000]
    people = [f"{f} {l}" for f, l in zip(FIRST, rng.sample(LAST, len(LAST)))]
    values = {"town": list(TOWNS), "pet": list(PETS), "ship": list(SHIPS)}  # every answer word used once
    for v in values.values():
        rng.shuffle(v)
    sample = " ".join(verses[:400])
    chars_per_token = len(sample) / max(1, len(tokenizer(sample, add_special_tokens=False)["input_ids"]))
    target_chars = int(n_tokens * chars_per_token * 1.02)
    # Facts at evenly spaced fractions of the text, the last one min_distance (+ a margin) before the end.
    last = max(0.0, 1.0 - (min_distance + 1024) / n_tokens)
    at = [target_chars * last * i / INSERTED for i in range(INSERTED)]
    parts: list[str] = []
    marks = []
    pos, i = 0, 0
    for verse in verses:
        if pos >= target_chars:
            break
        while i < INSERTED and pos >= at[i]:
            fact, q, prefix, key = TEMPLATES[i % len(TEMPLATES)]
            word = values[key].pop()
            sentence = fact.format(p=people[i], town=word, pet=word, ship=word)
            marks.append((pos, pos + len(sentence), sentence, q.format(p=people[i]), prefix.format(p=people[i]),
                          word))
            parts.append(sentence + " ")
            pos += len(sentence) + 1
            i += 1
        parts.append(verse + " ")
        pos += len(verse) + 1
    ids, offsets = _encode(tokenizer, "".join(parts))
    ids, offsets = ids[:n_tokens], offsets[:n_tokens]
    questions = []
    for lo, hi, sentence, q, prefix, word in marks:
        span = _token_span(offsets, lo, hi)
        if span[1] <= len(ids) - min_distance:
            questions.append(Question("inserted", q, prefix, [word], span, {"sentence": sentence}))
    return Document("kjv_inserted", ids, questions)


def build_documents(tokenizer: Any, kinds: tuple[str, ...] = QA_KINDS, plays: tuple[str, ...] = PLAYS, *,
                    doc_tokens: int | None = None, min_distance: int = MIN_DISTANCE) -> list[Document]:
    """The question set: one document per play (persons + speaker questions) and the KJV document (inserted).

    ``doc_tokens`` cuts every document to that many tokens (the KJV document defaults to 64k); only questions
    whose fact ends at least ``min_distance`` tokens before the end of its document are kept.
    """
    docs = []
    if "persons" in kinds or "speaker" in kinds:
        for name in plays:
            doc = _play_document(tokenizer, name, doc_tokens, min_distance)
            doc.questions = [q for q in doc.questions if q.kind in kinds]
            docs.append(doc)
    if "inserted" in kinds:
        docs.append(_inserted_document(tokenizer, doc_tokens or KJV_TOKENS, min_distance))
    return [d for d in docs if d.questions]
