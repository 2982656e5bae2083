"""The ``memkit`` command line: ``memkit demo | train | bench | eval | plan``.

Each subcommand lives in its own module and registers its options through an
``add_arguments(parser)`` function and runs through ``run(args) -> int``; this file only
dispatches. Bad input exits non-zero with a one-line reason (a :class:`MemkitError` message).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from memkit.errors import MemkitError

# (command, subcommand or None) -> (module, one-line help)
COMMANDS: dict[tuple[str, str | None], tuple[str, str]] = {
    ("demo", None): ("memkit.commands.demo", "wrap SmolLM2, read an 80k-token haystack through memory, find the passkey"),
    ("train", None): ("memkit.commands.train", "train memkit's own parameters (LongMem gates, memory read, SideNet; "
                      "MemLong LoRA) on long texts for N minutes and save the adapter"),
    ("plan", None): ("memkit.planner", "print the memory budget of a model + context length + memkit config"),
    ("bench", "backends"): ("memkit.bench.backends", "MemoryBank backends on real vectors: build, QPS, recall, overhead"),
    ("bench", "kv"): ("memkit.bench.kv", "tiered K/V store: get latency and hit rate vs budget and dtype"),
    ("bench", "context"): ("memkit.bench.context", "tokens/s and peak memory vs context length"),
    ("bench", "train"): ("memkit.bench.train", "LongMem after memkit train: held-out loss memory on/off, window-only, "
                         "MemLong, in-context learning, passkey, training curve"),
    ("bench", "all"): ("memkit.bench.all", "the whole benchmark matrix, writing benchmarks/REPORT.md"),
    ("eval", "ppl"): ("memkit.evaluation.ppl", "sliding-window perplexity with and without memory"),
    ("eval", "passkey"): ("memkit.evaluation.passkey", "passkey retrieval accuracy over lengths and depths"),
    ("eval", "chat"): ("memkit.evaluation.chat", "a fact told once in a chat, ~6k tokens of other turns, a save, a new "
                       "process, the question: how often it is answered"),
    ("eval", "battery"): ("memkit.evaluation.battery", "every task memkit's defaults must hold (chat, inserted facts, "
                          "passkeys, RULER, perplexity, speed), journalled and resumable; --quick before a stop"),
    ("eval", "qa"): ("memkit.evaluation.qa", "questions about long real documents: plain inside its positions vs "
                     "wrapped beyond"),
    ("eval", "styles"): ("memkit.evaluation.styles", "window-only vs MemLong vs LongMem (untrained, trained): "
                         "perplexity and passkey on the same text, as a table and a plot"),
    ("eval", "ruler"): ("memkit.evaluation.ruler", "RULER tasks built by lm-evaluation-harness: score per task x length "
                        "x mode, and where each answer was (window, retrieved chunk, missed)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memkit", description="Long-term memory for Hugging Face decoders.")
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, Any] = {}  # command -> its subparsers action
    for (cmd, subcmd), (module, help_text) in COMMANDS.items():
        if subcmd is None:
            p = sub.add_parser(cmd, help=help_text, description=help_text)
        else:
            if cmd not in groups:
                g = sub.add_parser(cmd, help=f"{cmd} subcommands")
                groups[cmd] = g.add_subparsers(dest="subcommand", required=True)
            p = groups[cmd].add_parser(subcmd, help=help_text, description=help_text)
        p.set_defaults(memkit_module=module)
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue  # not built yet or optional deps missing: the command reports it when run
        add = getattr(mod, "add_arguments", None)
        if add is not None:
            add(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    torch = sys.modules.get("torch")
    grad_before = torch.is_grad_enabled() if torch is not None else True
    try:
        mod = importlib.import_module(args.memkit_module)
        return int(mod.run(args) or 0)
    except MemkitError as exc:
        print(f"memkit: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"memkit: error: {exc}; install the extras with: pip install 'memkit[all]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:  # commands run inference with autograd off; a caller in the same process gets its grad mode back
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_grad_enabled(grad_before)


if __name__ == "__main__":
    sys.exit(main())
