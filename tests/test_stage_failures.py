"""A stage that cannot make progress ends the job with one clear line, not a hang."""

import os
import shutil
import warnings

import pyarrow as pa
import pytest

from gradmm_ray.config import ExecutionConfig, PoolConfig
from gradmm_ray.distill import cli
from gradmm_ray.distributed.ray_env import StageFailed, map_on_actor_pool, stage_errors
from gradmm_ray.entry import EXIT_FAILED
from gradmm_ray.models.tiny import ensure_tiny_model

# A few rows suffice; a per-class cap is allowed only without noise (not under test here).
SMALL = ["--config", "tiny", "--set", "data.per_class=4", "--set", "privacy.epsilon=.inf"]
ONE_CPU_ACTOR = PoolConfig(min_actors=1, max_actors=1, num_gpus=0, num_cpus=1)


@pytest.fixture(autouse=True)
def restore_stall_timeout(ray_session):
    """These runs shorten the session-wide Ray Data stall timeout; later tests need it back."""
    ctx = ray_session.data.DataContext.get_current()
    before = ctx.execution_no_progress_timeout_s
    yield
    ctx.execution_no_progress_timeout_s = before


def test_actor_that_keeps_dying_ends_the_job(ray_session, tmp_path, capsys):
    """Model weights that cannot load make every stage-1 actor die in __init__: the job stops
    with exit code 1 and one line naming the stage and the loader's error, within Ray Data's
    init-retry budget, and says that re-running will not help (the file stays broken)."""
    model = tmp_path / "broken-model"
    shutil.copytree(ensure_tiny_model(), model)
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "out"
    argv = ["--model", str(model), "--output", str(out), *SMALL]
    assert cli.main(argv) == EXIT_FAILED
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distill.py")]
    assert len(err) == 1
    assert "stage targets failed on the cluster" in err[0] and "SafetensorError" in err[0]
    assert "deterministic: re-running will fail the same way" in err[0]
    assert not (out / "targets.safetensors").exists()


def test_stage_that_cannot_start_times_out(ray_session, tmp_path, capsys):
    """Actors that ask for a GPU on a CPU-only cluster never start: after the stall timeout the
    job stops with one line naming the stage instead of waiting forever."""
    out = tmp_path / "out"
    argv = ["--output", str(out), *SMALL, "--set", "targets.num_gpus=1"]
    argv += ["--set", "execution.stall_timeout_s=5"]
    assert cli.main(argv) == EXIT_FAILED
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distill.py")]
    assert len(err) == 1 and "stage targets failed on the cluster" in err[0]


def test_error_in_user_code_names_the_root_cause_and_says_rerunning_will_not_help(ray_session):
    """A UDF that raises reaches the driver as RayTaskError(UserCodeException) holding the
    real exception only as traceback text: the line names that exception, its first line and
    where it was raised, and says re-running fails the same way."""

    class RaisesOnEveryBatch:  # local: pickled by value, workers cannot import test modules
        def __call__(self, batch):
            raise RuntimeError("shapes (4, 3) and (2,) differ\nsecond line of detail")

    ds = map_on_actor_pool(
        pa.table({"id": [0, 1]}),
        RaisesOnEveryBatch,
        constructor_kwargs={},
        pool=ONE_CPU_ACTOR,
        batch_size=2,
        execution=ExecutionConfig(max_actor_restarts=0, stall_timeout_s=120),
    )
    with pytest.raises(StageFailed) as failed, stage_errors("solve"):
        ds.materialize()
    line = str(failed.value)
    assert len(line.splitlines()) == 1
    assert line.startswith(
        "stage solve failed on the cluster: RuntimeError: shapes (4, 3) and (2,) differ "
        "(at test_stage_failures.py:"
    )
    assert "in __call__); this error is deterministic: re-running will fail the same way" in line
    assert "re-run the same command" not in line


