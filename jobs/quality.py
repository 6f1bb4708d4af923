"""Entry point of the quality experiment: `python jobs/quality.py --json outputs/benchmark.json`.
The experiment is gradmm_ray/bench/quality.py; see `--help`."""

import sys

from gradmm_ray.bench.quality import main

if __name__ == "__main__":
    sys.exit(main())
