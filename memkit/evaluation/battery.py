"""``memkit eval battery``: every task memkit's defaults must hold, in one command, journalled and resumable.

A change to retrieval (or to a default) earns its place on the whole battery, run with the defaults and no config
file, not on the one task it was made for. The tasks (``--tasks``; each sample is journalled the moment it
finishes, and ``--resume`` skips what the journal holds, as ``eval ruler`` does):

* ``chat``    — :mod:`memkit.evaluation.chat`: a fact told once, ~6k tokens of other turns, a save, a new process,
  the question (n sessions of several fact kinds and turn kinds);
* ``qa``      — :mod:`memkit.evaluation.qa`'s inserted facts: invented facts in 64k tokens of KJV prose, the document
  read into memory once and saved, each question asked on a fresh load;
* ``passkey`` — :mod:`memkit.evaluation.passkey` in the fillers meadow, ledger, classic, shuffled and kjv, at each
  length and depth;
* ``ruler``   — RULER's six synthetic tasks through lm-evaluation-harness (:mod:`memkit.evaluation.ruler`), with the
  plain model at 4k beside each cell (the committed n = 20 run, ``benchmarks/results/ruler/n20/r4k``);
* ``ppl``     — perplexity on two held-out plays through the forward path, window-only and full attention beside:
  the share of the gap closed;
* ``speed``   — reading speed against window-only and decode ms/token, alternating runs in one process.

``--quick`` is the check before a stop: n = 5 per sampled task at 16k only, and three RULER tasks (one needle,
one multi-key, one aggregate) — under 30 minutes on 2 CPU cores. The full battery takes hours there.

    memkit eval battery --threads 2                        # everything, defaults, journal in benchmarks/results/battery
    memkit eval battery --quick --out /tmp/battery-quick   # the pre-stop check
    memkit eval battery --tasks ruler --resume             # continue after a stop
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from memkit.errors import InvalidInputError

__all__ = ["TASKS", "add_arguments", "run", "summarise"]

TASKS = ("chat", "qa", "passkey", "ruler", "ppl", "speed")
FILLERS = ("meadow", "ledger", "classic", "shuffled", "kjv")
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
RULER_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
QUICK_RULER = ("niah_single_1", "niah_multikey_2", "ruler_vt")
PLAYS = ("romeo_and_juliet", "julius_caesar")  # held out of memkit's training plays (memkit.corpora.HELD_OUT)
RULER_BASELINE = Path("benchmarks/results/ruler/n20/r4k/ruler.json")  # the plain model at 4k, n = 20
GOALS = {"chat": 18 / 20, "qa": 18 / 20, "passkey": 1.0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from memkit.evaluation.common import add_common_arguments

    add_common_arguments(p)
    p.add_argument("--tasks", default=",".join(TASKS), metavar="LIST",
                   help=f"comma-separated tasks (default: all of {','.join(TASKS)})")
    p.add_argument("--quick", action="store_true",
                   help="n = 5 per sampled task at 16k only, three RULER tasks: the check before a stop (< 30 min)")
    p.add_argument("--n", type=int, default=None, metavar="N",
                   help="samples per sampled task (chat, qa, ruler cells; default: 20, --quick: 5)")
    p.add_argument("--lengths", default=None, metavar="LIST",
                   help="passkey and RULER lengths (default: passkeys 16k,32k,80k, RULER 16k,32k; --quick: 16k)")
    p.add_argument("--out", default="benchmarks/results/battery", metavar="DIR",
                   help="folder of the journal (battery.jsonl), the result (battery.json) and the table (battery.md)")
    p.add_argument("--resume", action="store_true", help="continue the journal in --out: finished samples are kept")


class Plan:
    """What one battery run covers: tasks, sample counts and lengths (``--quick`` or the full battery)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from memkit.evaluation.haystack import parse_lengths

        self.tasks = [t.strip() for t in str(args.tasks).split(",") if t.strip()]
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise InvalidInputError(f"--tasks {args.tasks!r}: unknown task(s) {bad}; choose from {list(TASKS)}")
        self.quick = bool(args.quick)
        self.n = args.n if args.n is not None else (5 if self.quick else 20)
        if self.n < 1:
            raise InvalidInputError(f"--n must be >= 1, got {self.n}")
        given = parse_lengths(args.lengths) if args.lengths else None
        self.passkey_lengths = given or ([16384] if self.quick else [16384, 32768, 81920])
        self.ruler_lengths = given or ([16384] if self.quick else [16384, 32768])
        self.ruler_tasks = QUICK_RULER if self.quick else RULER_TASKS
        self.ppl_plays = PLAYS[:1] if self.quick else PLAYS

    def header(self) -> dict[str, Any]:
        return {"quick": self.quick, "n": self.n, "passkey_lengths": self.passkey_lengths,
                "ruler_lengths": self.ruler_lengths, "ruler_tasks": list(self.ruler_tasks), "plays": list(self.ppl_plays)}


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=False, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------- tasks
# Each task yields (index, length, run) for its samples; run() returns the sample's record.
Sample = tuple[int, int, Callable[[], dict[str, Any]]]


