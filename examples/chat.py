"""A chat whose memory outlives the process: tell a fact, chat ~6k tokens about other things, save the memory, then
ask for the fact in a new process that loads the memory.

Each turn sends only the new message (the model's 8k window never holds the conversation): memkit stores what every
call read (``flush_window``, the default), so the fact is a chunk in memory, found again by the question itself.

    python examples/chat.py                 # both halves; the second runs in a fresh Python process
    python examples/chat.py --threads 1     # on a busy machine
    python examples/chat.py --top-k 12      # memkit's default number of chunks (it misses: benchmarks/RESULTS.md)

Measured here (2 CPU cores, SmolLM2-135M-Instruct): benchmarks/RESULTS.md, "A chat remembered across two processes".
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import memkit
from memkit.corpora import play_text
from memkit.models import load_smollm2

FACT = "Please remember this: my locker code is {code}. I will ask you for it later."
QUESTION = "What is my locker code?"
ANSWER_PREFIX = "Your locker code is"


def turn_ids(tok: object, text: str, prefix: str = "") -> torch.Tensor:
    """One user turn in the model's chat template, ending where the assistant speaks (plus an optional prefix)."""
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)  # type: ignore[attr-defined]
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    if prefix:
        ids = ids + tok(prefix, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    return torch.tensor([ids])


def say(model: memkit.integrations.wrap.MemkitModel, tok: object, text: str, prefix: str = "",
        new: int = 24) -> str:
    ids = turn_ids(tok, text, prefix)
    out = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=tok.eos_token_id)  # type: ignore[attr-defined]
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()  # type: ignore[attr-defined]


def first_half(memory_dir: Path, code: str, chat_tokens: int, top_k: int) -> None:
    hf_model, tok = load_smollm2()
    model = memkit.wrap(hf_model, tokenizer=tok, progress=False, top_k=top_k)
    print("user:", FACT.format(code=code))
    print("assistant:", say(model, tok, FACT.format(code=code)))
    scene = play_text("tempest")
    told, start = 0, 5000
    while told < chat_tokens:  # long messages about something else: ~1k tokens each
        passage = scene[start:start + 3600]
        start += 3600
        reply = say(model, tok, "Here is a passage I am reading. Tell me in one sentence what happens.\n\n" + passage)
        told = model.memory.manager.num_tokens()
        print(f"user: <a 1k-token passage of The Tempest>  ->  assistant: {reply[:70]!r}  [{told:,} tokens in memory]")
    model.memory.save(memory_dir)
    print(f"memory saved to {memory_dir}: {model.memory.num_chunks()} chunks, {told:,} tokens")


def second_half(memory_dir: Path, top_k: int) -> str:
    hf_model, tok = load_smollm2()
    model = memkit.wrap(hf_model, tokenizer=tok, progress=False, top_k=top_k)
    model.memory.load(memory_dir)  # refused if another model or set-up wrote it
    print(f"new process: memory loaded ({model.memory.num_chunks()} chunks)")
    answer = say(model, tok, QUESTION, prefix=ANSWER_PREFIX, new=8)
    print("user:", QUESTION)
    print("assistant:", ANSWER_PREFIX, answer)
    hit = [t for t in model.memory.trace() if "locker" in (t["text"] or "")]
    print("retrieved the fact's chunk:", bool(hit), [tuple(t["span"]) for t in hit])
    return answer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--code", default="4729", help="the fact to remember (default 4729)")
    p.add_argument("--chat-tokens", type=int, default=6000, help="tokens of other chat after the fact (default 6000)")
    p.add_argument("--top-k", type=int, default=1,
                   help="chunks each turn reads from memory (default 1: with SmolLM2-135M the fact's chunk is found "
                        "at any top_k, but the model answers from it only when it is alone; see benchmarks/RESULTS.md)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--resume", default=None, help=argparse.SUPPRESS)  # the second half, in a new process
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resume:
        answer = second_half(Path(args.resume), args.top_k)
        return 0 if args.code in answer else 1
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        first_half(Path(d) / "memory", args.code, args.chat_tokens, args.top_k)
        cmd = [sys.executable, __file__, "--resume", str(Path(d) / "memory"), "--code", args.code,
               "--top-k", str(args.top_k)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        rc = subprocess.run(cmd, check=False).returncode
        print(f"{'RECALLED' if rc == 0 else 'MISSED'} the fact told ~{args.chat_tokens:,} tokens earlier "
              f"({time.perf_counter() - t0:.0f}s)")
        return rc


if __name__ == "__main__":
    sys.exit(main())
