"""Command line of jobs/finetune.py and ``gradmm-finetune``: flags + YAML (+ the generation run's
manifest.json) -> one validated FinetuneConfig -> prepare -> Ray Train -> report. Built as
``gradmm_ray/distill/cli.py``; torch, Ray and the training stack load only after parsing, so
``--help`` and bad flags answer at once."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from gradmm_ray.config import load_yaml, parse_override
from gradmm_ray.entry import (
    EXIT_FAILED,
    EXIT_USER_ERROR,
    add_set_argument,
    fail,
    make_parser,
)
from gradmm_ray.env import set_defaults
from gradmm_ray.errors import ConfigError, UserError
from gradmm_ray.finetune.config import BASELINES, FinetuneConfig, build_finetune_config
from gradmm_ray.presets import resolve_config_path

PROG = "finetune.py"

DESCRIPTION = """\
Fine-tune a causal LM on a training set (GRADMM's synthetic.parquet, or any Parquet with
prompt/completion or text/label columns) and evaluate it on real data, against baselines of the
same size, on Ray Train (TorchTrainer; the model wrapped by Accelerate or DeepSpeed ZeRO-2/3).

Protocol (defaults = the paper's, for Phi-1.5): 200 steps, batch 16, AdamW with a linear schedule,
learning rate from the grid 7e-6,1e-5,1.5e-5, evaluation every 50 steps; loss = cross-entropy over
the label options' length-normalised completion log-likelihoods (or --loss sft). Per seed, the
learning rate and checkpoint with the best DEV accuracy are chosen; TEST accuracy and loss there
are reported as mean and standard deviation over --seeds.

Splits of --eval-data: TEST is its test split (splits.test_split, default "test"; a plain file is
one split, so TEST is then carved from it); DEV is a seeded slice of data.split; real baselines
draw from the rest, never from DEV or TEST. With manifest.json beside --train (written by
distill.py), its templates, label words and model are the defaults, and the rows it was generated
from are kept out of TEST (and out of DEV when possible).

Baselines (--baselines, comma-separated): zero-shot (no fine-tuning), random, herding, kcenter
(real subsets with the training set's per-class counts; herding and k-center on mean-pooled hidden
states of the pretrained model), full (the whole real pool: the ceiling), same-real (the real rows
the set was generated from; needs the manifest). During every run the normalised last-layer
gradient error against the real pool's gradient is recorded at each evaluation (paper Fig. 2a).

Writes DIR/metrics.json, DIR/history.json (every evaluation), DIR/results.md (a table like the
paper's Table 1) and DIR/accuracy.png, DIR/grad_error.png.
"""

EPILOG = """\
examples:
  python jobs/distill.py --output outputs/demo
  python jobs/finetune.py --train outputs/demo/synthetic.parquet --eval-data sample \\
      --output outputs/demo-ft --baselines zero-shot,random --steps 10 --eval-every 5 \\
      --lrs 1e-5 --seeds 0     # SmolLM2 (the manifest's model) on 2 CPU cores: ~20 s a step
  python jobs/finetune.py --train runs/sst2-phi/synthetic.parquet --model microsoft/phi-1_5 \\
      --eval-data stanfordnlp/sst2 --set data.text_column=sentence \\
      --set data.label_names=[negative,positive] --set splits.test_split=validation \\
      --strategy deepspeed --deepspeed-config zero3 --workers 4 --output runs/sst2-phi-ft
  ray job submit --working-dir . -- python jobs/finetune.py --config my_ft.yaml

config sections (YAML via --config, or --set section.key=value; VALUE is YAML):
  train, output, baselines, model.*, data.* (as distill.py: source, split, text_column,
  label_column, label_names, prompt_template, verbalizers), protocol.{steps, batch_size, lrs,
  eval_every, loss, seeds, weight_decay, max_grad_norm, eval_batch_size}, splits.{test_split,
  dev_size, test_size, seed, grad_error_rows}, workers.{num_workers, gpus_per_worker (auto),
  cpus_per_worker, strategy, deepspeed_config, mixed_precision}.
The DeepSpeed JSON decides the ZeRO stage and buckets; the job sets its batch sizes (micro batch =
batch / workers, no accumulation), gradient clipping and precision (fp32 on CPU) from the protocol.
Bad input stops the job with one line (exit code 2) before Ray starts.
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = make_parser(PROG, DESCRIPTION, EPILOG)
    p.add_argument(
        "--train",
        help="training set: a Parquet file (or folder) with prompt/completion or text/label columns",
    )
    p.add_argument(
        "--model",
        help="'smollm2-135m', 'tiny', a hub id, a local or s3:// / gs:// folder (default: the "
        "manifest's, else smollm2-135m)",
    )
    p.add_argument(
        "--eval-data",
        help="real data as distill's data.source: 'sample', a file/folder, a hub dataset id",
    )
    p.add_argument(
        "--output", help="output directory, local or s3:// / gs:// (default outputs/finetune)"
    )
    p.add_argument(
        "--baselines", help=f"comma-separated subset of {','.join(BASELINES)} (default: none)"
    )
    p.add_argument("--seeds", help="comma-separated training seeds (default 0,1,2)")
    p.add_argument("--lrs", help="comma-separated learning-rate grid (default 7e-6,1e-5,1.5e-5)")
    p.add_argument("--steps", type=int, help="fine-tuning steps (default 200)")
    p.add_argument("--batch-size", type=int, help="global batch size (default 16)")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (default 50)")
    p.add_argument("--loss", help="classification (default) or sft")
    p.add_argument("--strategy", help="accelerate (default) or deepspeed")
    p.add_argument("--deepspeed-config", help="zero2 (default), zero3 or a DeepSpeed JSON file")
    p.add_argument("--workers", type=int, help="Ray Train workers (default 1)")
    p.add_argument(
        "--gpus-per-worker", help="GPUs per worker: auto (default), 0 for CPU, or a number"
    )
    p.add_argument(
        "--config",
        help="YAML file with any of the config sections below (a path, or the name of a YAML "
        "preset shipped in gradmm_ray/presets/)",
    )
    add_set_argument(p)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier DIR/metrics.json")
    return p.parse_args(argv)


def _list(text: str, flag: str, kind: type) -> list:
    items = [x.strip() for x in text.split(",") if x.strip()]
    try:
        values = [kind(x) for x in items]
    except ValueError:
        raise ConfigError(
            f"{flag}: got {text!r}, expected comma-separated {kind.__name__} values"
        ) from None
    if not values:
        raise ConfigError(f"{flag}: got {text!r}, expected at least one value")
    return values


def config_layers(args: argparse.Namespace) -> list[dict]:
    layers = [load_yaml(resolve_config_path(args.config))] if args.config else []
    flags: dict = {}

    def put(section: str | None, key: str, value) -> None:
        (flags.setdefault(section, {}) if section else flags)[key] = value

    if args.train is not None:
        put(None, "train", args.train)
    if args.output is not None:
        put(None, "output", args.output)
    if args.model is not None:
        put("model", "name", args.model)
    if args.eval_data is not None:
        put("data", "source", args.eval_data)
    if args.baselines is not None:
        put(None, "baselines", [b.strip() for b in args.baselines.split(",") if b.strip()])
    if args.seeds is not None:
        put("protocol", "seeds", _list(args.seeds, "--seeds", int))
    if args.lrs is not None:
        put("protocol", "lrs", _list(args.lrs, "--lrs", float))
    for flag, key in (
        ("steps", "steps"),
        ("batch_size", "batch_size"),
        ("eval_every", "eval_every"),
        ("loss", "loss"),
    ):
        if getattr(args, flag) is not None:
            put("protocol", key, getattr(args, flag))
    if args.strategy is not None:
        put("workers", "strategy", args.strategy)
    if args.deepspeed_config is not None:
        put("workers", "deepspeed_config", args.deepspeed_config)
    if args.workers is not None:
        put("workers", "num_workers", args.workers)
    if args.gpus_per_worker is not None:
        value = args.gpus_per_worker
        put(
            "workers",
            "gpus_per_worker",
            value if value == "auto" else _list(value, "--gpus-per-worker", float)[0],
        )
    layers.append(flags)
    layers += [parse_override(o) for o in args.overrides]
    return layers


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """Defaults < the generation run's manifest.json < YAML < flags < --set."""
    from gradmm_ray.finetune.job import manifest_defaults, read_manifest

    layers = config_layers(args)
    cfg = build_finetune_config(*layers)
    manifest = read_manifest(cfg.train)
    return build_finetune_config(manifest_defaults(manifest), *layers) if manifest else cfg


def main(argv: Sequence[str] | None = None) -> int:
    set_defaults()
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
        from gradmm_ray.finetune.job import prepare_job

        prep = prepare_job(cfg, overwrite=args.overwrite)
    except UserError as e:
        return fail(PROG, e, EXIT_USER_ERROR)
    # Ray and the training stack load only now: bad input fails in seconds, before them.
    from gradmm_ray.distributed.train import FinetuneFailed
    from gradmm_ray.finetune.job import run_job
    from gradmm_ray.finetune.report import format_finetune_summary

    try:
        summary = run_job(prep)
    except FinetuneFailed as e:
        return fail(PROG, e, EXIT_FAILED)
    print(format_finetune_summary(summary))
    return 0