def chat_samples(env: Env) -> Iterator[Sample]:
    from memkit.evaluation.chat import build_sessions, run_sample

    for s in build_sessions(env.plan.n):
        def one(s: Any = s) -> dict[str, Any]:
            return run_sample(env.wrapped(), env.tok, s, chat_tokens=6000, model=env.args.model,
                              config=env.args.config, threads=env.args.threads)

        yield s.index, 6000, one


def qa_samples(env: Env) -> Iterator[Sample]:
    from memkit.evaluation.qa import answer_saved
    from memkit.evaluation.qa_set import build_documents

    doc_tokens = 16384 if env.plan.quick else None
    docs = build_documents(env.tok, ("inserted",), doc_tokens=doc_tokens, min_distance=8192)
    saved: dict[str, Path] = {}
    for doc in docs:
        for i, q in enumerate(doc.questions[:env.plan.n]):
            def one(doc: Any = doc, q: Any = q) -> dict[str, Any]:
                model = env.wrapped()
                if doc.name not in saved:  # read the document once, on the first question the journal lacks
                    model.memory.reset()
                    t0 = time.perf_counter()
                    model.memory.ingest(doc.ids)
                    env.notes[f"qa_read_seconds|{doc.name}"] = round(time.perf_counter() - t0, 1)
                    saved[doc.name] = env.scratch / f"qa-{doc.name}"
                    model.memory.save(saved[doc.name])
                return answer_saved(model, env.tok, doc, q, saved[doc.name])

            yield i, len(doc.ids), one


