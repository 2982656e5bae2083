"""``memkit eval chat``: a fact told once in a chat, ~6k tokens of other turns, a save, a new process, the question.

The scenario of ``examples/chat.py`` made into a sampled task. Each turn sends only the new message (the model's
window never holds the conversation): memkit stores what every call read, so the fact is a chunk in memory, found
again by the question. A session (:func:`build_sessions`, fixed by its index) is

* one fact of one of several kinds (a locker code, a relative's name, a flight number, a date, a pet, a password,
  a parking spot, a room number), its values drawn from the session's own seed;
* other turns until ``chat_tokens`` tokens are in memory, of several kinds: a passage of a play to summarise, a
  passage of the King James Bible to explain, and short questions of everyday chat, in an order drawn per session;
* the memory saved to a folder, and the question asked in another process that loads it (:func:`ask`).

The answer counts when it contains the fact's value (digits and words compared case-insensitively, spaces and
punctuation ignored). The record says whether the fact's chunk was among the chunks the question step read.

    memkit eval chat --n 20 --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Session", "build_sessions", "tell", "ask", "score", "add_arguments", "run", "FACT_KINDS"]

NAMES = ("Ottoline", "Barnaby", "Perpetua", "Lysander", "Henrike", "Casimir", "Wilhelmina", "Thaddeus", "Rosamund",
         "Evander", "Clementine", "Ignatius")
PETS = ("Biscuit", "Marmalade", "Pickles", "Waffles", "Noodle", "Pepper", "Custard", "Bramble", "Truffle", "Ziggy")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
COLOURS = ("red", "blue", "green", "yellow", "orange", "purple")
WORDS = ("falcon", "meadow", "copper", "lantern", "harbor", "velvet", "quartz", "summit", "willow", "ember")
AIRLINES = ("BA", "LH", "KL", "AF", "IB", "SK")
# kind -> (fact sentence, question, answer prefix); {v} is the value, {x} an extra slot drawn with it
FACT_KINDS: dict[str, tuple[str, str, str]] = {
    "locker": ("Please remember this: my locker code is {v}. I will ask you for it later.",
               "What is my locker code?", "Your locker code is"),
    "sister": ("Something to remember: my sister's name is {v}. She lives abroad.",
               "What is my sister's name?", "Your sister's name is"),
    "flight": ("Note this for later, please: my flight number is {v}, leaving on Friday morning.",
               "What is my flight number?", "Your flight number is"),
    "dentist": ("Please keep this in mind: my dentist appointment is on {v}.",
                "When is my dentist appointment?", "Your dentist appointment is on"),
    "cat": ("A small thing to remember: my cat is called {v}. He likes to sleep on the sofa.",
            "What is my cat called?", "Your cat is called"),
    "wifi": ("Remember this for me: the wifi password at my office is {v}.",
             "What is the wifi password at my office?", "The wifi password at your office is"),
    "parking": ("Please remember where I parked: level {v} of the {x} garage.",
                "On which level of the garage did I park?", "You parked on level"),
    "room": ("Keep this in mind, please: my hotel room number is {v}.",
             "What is my hotel room number?", "Your hotel room number is"),
}
SMALL_TALK = (
    "What should I cook for dinner tonight? Something quick, please.",
    "Give me one tip for sleeping better.",
    "How do I keep basil alive on a windowsill?",
    "Suggest a name for a book club that reads mystery novels.",
    "What is a good way to start running if I have never done it?",
    "How long should I boil an egg for a soft yolk?",
    "Recommend a board game for four people.",
    "How can I remember to drink more water during the day?",
    "What is a polite way to decline an invitation?",
    "Give me an idea for a weekend walk near a river.",
)
PLAYS = ("tempest", "hamlet", "twelfth_night", "as_you_like_it")


@dataclass
class Session:
    """One sampled chat: the fact turn, the other turns in order, the question and the value it asks for."""

    index: int
    kind: str
    value: str
    fact: str
    question: str
    prefix: str
    turns: list[str] = field(default_factory=list)


def _value(kind: str, rng: random.Random) -> tuple[str, str]:
    if kind in ("locker", "room"):
        return str(rng.randint(1000, 9999)) if kind == "locker" else str(rng.randint(101, 989)), ""
    if kind == "sister":
        return rng.choice(NAMES), ""
    if kind == "flight":
        return f"{rng.choice(AIRLINES)} {rng.randint(1000, 9999)}", ""
    if kind == "dentist":
        return f"{rng.choice(MONTHS)} {rng.randint(3, 28)}", ""
    if kind == "cat":
        return rng.choice(PETS), ""
    if kind == "wifi":
        return f"{rng.choice(WORDS)}{rng.randint(10, 99)}", ""
    return str(rng.randint(2, 9)), rng.choice(COLOURS)  # parking: level, garage colour


def _passages(rng: random.Random, n: int) -> list[str]:
    """``n`` turns of the two long kinds: a play passage to summarise, a KJV passage to explain."""
    from memkit.corpora import play_text
    from memkit.resources import kjv_verses

    verses = kjv_verses()
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            text = play_text(rng.choice(PLAYS))
            at = rng.randrange(2000, len(text) - 4000)
            out.append("Here is a passage I am reading. Tell me in one sentence what happens.\n\n" + text[at:at + 3600])
        else:
            at = rng.randrange(0, len(verses) - 40)
            out.append("Explain this passage of the Bible to me in one sentence.\n\n" + " ".join(verses[at:at + 30]))
    return out


def build_sessions(n: int, *, seed: int = 0, passages: int = 7, small_talk: int = 3) -> list[Session]:
    """``n`` sessions, the same on every run: fact kinds in turn, values and other turns drawn per session."""
    kinds = list(FACT_KINDS)
    out = []
    for i in range(n):
        rng = random.Random(f"memkit-chat|{seed}|{i}")
        kind = kinds[i % len(kinds)]
        value, extra = _value(kind, rng)
        fact, question, prefix = FACT_KINDS[kind]
        turns = _passages(rng, passages) + rng.sample(SMALL_TALK, small_talk)
        rng.shuffle(turns)
        out.append(Session(i, kind, value, fact.format(v=value, x=extra), question, prefix, turns))
    return out


def _turn_ids(tok: Any, text: str, prefix: str = "") -> list[int]:
    """One user turn in the model's chat template, ending where the assistant speaks (plus an answer prefix)."""
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    if prefix:
        ids = list(ids) + list(tok(" " + prefix if not prefix.startswith(" ") else prefix,
                                   add_special_tokens=False)["input_ids"])
    return [int(t) for t in ids]


