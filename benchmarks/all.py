"""The whole benchmark matrix and ``benchmarks/REPORT.md``; same as ``memkit bench all`` (``make bench``).

    python benchmarks/all.py --quick     # < 5 min: short lengths and ranges; results in benchmarks/results/quick
    python benchmarks/all.py             # ~35-45 min on 2 shared cores: context to 80k, quality matrix, backends

See :mod:`memkit.bench.all` for the stages and what each measures.
"""

import sys

from memkit.bench.all import main

if __name__ == "__main__":
    sys.exit(main())
