"""Connecting to Ray and sizing actor pools: the only place that decides where work runs."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator

import pyarrow as pa
import ray
import ray.data
from tqdm.auto import tqdm
from tqdm.std import EMA

from gradmm_ray.config import ExecutionConfig, PoolConfig
from gradmm_ray.errors import DataError


def init_ray() -> tuple[str, bool]:
    """Join the cluster named by RAY_ADDRESS (set inside ``ray job submit``), else start a local
    one sized to this machine. Returns a short description and whether this call started Ray."""
    if ray.is_initialized():
        return _describe("Ray (already connected)"), False
    address = os.environ.get("RAY_ADDRESS")
    try:
        # Child processes (actors) inherit HF_HUB_OFFLINE etc. through the environment anyway;
        # the project itself ships its code to a cluster through `ray job submit --working-dir`.
        ray.init(
            address=address,
            logging_level=logging.WARNING,
            log_to_driver=True,
            include_dashboard=False if not address else None,
        )
        return _describe(f"cluster at {address}" if address else "local Ray"), True
    except Exception as e:  # Ray raises many types here (ConnectionError, RuntimeError, ...)
        if ray.is_initialized():
            ray.shutdown()
        todo = (
            f"check that the cluster at RAY_ADDRESS={address} is up (`ray status`) and reachable, "
            "or unset RAY_ADDRESS to start a local Ray"
            if address
            else "check free memory and disk space in /tmp (Ray's session folder), or start Ray "
            "with `ray start --head` and set RAY_ADDRESS=auto"
        )
        raise RayStartFailed(f"could not start or join Ray: {_first_line(e)}; {todo}") from e


class RayStartFailed(RuntimeError):
    """ray.init failed: nothing has run and nothing has been written."""


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{e.__class__.__name__}: {lines[0]}" if lines else e.__class__.__name__


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


class StageBar(tqdm):
    """A stage's progress bar that says what its first, silent wait is (actors starting and
    loading the model: a minute on a CPU, minutes while a GPU node joins) until the first
    result arrives, and whose ETA then counts from the results only: with that wait in the
    rate, tqdm's estimate at 20% of the demo's stage 1 was 5x too long."""

    def __init__(self, *args, model: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._waiting = True
        self.set_postfix_str(f"starting actors, loading {model}")

    def update(self, n: float = 1) -> bool | None:
        if not self._waiting or self.disable:  # a disabled tqdm has no rate state
            return super().update(n)
        self._waiting = False
        self.set_postfix_str("", refresh=False)
        shown = super().update(n)
        self._ema_dn, self._ema_dt = EMA(self.smoothing), EMA(self.smoothing)  # forget the wait
        return shown


def blocks_of(table: pa.Table, rows_per_block: int, min_blocks: int) -> list[pa.Table]:
    """Slices of at most ``rows_per_block`` rows, at least ``min_blocks`` of them when possible."""
    size = max(1, min(rows_per_block, -(-table.num_rows // min_blocks)))
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


def map_on_actor_pool(
    rows: pa.Table | ray.data.Dataset,
    udf: type,
    *,
    constructor_kwargs: dict,
    pool: PoolConfig,
    batch_size: int,
    execution: ExecutionConfig,
    blocks_per_actor: int = 1,
) -> ray.data.Dataset:
    """``udf`` mapped over ``rows`` on an autoscaling pool of ``udf`` actors sized by ``pool``
    (the stage's config section), ``batch_size`` rows per call, numpy batches.

    A table's blocks are cut here, on the driver (at least ``blocks_per_actor`` per actor when
    the table allows), so that every actor gets work at any size: a repartition would need a CPU
    task that a pool of actors holding every CPU could starve. A dataset (stage 1's stream) comes
    cut already.

    Restarts are finite, so an actor that keeps dying mid-batch ends the stage (Ray Data's own
    budget covers deaths in ``__init__``); task retries are not, because Ray counts retries to a
    dead node's actor until the node is declared dead, and a finite budget can run out during one
    lost node."""
    with warnings.catch_warnings():
        # Ray 2.60-2.63 takes actor restart limits only through **ray_remote_args, which warns
        # that it is deprecated; pyproject caps ray below 2.64, where it goes.
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
        ds = (
            rows
            if isinstance(rows, ray.data.Dataset)
            else ray.data.from_arrow(
                blocks_of(rows, batch_size, blocks_per_actor * pool.max_actors)
            )
        )
        return ds.map_batches(
            udf,
            fn_constructor_kwargs=constructor_kwargs,
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
            num_gpus=actor_gpus(pool.num_gpus),
            num_cpus=pool.num_cpus,
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
        root = root_cause(str(e))
        if root is not None and root[0].rsplit(".", 1)[-1] == "DataError":
            # A bad row found in the stream: the same one line as a bad row found up front.
            raise DataError(root[1]) from None
        if root is not None and not _may_pass_on_retry(root[0]):
            name, message, where = root
            hint = (
                "lower the stage's micro_batch_size / batch_size or data.max_tokens"
                if name.endswith("OutOfMemoryError")
                else "fix the cause; the full traceback is in the Ray Data log "
                "(logs/ray-data in the Ray session folder)"
            )
            raise StageFailed(
                f"stage {stage} failed on the cluster: {name}: {message}{where}; this error is "
                f"deterministic: re-running will fail the same way; {hint}"
            ) from e
        raise StageFailed(
            f"stage {stage} failed on the cluster: {_first_line(e)} "
            "(finished work is kept; re-run the same command to resume)"
        ) from e


# An exception line of a Python traceback: "RuntimeError: message" or "pkg.mod.SomeError: ...".
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))(?:: (.*))?$")
_FRAME_LINE = re.compile(r'^\s*File "(.+)", line (\d+), in (\S+)')
# Causes that can go away on their own (network, storage, Ray's own failures).
_TRANSIENT = {"OSError", "IOError", "ConnectionError", "TimeoutError", "BrokenPipeError"}


def root_cause(text: str) -> tuple[str, str, str] | None:
    """(type, first message line, " (at file:line in function)") of the first exception in a
    worker traceback, or None when ``text`` holds none.

    Ray keeps the user code's exception only as text: a UDF error arrives as
    RayTaskError(UserCodeException) whose ``cause`` lost its ``__cause__`` in pickling, and an
    actor that failed in ``__init__`` as an ActorDiedError holding the traceback as a string.
    Python prints a chain oldest first, so the first exception line is the root cause."""
    where = ""
    for line in text.splitlines():
        frame = _FRAME_LINE.match(line)
        if frame:
            path, lineno, function = frame.groups()
            where = f" (at {os.path.basename(path)}:{lineno} in {function})"
        match = _EXCEPTION_LINE.match(line)
        if match:
            return match.group(1), (match.group(2) or "").strip(), where
    return None


def _may_pass_on_retry(name: str) -> bool:
    short = name.rsplit(".", 1)[-1]
    return name.startswith("ray.") or short in _TRANSIENT or short.startswith("Connection")