def _say(model: Any, tok: Any, text: str, *, prefix: str = "", new: int) -> str:
    import torch

    ids = torch.tensor([_turn_ids(tok, text, prefix)], device=model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return str(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)).strip()


def tell(model: Any, tok: Any, session: Session, memory_dir: Path, *, chat_tokens: int = 6000,
         reply_tokens: int = 12) -> dict[str, Any]:
    """The first half: memory reset, the fact, other turns until ``chat_tokens`` are in memory, memory saved."""
    mem = model.memory
    mem.reset()
    _say(model, tok, session.fact, new=reply_tokens)
    fact_span = (0, int(mem.manager.span_end()))
    told = 0
    for turn in session.turns:
        if told >= chat_tokens:
            break
        _say(model, tok, turn, new=reply_tokens)
        told = int(mem.manager.num_tokens()) - fact_span[1]
    mem.save(memory_dir)
    return {"fact_span": list(fact_span), "chat_tokens": told, "memory_tokens": int(mem.manager.num_tokens())}


def score(answer: str, value: str) -> bool:
    """The value appears in the answer (case, spaces and punctuation ignored)."""
    def norm(s: str) -> str:
        return re.sub(r"[^0-9a-z]", "", s.lower())

    return norm(value) in norm(answer)


def ask(model: Any, tok: Any, session: Session, memory_dir: Path, fact_span: tuple[int, int], *,
        answer_tokens: int = 10) -> dict[str, Any]:
    """The second half (in a process that did not write the memory): load, ask, score, say what was read."""
    mem = model.memory
    mem.load(memory_dir)
    t0 = time.perf_counter()
    text = _say(model, tok, session.question, prefix=session.prefix, new=answer_tokens)
    seconds = time.perf_counter() - t0
    trace = mem.trace()
    lo, hi = fact_span
    read = [t for t in trace if int(t["span"][0]) < hi and int(t["span"][1]) > lo]
    return {"answer": f"{session.prefix} {text}", "correct": score(text, session.value), "seconds": round(seconds, 2),
            "chunks_read": len(trace), "fact_read": bool(read),
            "selection": mem.manager.selection()}


