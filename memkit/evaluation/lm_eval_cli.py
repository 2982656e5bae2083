"""``memkit-lm-eval``: lm-evaluation-harness's command line with memkit's ``memkit`` model registered.

lm-eval 0.4.13 finds models only in its own registry (no plugin entry points), so plain ``lm_eval --model memkit``
cannot see memkit; this command is lm-eval's own CLI (every flag, same output) after importing
:mod:`memkit.evaluation.lm_eval_model`, which registers the model. Without lm-eval installed it exits 2 with the
pip command instead of a traceback.

    memkit-lm-eval --model memkit --model_args pretrained=PATH,config=memkit.yaml --tasks lambada_openai
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from memkit.errors import MemkitError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from memkit.evaluation.lm_eval_model import main as run
    except MemkitError as exc:
        print(f"memkit-lm-eval: error: {exc}", file=sys.stderr)
        return 2
    return run(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
