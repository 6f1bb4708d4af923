"""Connecting to Ray and sizing actor pools: the only place that decides where work runs."""

from __future__ import annotations

import logging
import os

import ray


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


def quiet_ray_data() -> None:
    """Our own progress bars (rows, solved examples) replace Ray Data's per-operator bars."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
