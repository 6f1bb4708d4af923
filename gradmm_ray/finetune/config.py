"""The finetune application's configuration: typed, frozen sections with the paper's defaults,
built from YAML / flags / --set layers and validated all at once (every problem names its field,
value and the allowed range), and the DeepSpeed JSON (a shipped preset or a file), checked.

The data and model sections are distill's (``gradmm_ray/config.py``); ``core/training.py`` runs
the protocol section. Light to import (no torch): the CLI's --help reads it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from gradmm_ray.config import Config, DataConfig, ModelConfig, build_typed, validate
from gradmm_ray.errors import UserError
from gradmm_ray.presets import DEEPSPEED_PRESETS, deepspeed_config_path

LOSSES = ("classification", "sft")
BASELINES = ("zero-shot", "random", "herding", "kcenter", "full", "same-real")
STRATEGIES = ("accelerate", "deepspeed")
PRECISIONS = ("auto", "no", "bf16", "fp16")
SYNTHETIC = "synthetic"  # the run name of the --train set


class FinetuneError(UserError):
    """A user-facing problem with the fine-tuning inputs (one line naming file, row, value)."""


@dataclass(frozen=True)
class ProtocolConfig:
    """The fine-tuning protocol; the defaults are the paper's (Phi-1.5, Table 1)."""

    steps: int = 200
    batch_size: int = 16  # global batch, split evenly over the workers
    lrs: tuple[float, ...] = (7e-6, 1e-5, 1.5e-5)
    eval_every: int = 50
    loss: str = "classification"  # classification | sft
    seeds: tuple[int, ...] = (0, 1, 2)
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # null: no clipping
    eval_batch_size: int = 32


@dataclass(frozen=True)
class SplitConfig:
    test_split: str | None = "test"  # the source's test split; null: carve TEST from data.split
    dev_size: int = 100  # rows of data.split held out for choosing lr and checkpoint
    test_size: int = 500  # rows carved from data.split when the source has no test split
    seed: int = 0  # the splits are the same for every method and training seed
    grad_error_rows: int = 512  # real pool rows (and at most this many set rows) per gradient


@dataclass(frozen=True)
class WorkersConfig:
    num_workers: int = 1
    gpus_per_worker: float | str = "auto"  # auto: 1 when the cluster has GPUs, else CPU workers
    cpus_per_worker: float = 1.0
    strategy: str = "accelerate"  # accelerate | deepspeed
    deepspeed_config: str = "zero2"  # zero2 | zero3 (gradmm_ray/presets/) | a JSON file
    mixed_precision: str = "auto"  # auto: bf16 on GPUs that support it, else no


