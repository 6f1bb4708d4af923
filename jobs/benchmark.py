"""Performance benchmark of GRADMM's last-layer gradient matching against our own references.

`python jobs/benchmark.py --json outputs/benchmark.json [--suite NAME ...] [--quick]`; see
`--help` for the suites and every JSON field. One process (plus one fresh child process per
memory-measured method); CUDA when available, else CPU; all seeds fixed. Ray is imported only by
the `scaling` suite, so the other suites run where Ray is not installed. The harness, the
references and the suites are in `gradmm_ray/bench/`.
"""

from __future__ import annotations

import os

from gradmm_ray.env import set_defaults

# Before transformers is imported anywhere (here or in a child process).
set_defaults(offline=True)
# Progress bars (model loading, run_solve) off; tqdm reads this when it is imported.
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from gradmm_ray.bench import gpu, harness, peers, projection, scale, scaling, stage1, stage2  # noqa: E402

SUITES = {
    "stage1": harness.Suite(stage1.suite, help=stage1.HELP),
    "stage2": harness.Suite(stage2.suite, needs_lm=True, help=stage2.HELP),
    "projection": harness.Suite(projection.suite, needs_lm=True, help=projection.HELP),
    "scaling": harness.Suite(scaling.suite, help=scaling.HELP),
    "gpu": harness.Suite(gpu.suite, help=gpu.HELP),
    "peers": harness.Suite(peers.suite, needs_lm=True, help=peers.HELP),
    "scale": harness.Suite(scale.suite, help=scale.HELP),
}
HELP_ORDER = ("stage1", "stage2", "projection", "peers", "gpu", "scaling", "scale")
# `scale` streams up to 1M generated rows (~15 minutes on 2 cores): run it by name.
DEFAULT_SUITES = [name for name in SUITES if name != "scale"]
HELP = (
    "suites (default: all but scale; results are merged into an existing --json file by suite):\n\n"
    + "\n".join(SUITES[name].help for name in HELP_ORDER)
    + "\n"
    + harness.COMMON_HELP
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="GRADMM performance benchmark: this implementation against our own "
        "reference implementations, on a random Llama-style LM with a 32000 x 256 head.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", type=Path, required=True, help="results file (merged by suite)")
    parser.add_argument(
        "--suite",
        action="append",
        choices=list(SUITES),
        help="run only this suite (repeatable); default: all but scale",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes (a smoke test, well under 2 minutes)"
    )
    args = parser.parse_args(argv)
    names = list(dict.fromkeys(args.suite or DEFAULT_SUITES))
    harness.run(SUITES, names, quick=args.quick, json_path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
