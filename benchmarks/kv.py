"""Tiered K/V store benchmark: get latency, hit rate and bytes moved vs device budget and storage dtype.

Thin runner for :mod:`memkit.bench.kv` (same as ``memkit bench kv``):

    python benchmarks/kv.py            # ~1-2 min on 2 cores; writes benchmarks/results/kv.{json,md,png}
    python benchmarks/kv.py --quick    # < 20 s
"""

from __future__ import annotations

import argparse
import sys

from memkit.bench import kv

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="benchmarks/kv.py", description=kv.__doc__.splitlines()[0])
    kv.add_arguments(parser)
    sys.exit(kv.run(parser.parse_args()))
