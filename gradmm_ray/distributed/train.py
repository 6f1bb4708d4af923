"""Ray layer of fine-tuning: one Ray Train ``TorchTrainer`` runs every planned run on its workers.

Each worker loads the pretrained model once, then for every run (method, seed, lr) trains a fresh
copy with Accelerate or DeepSpeed (ZeRO-2 / ZeRO-3, the JSON in gradmm_ray/presets/) through
:func:`gradmm_ray.core.training.run_one`, and reports every evaluation with ``ray.train.report``.
Rank 0 returns the records (``Result.return_value``). TorchTrainer sets MASTER_ADDR / RANK /
WORLD_SIZE / LOCAL_RANK and the process group (gloo on CPU workers, nccl on GPUs), which both
wrappers join. Accelerate and DeepSpeed are imported inside the worker only.

Herding and k-center need embeddings of the real pool: one Ray task computes them with the
pretrained model (on a GPU when the workers get one). The job around it (prepare, plan, report)
is ``gradmm_ray/finetune/job.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import os
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradmm_ray.config import DataConfig, ModelConfig
from gradmm_ray.core.scoring import mean_pooled_states
from gradmm_ray.core.training import (
    EvalSets,
    Example,
    PlainBackend,
    RunSpec,
    make_optimizer,
    run_one,
)
from gradmm_ray.finetune.config import ProtocolConfig, WorkersConfig


@dataclass(frozen=True)
class TrainingJob:
    """Everything the workers need (picklable, no Ray objects)."""

    model: ModelConfig
    data: DataConfig
    protocol: ProtocolConfig
    workers: WorkersConfig
    deepspeed: dict[str, Any] | None
    sets: dict[str, list[Example]]
    runs: list[RunSpec]
    evals: EvalSets
    grad_error_rows: int


# ---------------------------------------------------------------------------------------------
# Backends (inside a worker)


def resolve_precision(setting: str, device: torch.device) -> str:
    """auto: bf16 on a GPU that supports it, else full fp32 ("no")."""
    if setting != "auto":
        return setting
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def finalise_deepspeed_config(
    base: dict[str, Any], protocol: ProtocolConfig, world_size: int, precision: str
) -> dict[str, Any]:
    """The shipped JSON with what the protocol decides: global batch = micro batch x workers (no
    accumulation), gradient clipping, and the precision (fp32 on CPU)."""
    ds = copy.deepcopy(base)
    ds["train_batch_size"] = protocol.batch_size
    ds["train_micro_batch_size_per_gpu"] = protocol.batch_size // world_size
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = protocol.max_grad_norm or 0.0
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
    # AdamW from torch is what the protocol asks for; DeepSpeed only tests its own optimizers.
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 10**9)
    return ds


class AccelerateBackend:
    """Accelerate: DDP across workers when there are several, mixed precision on GPUs."""

    def __init__(
        self, model, lr: float, protocol: ProtocolConfig, steps: int, precision: str, device
    ):
        from accelerate import Accelerator

        self.protocol = protocol
        self.accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision)
        optimizer, self.schedule = make_optimizer(model.parameters(), lr, protocol, steps)
        # The schedule stays outside prepare(): Accelerate would step it once per process.
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)

    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def step(self, loss: Tensor) -> None:
        self.accelerator.backward(loss)
        if self.protocol.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.protocol.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)

    def full_head(self) -> AbstractContextManager:
        return nullcontext()

    def close(self) -> None:
        self.accelerator.free_memory()


class DeepSpeedBackend:
    """DeepSpeed ZeRO (stage from the JSON) with the protocol's AdamW and linear schedule."""

    def __init__(
        self, model, lr: float, protocol: ProtocolConfig, steps: int, ds: dict[str, Any], device
    ):
        if device.type == "cpu":  # said, not guessed: no "unable to detect" warning per rank
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        if device.type == "cpu":
            # The shared-memory all-reduce kernel is a C++ build (~2 min) that only speeds up
            # several CPU ranks on one node; gloo does the same job. DeepSpeed keeps this dict
            # for such edits ("edits to it persist").
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.stage = int(ds.get("zero_optimization", {}).get("stage", 0))
        optimizer, schedule = make_optimizer(model.parameters(), lr, protocol, steps)
        self.model, self.optimizer, _, self.schedule = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds
        )

    def unwrapped(self) -> torch.nn.Module:
        return self.model.module

    def step(self, loss: Tensor) -> None:
        self.model.backward(loss)
        self.model.step()  # clips, steps the optimizer and the schedule, zeroes the gradients

    def full_head(self) -> AbstractContextManager:
        if self.stage < 3:
            return nullcontext()
        import deepspeed

        head = self.model.module.get_output_embeddings()
        return deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=None)

    def close(self) -> None:
        self.model.destroy()


def make_backend(job: TrainingJob, model, spec: RunSpec, world_size: int, device):
    if spec.steps == 0:  # zero-shot: evaluation only, nothing to wrap
        return PlainBackend(model)
    precision = resolve_precision(job.workers.mixed_precision, device)
    if job.workers.strategy == "deepspeed":
        ds = finalise_deepspeed_config(job.deepspeed or {}, job.protocol, world_size, precision)
        return DeepSpeedBackend(model, spec.lr, job.protocol, spec.steps, ds, device)
    return AccelerateBackend(model, spec.lr, job.protocol, spec.steps, precision, device)