def passkey_samples(env: Env) -> Iterator[Sample]:
    from memkit.evaluation.haystack import build_haystack
    from memkit.evaluation.passkey import answer

    i = 0
    for n in env.plan.passkey_lengths:
        for f, filler in enumerate(FILLERS):
            depths = [DEPTHS[(f + n // 16384) % len(DEPTHS)]] if env.plan.quick else DEPTHS
            for d in depths:
                def one(n: int = n, d: float = d, filler: str = filler) -> dict[str, Any]:
                    hay = build_haystack(env.tok, n, d, filler=filler, prompt="auto")
                    rec = answer(env.wrapped(), env.tok, hay)
                    rec.pop("bytes", None)
                    return {**rec, "filler": filler, "selection": env.wrapped().memory.manager.selection()}

                yield i, n, one
                i += 1


def ruler_samples(env: Env, name: str) -> Iterator[Sample]:
    from memkit.evaluation import ruler as R
    from memkit.evaluation.lm_eval_model import MemkitLM

    folder = R.tokenizer_folder(env.args, env.tok)
    for n in env.plan.ruler_lengths:
        samples = R.load_samples(name, n, env.tok, folder)
        task = R.make_task(samples, folder)
        for req in R.requests_for(task, env.plan.n):
            def one(req: Any = req, task: Any = task) -> dict[str, Any]:
                lm = MemkitLM(env.wrapped(), tokenizer=env.tok, mode="memkit")
                rec = R.evaluate_sample(lm, task, req)
                return {**rec, "selection": lm.model.memory.manager.selection()}

            yield int(req.doc.get("index", req.doc_id)), n, one


def ppl_samples(env: Env) -> Iterator[Sample]:
    from memkit.corpora import play_ids
    from memkit.evaluation.ppl import full_attention_token_losses, token_losses

    lo, hi = 4096, 8192
    for i, play in enumerate(env.plan.ppl_plays):
        def one(play: str = play) -> dict[str, Any]:
            import torch

            ids = play_ids(env.tok, [play], hi)[play][None]  # (1, hi)
            rec: dict[str, Any] = {"play": play, "range": [lo, hi]}
            for mode in ("window", "memkit", "full"):
                t0 = time.perf_counter()
                if mode == "full":
                    losses = full_attention_token_losses(env.model, ids, block=env.config.block_size, progress=False)
                else:
                    losses = token_losses(env.wrapped() if mode == "memkit" else env.window(), ids, progress=False)
                rec[mode] = round(float(torch.exp(torch.nanmean(losses[lo:hi]))), 4)
                rec[f"{mode}_seconds"] = round(time.perf_counter() - t0, 1)
            rec["gap_closed"] = round((rec["window"] - rec["memkit"]) / (rec["window"] - rec["full"]), 4)
            return rec

        yield i, hi, one


def speed_samples(env: Env) -> Iterator[Sample]:
    """Reading 8k tokens of a held-out play (memkit vs window-only, alternating, the best of three each) and
    decode ms/token after them."""
    from memkit.corpora import play_ids

    n = 8192

    def one() -> dict[str, Any]:
        import torch

        ids = play_ids(env.tok, [PLAYS[0]], n)[PLAYS[0]][None]
        best: dict[str, float] = {}
        for _ in range(3):
            for mode in ("memkit", "window"):  # one wrap at a time: each set-up is wrapped when its turn comes
                model = env.wrapped() if mode == "memkit" else env.window()
                model.memory.reset()
                t0 = time.perf_counter()
                with torch.no_grad():
                    model.memory.ingest(ids)
                best[mode] = min(best.get(mode, float("inf")), time.perf_counter() - t0)
        model = env.wrapped()
        model.memory.reset()
        with torch.no_grad():
            model.memory.ingest(ids[:, :-64])
            t0 = time.perf_counter()
            out = model.generate(ids[:, -64:], max_new_tokens=33, min_new_tokens=33, do_sample=False,
                                 pad_token_id=env.tok.eos_token_id)
            total = time.perf_counter() - t0
        steps = int(out.shape[1] - 64)
        return {"tokens": n, "memkit_tokens_per_s": round(n / best["memkit"], 1),
                "window_tokens_per_s": round(n / best["window"], 1), "ratio": round(best["window"] / best["memkit"], 3),
                "generate_seconds": round(total, 2), "new_tokens": steps, "ms_per_token": round(1000 * total / steps, 1)}

    yield 0, n, one


class Env:
    """The model, tokenizer and wrapped set-ups one battery run shares across tasks (made on first use)."""

    def __init__(self, args: argparse.Namespace, plan: Plan, config: Any, scratch: Path) -> None:
        self.args, self.plan, self.config, self.scratch = args, plan, config, scratch
        self.notes: dict[str, Any] = {}
        self._cache: dict[str, Any] = {}
        from memkit.evaluation.common import load_for_args

        self.model, self.tok = load_for_args(args)

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def wrapped(self) -> Any:
        import memkit

        if "window" in self._cache:  # one wrap at a time on the model
            memkit.unwrap(self._cache.pop("window"))
        return self.cached("memkit", lambda: memkit.wrap(self.model, self.config, tokenizer=self.tok, progress=False))

    def window(self) -> Any:
        import memkit

        return self.cached("window", lambda: memkit.wrap(memkit.unwrap(self._cache.pop("memkit")) if "memkit" in
                                                         self._cache else self.model,
                                                         self.config.replace(top_k=0), tokenizer=self.tok,
                                                         progress=False))


# ---------------------------------------------------------------------------------------------- the table
def _ruler_baseline() -> dict[str, float]:
    try:
        summary = json.loads(RULER_BASELINE.read_text())["summary"]
    except (OSError, ValueError, KeyError):
        return {}
    return {k.split("|")[0]: v["score"] for k, v in summary.items() if k.endswith("|full")}


def summarise(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """One row per task (and length): the score, n, the goal or baseline beside it, and where answers were."""
    from memkit.evaluation.common import format_table
    from memkit.evaluation.ruler_report import fmt_len

    rows: list[dict[str, Any]] = []
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["task"], int(r["length"])), []).append(r)
    base = _ruler_baseline()
    for (task, length), recs in sorted(groups.items()):
        row: dict[str, Any] = {"task": task, "length": fmt_len(length), "n": len(recs)}
        if task in ("chat", "qa", "passkey"):
            row["score"] = f"{sum(bool(r['correct']) for r in recs)}/{len(recs)}"
            seen = sum(bool(r.get("fact_read", r.get("fact_retrieved", r.get("needle_retrieved")))) for r in recs)
            row["answer read"] = f"{seen}/{len(recs)}"
            row["beside"] = f"goal >= {GOALS[task]:.0%}"
        elif task.startswith(("niah", "ruler_")):
            row["score"] = f"{sum(r['score'] for r in recs) / len(recs):.2f}"
            row["beside"] = f"plain 4k {base[task]:.2f}" if task in base else "plain 4k: not measured"
        elif task == "ppl":
            row["score"] = ", ".join(f"{r['play']} {r['gap_closed']:.0%} of the gap" for r in recs)
            row["beside"] = ", ".join(f"window {r['window']:.2f} / memkit {r['memkit']:.2f} / full {r['full']:.2f}"
                                      for r in recs)
        elif task == "speed":
            r = recs[0]
            row["score"] = f"{r['ratio']:.2f}x window-only, decode {r['ms_per_token']} ms/token"
            row["beside"] = f"{r['memkit_tokens_per_s']} vs {r['window_tokens_per_s']} tok/s"
        chunks = [r["selection"].get("chosen") for r in recs if isinstance(r.get("selection"), dict)
                  and r["selection"].get("chosen") is not None]
        row["chunks read (median)"] = sorted(chunks)[len(chunks) // 2] if chunks else "—"
        rows.append(row)
    headers = ["task", "length", "n", "score", "beside", "answer read", "chunks read (median)"]
    table = format_table(headers, [[row.get(h, "—") for h in headers] for row in rows])
    return rows, table


# ---------------------------------------------------------------------------------------------- command
def run(args: argparse.Namespace) -> int:
    from memkit.evaluation.common import load_config_arg, machine, set_threads, write_json
    from memkit.evaluation.journal import SampleJournal

    plan = Plan(args)
    config = load_config_arg(args.config)
    set_threads(args.threads)
    out = Path(args.out)
    header = {"command": "eval battery", "model": args.model or "bundled SmolLM2-135M-Instruct",
              "config": config.to_dict(), **plan.header()}
    journal = SampleJournal(out / "battery.jsonl", header, resume=args.resume)
    commit = _commit()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memkit-battery-") as scratch:
        env = Env(args, plan, config, Path(scratch))
        sources: list[tuple[str, Iterator[Sample]]] = []
        for task in plan.tasks:
            if task == "ruler":
                sources += [(name, ruler_samples(env, name)) for name in plan.ruler_tasks]
            else:
                sources.append((task, globals()[f"{task}_samples"](env)))
        for task, samples in sources:
            for index, length, one in samples:
                if journal.get((task, length, "memkit", index)) is not None:
                    continue
                t0 = time.perf_counter()
                rec = one()
                rec.update(task=task, length=length, mode="memkit", index=index, commit=commit,
                           sample_seconds=round(time.perf_counter() - t0, 1))
                journal.append(rec)
                flag = "" if "correct" not in rec else ("ok   " if rec["correct"] else "MISS ")
                print(f"[battery] {task} {length} #{index} {flag}{rec.get('score', '')} "
                      f"({rec['sample_seconds']}s)", flush=True)
    records = [r for r in journal.done.values() if r["task"] in _task_names(plan)]
    rows, table = summarise(records)
    print()
    print(table)
    commits = sorted({str(r.get("commit")) for r in records})
    date = time.strftime("%Y-%m-%d")
    md = f"{heading(plan, args.config, date, commits, _cpu())}\n\n{table}\n"
    (out / "battery.md").write_text(md)
    write_json({"date": date, "machine": machine(), "commits": commits, "header": header, "rows": rows,
                "notes": env.notes, "seconds_this_run": round(time.perf_counter() - t_start, 1),
                "records": records}, str(out / "battery.json"))
    print(f"\n{out / 'battery.md'}, {out / 'battery.json'}")
    return 0


def heading(plan: Plan, config: str | None, date: str, commits: list[str], cpu: str) -> str:
    """The first lines of battery.md: the command (with its config file, if one was given), the date, the commits."""
    command = f"memkit eval battery {'--quick ' if plan.quick else ''}--tasks {','.join(plan.tasks)}"
    given = f"{command} --config {config}` with that config, not the defaults" if config else \
        f"{command}` with the defaults (no config file)"
    return f"# memkit task battery ({'quick' if plan.quick else 'full'})\n\n`{given} — {date}, memkit at " \
           f"{', '.join(commits)}, {cpu}"


def _cpu() -> str:
    """The CPU model and its core count, as the README's tables name the machine."""
    import os

    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        name = "this machine"
    return f"{name}, {os.cpu_count()} cores"


def _task_names(plan: Plan) -> set[str]:
    names = set(plan.tasks) - {"ruler"}
    return names | (set(plan.ruler_tasks) if "ruler" in plan.tasks else set())
