"""Benchmark every MemoryBank backend on real vectors; same as ``memkit bench backends``.

    python benchmarks/backends.py --quick        # 10k MiniLM vectors, five backends, about a minute
    python benchmarks/backends.py                # 10k / 100k / 1M, both datasets, all backends

Writes benchmarks/results/backends.json, backends.md and backends_*.png. See
:mod:`memkit.bench.backends` for what is measured and how.
"""

import sys

from memkit.bench.backends import main

if __name__ == "__main__":
    sys.exit(main())
