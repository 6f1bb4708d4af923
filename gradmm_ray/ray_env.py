"""Connecting to Ray and sizing actor pools: the only place that decides where work runs."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

import ray
import ray.data

from gradmm_ray.config import ExecutionConfig


def init_ray() -> tuple[str, bool]:
    """Join the cluster named by RAY_ADDRESS (set inside ``ray job submit``), else start a local
    one sized to this machine. Returns a short description and whether this call started Ray."""
    if ray.is_initialized():
        return _describe("Ray (already connected)"), False
    address = os.environ.get("RAY_ADDRESS")
    # Child processes (actors) inherit HF_HUB_OFFLINE etc. through the environment anyway; the
    # project itself ships its code to a cluster through `ray job submit --working-dir`.
    ray.init(
        address=address,
        logging_level=logging.WARNING,
        log_to_driver=True,
        include_dashboard=False if not address else None,
    )
    return _describe(f"cluster at {address}" if address else "local Ray"), True


def _describe(where: str) -> str:
    res = ray.cluster_resources()
    return f"{where}: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"


def actor_gpus(setting: float | str) -> float:
    """GPUs per actor: `auto` is 1 when the cluster has GPUs now, else 0 (CPU actors). On an
    autoscaling cluster whose GPU nodes start at zero, set it to 1 explicitly."""
    if setting == "auto":
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return float(setting)


def configure_ray_data(cfg: ExecutionConfig) -> None:
    """Our own progress bars (rows, solved examples) replace Ray Data's per-operator bars; a
    stage that makes no progress for `stall_timeout_s` fails instead of hanging."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_no_progress_timeout_s = cfg.stall_timeout_s
    # Per-dataset "execution finished" lines repeat the summary's timings; the one-time notice
    # that Ray Data's bars are off is the point, not news.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def map_on_actor_pool(
    ds: ray.data.Dataset,
    udf: type,
    *,
    constructor_kwargs: dict,
    batch_size: int,
    min_actors: int,
    max_actors: int,
    num_gpus: float,
    num_cpus: float,
    execution: ExecutionConfig,
) -> ray.data.Dataset:
    """``ds.map_batches(udf)`` on an autoscaling pool of ``udf`` actors, numpy batches.

    Restarts are finite, so an actor that keeps dying mid-batch ends the stage (Ray Data's own
    budget covers deaths in ``__init__``); task retries are not, because Ray counts retries to a
    dead node's actor until the node is declared dead, and a finite budget can run out during one
    lost node."""
    with warnings.catch_warnings():
        # Ray 2.60-2.63 takes actor restart limits only through **ray_remote_args, which warns
        # that it is deprecated; pyproject caps ray below 2.64, where it goes.
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
        return ds.map_batches(
            udf,
            fn_constructor_kwargs=constructor_kwargs,
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
            num_gpus=num_gpus,
            num_cpus=num_cpus,
            max_restarts=execution.max_actor_restarts,
            max_task_retries=-1,
        )


class StageFailed(RuntimeError):
    """A stage could not finish on the cluster (actors kept dying, no progress)."""


@contextlib.contextmanager
def stage_errors(stage: str) -> Iterator[None]:
    """Turn a cluster failure inside ``stage`` into one StageFailed line for the user."""
    from ray.data.exceptions import ExecutionTimeoutError

    try:
        yield
    except (ray.exceptions.RayError, ExecutionTimeoutError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        cause = lines[0] if lines else e.__class__.__name__
        raise StageFailed(
            f"stage {stage} failed on the cluster: {e.__class__.__name__}: {cause} "
            "(finished work is kept; re-run the same command to resume)"
        ) from e