WORKER_TRACEBACK = """\x1b[36mray::MapWorker(MapBatches(X)).submit()\x1b[39m (pid=1, ip=10.0.0.2)
  File "/usr/lib/python3.11/concurrent/futures/thread.py", line 58, in run
    result = self.fn(*self.args, **self.kwargs)
  File "/app/gradmm_ray/targets.py", line 91, in __call__
    A, targets, mask = self.lm.completion_states(pairs)
{exception}

The above exception was the direct cause of the following exception:

ray.exceptions.UserCodeException: UDF failed to process a data block."""


@pytest.mark.parametrize(
    ("exception", "expected"),
    [
        (
            "IndexError: index out of range in self",
            "IndexError: index out of range in self (at targets.py:91 in __call__); "
            "this error is deterministic",
        ),
        (
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
            "this error is deterministic: re-running will fail the same way; lower the stage's "
            "micro_batch_size",
        ),
        ("ConnectionResetError: [Errno 104] reset by peer", "re-run the same command to resume"),
        ("OSError: [Errno 5] Input/output error", "re-run the same command to resume"),
    ],
)
def test_root_cause_decides_whether_rerunning_can_help(exception, expected):
    """stage_errors on worker traceback text: user-code errors are deterministic (with where
    they were raised), network and storage errors may pass on a re-run."""
    import ray

    with pytest.raises(StageFailed) as failed, stage_errors("targets"):
        raise ray.exceptions.RayError(WORKER_TRACEBACK.format(exception=exception))
    line = str(failed.value)
    assert line.startswith("stage targets failed on the cluster: ") and expected in line
    assert len(line.splitlines()) == 1


def test_bad_row_found_in_the_stream_is_the_users_one_line():
    """A DataError raised where a fragment is read (a bad row past the driver's first rows)
    reaches the user as that DataError's own line, like a bad row found up front."""
    import ray

    from gradmm_ray.errors import DataError

    text = WORKER_TRACEBACK.format(
        exception="gradmm_ray.errors.DataError: lake/b.jsonl row 13: column 'text' is empty ('')"
    )
    with pytest.raises(DataError) as bad, stage_errors("targets"):
        raise ray.exceptions.RayError(text)
    assert str(bad.value) == "lake/b.jsonl row 13: column 'text' is empty ('')"


def test_lost_actor_without_traceback_may_pass_on_rerun():
    """An actor or node that died (no Python exception in the text) may pass on a re-run."""
    import ray

    with pytest.raises(StageFailed) as failed, stage_errors("solve"):
        raise ray.exceptions.RayError(
            "The actor died unexpectedly before finishing this task.\n\tclass_name: MapWorker"
        )
    assert str(failed.value) == (
        "stage solve failed on the cluster: RayError: The actor died unexpectedly before "
        "finishing this task. (finished work is kept; re-run the same command to resume)"
    )


def test_actor_dying_mid_batch_ends_the_stage_after_its_restarts(ray_session, tmp_path):
    """map_on_actor_pool: an actor that dies on every batch is restarted max_actor_restarts
    times, then the stage fails as StageFailed (one line naming the stage), instead of
    restarting forever; building the stage emits no deprecation warning."""

    class DiesOnEveryBatch:  # local: pickled by value, workers cannot import test modules
        """Dies like a segfault or a host OOM kill: the process exits, no Python exception."""

        def __init__(self, marker: str):
            self.marker = marker

        def __call__(self, batch):
            with open(self.marker, "a") as f:
                f.write("x")
            os._exit(1)

    marker = tmp_path / "calls"
    execution = ExecutionConfig(max_actor_restarts=1, stall_timeout_s=120)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        ds = map_on_actor_pool(
            pa.table({"id": [0, 1, 2, 3]}),
            DiesOnEveryBatch,
            constructor_kwargs={"marker": str(marker)},
            pool=ONE_CPU_ACTOR,
            batch_size=1,
            execution=execution,
        )
    with pytest.raises(StageFailed) as failed, stage_errors("solve"):
        ds.materialize()
    assert "stage solve failed on the cluster" in str(failed.value)
    assert len(str(failed.value).splitlines()) == 1
    # One first life plus one restart, each dying on its first batch.
    assert marker.read_text() == "x" * (1 + execution.max_actor_restarts)
