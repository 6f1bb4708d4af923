"""Command line of jobs/distill.py: flags + YAML -> one validated Config -> the pipeline."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gradmm_ray.config import STAGES, build_config, load_yaml, parse_override
from gradmm_ray.entry import (
    EXIT_FAILED,
    EXIT_STOPPED,
    EXIT_USER_ERROR,
    add_set_argument,
    fail,
    make_parser,
)
from gradmm_ray.env import set_defaults
from gradmm_ray.errors import UserError

DESCRIPTION = """\
Distil private labelled text into a small set of synthetic examples (GRADMM).

Stage 1 (targets) computes each real example's clipped last-layer gradient and releases one
differentially private gradient sum per class (noise from the OS CSPRNG; no counts published;
clip norm from public text by default); stage 2 (solve) runs independent ADMM solves that turn
synthetic token embeddings into text whose gradient matches those targets; stage 3 (select)
scores and filters the candidates and keeps, per class, the rows whose gradients together match
the sum of all classes' targets, into OUTPUT/synthetic.parquet.

With no arguments it runs the embedded demo: local Ray, CPU, the bundled movie reviews and
SmolLM2-135M-Instruct (converted offline into ~/.cache/gradmm_ray; ~3 min on 2 cores). --config
tiny is the test suite's 2-layer model. On a cluster (give --output: the job's working directory is temporary):
  ray job submit --working-dir . -- python jobs/distill.py --config my.yaml --output s3://bucket/run
"""

EPILOG = """\
examples:
  python jobs/distill.py                                          # the demo
  python jobs/distill.py --model microsoft/phi-1_5 --data stanfordnlp/sst2 \\
      --set data.text_column=sentence --set data.label_names=[negative,positive] \\
      --set privacy.epsilon=1 --set privacy.sample_rate=0.01 --output s3://bucket/run1
  python jobs/distill.py --config paper_sst2 --stages targets      # a shipped preset
  python jobs/distill.py --set admm.rho=[0.1,1,5] --set solve.candidates_per_class=100

Re-running the same command on the same --output resumes: finished stages and solved examples
are kept. Bad input stops the job with one line naming the problem, before any cluster work.
"""

PROG = "distill.py"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = make_parser(PROG, DESCRIPTION, EPILOG)
    p.add_argument(
        "--config",
        help="YAML file with any of the sections data, model, privacy, targets, admm, solve, "
        "select, audit, execution (and output, seed, stages); or a preset's name (demo, "
        "paper_sst2: gradmm_ray/presets/)",
    )
    p.add_argument(
        "--data",
        help="real data: 'sample', a .jsonl/.csv/.parquet file or folder (local, s3://, gs://), a save_to_disk folder, or a hub dataset id (sets data.source)",
    )
    p.add_argument(
        "--model",
        help="'smollm2-135m' (the default), 'tiny', a hub id (e.g. microsoft/phi-1_5), a local folder or an s3:// / gs:// folder (sets model.name)",
    )
    p.add_argument(
        "--output", help="output directory, local or s3:// / gs:// (default outputs/demo)"
    )
    p.add_argument("--seed", type=int, help="seed for sampling, noise and every synthetic example")
    p.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    add_set_argument(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an output directory that holds a different run: deletes only the files a "
        "run writes, never others (a folder of foreign files is refused)",
    )
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace):
    layers = []
    if args.config:
        from gradmm_ray.presets import resolve_config_path

        layers.append(load_yaml(resolve_config_path(args.config)))
    flags: dict = {}
    if args.data is not None:
        flags.setdefault("data", {})["source"] = args.data
    if args.model is not None:
        flags.setdefault("model", {})["name"] = args.model
    if args.output is not None:
        flags["output"] = args.output
    if args.seed is not None:
        flags["seed"] = args.seed
    if args.stages is not None:
        flags["stages"] = [s.strip() for s in args.stages.split(",") if s.strip()]
    layers.append(flags)
    layers += [parse_override(o) for o in args.overrides]
    return build_config(*layers)


def main(argv: Sequence[str] | None = None) -> int:
    set_defaults()
    args = parse_args(argv)
    from gradmm_ray.distill import pipeline
    from gradmm_ray.distill.report import format_summary

    try:
        cfg = config_from_args(args)
        prep = pipeline.prepare(cfg, overwrite=args.overwrite)
    except UserError as e:
        return fail(PROG, e, EXIT_USER_ERROR)
    from gradmm_ray.distributed.ray_env import RayStartFailed, StageFailed

    # Exit 1, not 2 (bad input): the input passed every check, but Ray could not start or a
    # stage could not finish; the line says whether re-running the same command can help.
    try:
        summary = pipeline.run(prep)
    except (RayStartFailed, StageFailed) as e:
        return fail(PROG, e, EXIT_FAILED)
    except pipeline.Stopped as e:  # not an error: one plain line
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except UserError as e:  # e.g. another run took the output's lock after prepare
        return fail(PROG, e, EXIT_USER_ERROR)
    print(format_summary(summary))
    return 0