@dataclass(frozen=True)
class FinetuneConfig:
    train: str = ""  # Parquet with prompt/completion or text/label columns
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # the real (eval) data and templates
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    splits: SplitConfig = field(default_factory=SplitConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    baselines: tuple[str, ...] = ()
    output: str = "outputs/finetune"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def build_finetune_config(*layers: dict[str, Any]) -> FinetuneConfig:
    """Merge raw layers (later wins) onto the defaults, coerce types, validate everything: the
    same typed builder, coercion and "did you mean" messages as distill.py."""
    return build_typed(FinetuneConfig, layers, validate_finetune)


def validate_finetune(cfg: FinetuneConfig) -> list[str]:
    # The data and model sections have distill's rules: reuse them on an otherwise default Config.
    errors = [
        e
        for e in validate(Config(data=cfg.data, model=cfg.model))
        if e.startswith(("data.", "model."))
    ]

    def need(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    p, s, w = cfg.protocol, cfg.splits, cfg.workers
    need(bool(cfg.train), "train: must not be empty (give --train FILE.parquet)")
    need(p.steps >= 1, f"protocol.steps: got {p.steps}, expected >= 1")
    need(p.batch_size >= 1, f"protocol.batch_size: got {p.batch_size}, expected >= 1")
    need(
        len(p.lrs) >= 1 and all(lr > 0 for lr in p.lrs),
        f"protocol.lrs: got {list(p.lrs)}, expected one or more values > 0",
    )
    need(
        1 <= p.eval_every <= p.steps,
        f"protocol.eval_every: got {p.eval_every}, expected 1..protocol.steps ({p.steps})",
    )
    need(p.loss in LOSSES, f"protocol.loss: got {p.loss!r}, expected one of {LOSSES}")
    need(
        len(p.seeds) >= 1 and all(x >= 0 for x in p.seeds),
        f"protocol.seeds: got {list(p.seeds)}, expected one or more integers >= 0",
    )
    need(
        len(set(p.seeds)) == len(p.seeds),
        f"protocol.seeds: got {list(p.seeds)}, expected distinct seeds",
    )
    need(p.weight_decay >= 0, f"protocol.weight_decay: got {p.weight_decay}, expected >= 0")
    need(
        p.max_grad_norm is None or p.max_grad_norm > 0,
        f"protocol.max_grad_norm: got {p.max_grad_norm}, expected > 0 or null",
    )
    need(
        p.eval_batch_size >= 1, f"protocol.eval_batch_size: got {p.eval_batch_size}, expected >= 1"
    )
    need(s.dev_size >= 2, f"splits.dev_size: got {s.dev_size}, expected >= 2")
    need(s.test_size >= 2, f"splits.test_size: got {s.test_size}, expected >= 2")
    need(s.grad_error_rows >= 1, f"splits.grad_error_rows: got {s.grad_error_rows}, expected >= 1")
    need(w.num_workers >= 1, f"workers.num_workers: got {w.num_workers}, expected >= 1")
    need(
        w.num_workers < 1 or p.batch_size % w.num_workers == 0,
        f"protocol.batch_size: got {p.batch_size}, expected a multiple of workers.num_workers "
        f"({w.num_workers}): every worker takes an equal share of each batch",
    )
    need(
        w.gpus_per_worker == "auto"
        or (isinstance(w.gpus_per_worker, float | int) and w.gpus_per_worker >= 0),
        f"workers.gpus_per_worker: got {w.gpus_per_worker!r}, expected auto or a number >= 0",
    )
    need(w.cpus_per_worker > 0, f"workers.cpus_per_worker: got {w.cpus_per_worker}, expected > 0")
    need(
        w.strategy in STRATEGIES,
        f"workers.strategy: got {w.strategy!r}, expected one of {STRATEGIES}",
    )
    need(
        w.mixed_precision in PRECISIONS,
        f"workers.mixed_precision: got {w.mixed_precision!r}, expected one of {PRECISIONS}",
    )
    for name in cfg.baselines:
        need(
            name in BASELINES,
            f"baselines: unknown baseline {name!r}, expected some of {', '.join(BASELINES)}",
        )
    need(
        len(set(cfg.baselines)) == len(cfg.baselines),
        f"baselines: got {list(cfg.baselines)}, expected each at most once",
    )
    need(bool(cfg.output), "output: must not be empty")
    return errors


def load_deepspeed_config(setting: str) -> dict[str, Any]:
    """The DeepSpeed JSON, checked. Batch sizes, clipping and precision are set by the job from
    the protocol, so the file must not bring its own optimizer or scheduler."""
    path = deepspeed_config_path(setting)
    if not path.is_file():
        raise FinetuneError(
            f"workers.deepspeed_config {setting!r}: file {str(path)!r} does not exist "
            f"(presets: {', '.join(DEEPSPEED_PRESETS)})"
        )
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FinetuneError(
            f"workers.deepspeed_config {str(path)!r}: not valid JSON ({e})"
        ) from None
    if not isinstance(ds, dict):
        raise FinetuneError(f"workers.deepspeed_config {str(path)!r}: expected a JSON object")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise FinetuneError(f"{str(path)!r}: zero_optimization.stage {stage!r}, expected 0..3")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise FinetuneError(
                f"{str(path)!r}: remove the {key!r} section: the job passes AdamW with a linear "
                "schedule from the protocol"
            )
    return ds