def _describe(spec: RunSpec) -> str:
    return f"{spec.name} seed {spec.seed}" + (f" lr {spec.lr:g}" if spec.steps else "")


def _progress(line: str) -> None:
    # Past Ray Train's print patch, which would log the line twice (stdout and its logger).
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


def _quiet_report_logs() -> None:
    # Ray Train 2.60 logs every ray.train.report at INFO under a logger named by its file path,
    # which LoggingConfig(log_level) does not reach; our progress line per evaluation suffices.
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_worker(config: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The per-worker loop: every run of the job in turn, on a fresh copy of the model."""
    import ray.train
    import ray.train.torch

    from gradmm_ray.core.lm import load_model

    job: TrainingJob = config["job"]
    _quiet_report_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # As many threads as CPUs reserved: more oversubscribe a shared node (a 10x slowdown
        # for the tiny model on 2 cores with two threads under load).
        torch.set_num_threads(max(1, int(job.workers.cpus_per_worker)))
    m = job.model
    # fp32 master weights unless a dtype is asked for; mixed precision does the rest on GPUs.
    dtype = "float32" if m.dtype == "auto" else m.dtype
    pretrained = load_model(dataclasses.replace(m, dtype=dtype, device="cpu"))
    tokenizer = pretrained.tokenizer
    histories = []
    for i, spec in enumerate(job.runs):
        started = time.perf_counter()
        model = copy.deepcopy(pretrained.model).to(device).requires_grad_(True).train()
        backend = make_backend(job, model, spec, world, device)

        def report(record: dict[str, Any], spec: RunSpec = spec, i: int = i) -> None:
            ray.train.report(
                {"run": i, "name": spec.name, "seed": spec.seed, "lr": spec.lr, **record}
            )
            if rank == 0 and (record["step"] > 0 or spec.steps == 0):
                shown = ", ".join(
                    f"{k} {record[k]:.4f}"
                    for k in ("dev_accuracy", "test_accuracy", "dev_loss", "grad_error")
                    if record.get(k) is not None
                )
                _progress(
                    f"[finetune {i + 1}/{len(job.runs)}] {_describe(spec)} "
                    f"step {record['step']}/{spec.steps}: {shown}"
                )

        records = run_one(
            spec,
            backend,
            tokenizer,
            job.sets.get(spec.set_key, []),
            job.evals,
            data=job.data,
            protocol=job.protocol,
            device=device,
            rank=rank,
            world_size=world,
            grad_error_rows=job.grad_error_rows,
            report=report,
        )
        histories.append(
            {
                "spec": dataclasses.asdict(spec),
                "records": records,
                "seconds": time.perf_counter() - started,
            }
        )
        if hasattr(backend, "close"):
            backend.close()
        del model, backend
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return histories if rank == 0 else None


# ---------------------------------------------------------------------------------------------
# Driver side


class FinetuneFailed(RuntimeError):
    """Fine-tuning could not finish on the cluster (a worker died or raised)."""


def worker_gpus(workers: WorkersConfig) -> float:
    from gradmm_ray.distributed.ray_env import actor_gpus

    return actor_gpus(workers.gpus_per_worker)


def run_training(job: TrainingJob, *, storage_path: str, name: str) -> list[dict[str, Any]]:
    """Every run of ``job`` in one TorchTrainer; the records of every run, in order."""
    import ray
    import ray.train
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpus = worker_gpus(job.workers)
    resources = {"CPU": job.workers.cpus_per_worker, **({"GPU": gpus} if gpus > 0 else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=job.workers.num_workers, use_gpu=gpus > 0, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        # Ray Train logs every report at INFO; our own progress line per evaluation suffices.
        run_config=RunConfig(
            name=name, storage_path=storage_path, logging_config=LoggingConfig(log_level="WARNING")
        ),
    )
    try:
        result = trainer.fit()
    except (ray.train.TrainingFailedError, ray.exceptions.RayError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise FinetuneFailed(
            f"fine-tuning failed on the cluster: {e.__class__.__name__}: {lines[-1] if lines else ''}"
        ) from e
    if result.return_value is None:
        raise FinetuneFailed("fine-tuning finished without results from rank 0")
    return result.return_value


def _embed_task(model: ModelConfig, prompts: list[str]) -> np.ndarray:
    from gradmm_ray.core.lm import load_model

    lm = load_model(model)
    return mean_pooled_states(lm, prompts).numpy()


def embed_prompts(model: ModelConfig, prompts: list[str], gpus: float) -> Tensor:
    """Mean-pooled hidden states of the pretrained model, one Ray task (a GPU when workers get one)."""
    import ray

    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=1)(_embed_task)
    return torch.from_numpy(np.array(ray.get(task.remote(model, prompts))))  # a writable copy


def storage_for(output: str) -> str:
    """Ray Train's run folder, beside the results (absolute, as Ray wants it)."""
    if "://" in output:
        return output.rstrip("/") + "/ray_train"
    return os.path.join(os.path.abspath(os.path.expanduser(output)), "ray_train")
