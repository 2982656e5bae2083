"""Throughput and peak memory vs context length; same as ``memkit bench context``.

    python benchmarks/context.py --quick     # 2k..8k, memkit vs window-only vs full attention, 3 repeats
    python benchmarks/context.py             # 4k..80k (full attention only up to the model's 8k positions)

Writes benchmarks/results/context.json, context.md, context_speed.png and context_memory.png. See
:mod:`memkit.bench.context` for what is measured and how.
"""

import sys

from memkit.bench.context import main

if __name__ == "__main__":
    sys.exit(main())