# ---------------------------------------------------------------------------------------------- command
def add_arguments(p: argparse.ArgumentParser) -> None:
    from memkit.evaluation.common import add_common_arguments

    add_common_arguments(p)
    p.add_argument("--n", type=int, default=20, metavar="N", help="sessions (default: 20)")
    p.add_argument("--chat-tokens", type=int, default=6000, metavar="N",
                   help="tokens of other turns after the fact (default: 6000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sessions (default: 0)")
    p.add_argument("--out", default="memkit-chat.json", metavar="FILE", help="JSON result (default: memkit-chat.json)")
    p.add_argument("--answer", default=None, help=argparse.SUPPRESS)  # the second half, in a new process


def _second_half(args: argparse.Namespace) -> int:
    """``--answer JOB.json``: load the model, answer the job's session from its saved memory, write the record."""
    import memkit
    from memkit.evaluation.common import load_config_arg, load_for_args, set_threads

    job = json.loads(Path(args.answer).read_text())
    set_threads(args.threads)
    model, tok = load_for_args(args)
    wrapped = memkit.wrap(model, load_config_arg(args.config), tokenizer=tok, progress=False)
    session = Session(**job["session"])
    rec = ask(wrapped, tok, session, Path(job["memory"]), tuple(job["fact_span"]))  # type: ignore[arg-type]
    Path(job["result"]).write_text(json.dumps(rec))
    return 0


def run_sample(wrapped: Any, tok: Any, session: Session, *, chat_tokens: int = 6000, model: str | None = None,
               config: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """One session end to end: the first half here (``wrapped``), the question in a new Python process that loads
    ``model`` (None: the bundled SmolLM2) wrapped with ``config`` (None: the defaults)."""
    with tempfile.TemporaryDirectory(prefix="memkit-chat-") as d:
        t0 = time.perf_counter()
        told = tell(wrapped, tok, session, Path(d) / "memory", chat_tokens=chat_tokens)
        job = {"session": asdict(session), "memory": str(Path(d) / "memory"), "fact_span": told["fact_span"],
               "result": str(Path(d) / "answer.json")}
        (Path(d) / "job.json").write_text(json.dumps(job))
        cmd = [sys.executable, "-m", "memkit.cli", "eval", "chat", "--answer", str(Path(d) / "job.json")]
        for flag, value in (("model", model), ("config", config), ("threads", threads)):
            if value is not None:
                cmd += [f"--{flag}", str(value)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            from memkit.errors import MemkitError

            raise MemkitError(f"the question's process failed ({proc.returncode}): {proc.stderr[-2000:]}")
        rec = json.loads((Path(d) / "answer.json").read_text())
    return {"index": session.index, "kind": session.kind, "value": session.value, "question": session.question,
            **told, **rec, "sample_seconds": round(time.perf_counter() - t0, 1)}


def run(args: argparse.Namespace) -> int:
    if args.answer:
        return _second_half(args)
    from memkit.errors import InvalidInputError
    from memkit.evaluation.common import load_config_arg, load_for_args, set_threads, write_json

    if args.n < 1 or args.chat_tokens < 1:
        raise InvalidInputError("--n and --chat-tokens must be >= 1")
    config = load_config_arg(args.config)
    set_threads(args.threads)
    import memkit

    model, tok = load_for_args(args)
    wrapped = memkit.wrap(model, config, tokenizer=tok, progress=False)
    results = []
    for s in build_sessions(args.n, seed=args.seed):
        rec = run_sample(wrapped, tok, s, chat_tokens=args.chat_tokens, model=args.model, config=args.config,
                         threads=args.threads)
        results.append(rec)
        print(f"[chat] {'ok  ' if rec['correct'] else 'MISS'} {s.index} {s.kind} {s.value!r} -> {rec['answer']!r} "
              f"fact_read={rec['fact_read']} chunks={rec['chunks_read']} {rec['selection'].get('reason', '')}", flush=True)
    right = sum(r["correct"] for r in results)
    print(f"\nchat: {right}/{len(results)} answered")
    write_json({"command": "eval chat", "config": config.to_dict(), "results": results,
                "correct": right, "n": len(results)}, args.out)
    return 0
