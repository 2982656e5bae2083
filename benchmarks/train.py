"""Training evidence for both memkit styles on SmolLM2 + Shakespeare (LongMem: Wang et al. 2023; MemLong: Liu et
al. 2024). Thin runner around :mod:`memkit.bench.train`; writes benchmarks/results/train.json and train.md.

    .venv/bin/python benchmarks/train.py [--steps 24] [--segment 256]
"""

from __future__ import annotations

import sys

from memkit.bench.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
