"""A stage that cannot make progress ends the job with one clear line, not a hang."""

import os
import shutil
import warnings

import pytest

from gradmm_ray import cli
from gradmm_ray.config import ExecutionConfig
from gradmm_ray.lm import ensure_tiny_model
from gradmm_ray.ray_env import StageFailed, map_on_actor_pool, stage_errors


@pytest.fixture(autouse=True)
def restore_stall_timeout(ray_session):
    """These runs shorten the session-wide Ray Data stall timeout; later tests need it back."""
    ctx = ray_session.data.DataContext.get_current()
    before = ctx.execution_no_progress_timeout_s
    yield
    ctx.execution_no_progress_timeout_s = before


def test_actor_that_keeps_dying_ends_the_job(ray_session, tmp_path, capsys):
    """Model weights that cannot load make every stage-1 actor die in __init__: the job stops
    with exit code 1 and one line naming the stage, within Ray Data's init-retry budget."""
    model = tmp_path / "broken-model"
    shutil.copytree(ensure_tiny_model(), model)
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "out"
    argv = ["--model", str(model), "--output", str(out), "--set", "data.per_class=4"]
    assert cli.main(argv) == cli.EXIT_STAGE_FAILED
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distill.py")]
    assert len(err) == 1
    assert "stage targets failed on the cluster" in err[0] and "re-run the same command" in err[0]
    assert not (out / "targets.safetensors").exists()


def test_stage_that_cannot_start_times_out(ray_session, tmp_path, capsys):
    """Actors that ask for a GPU on a CPU-only cluster never start: after the stall timeout the
    job stops with one line naming the stage instead of waiting forever."""
    out = tmp_path / "out"
    argv = ["--output", str(out), "--set", "data.per_class=4", "--set", "targets.num_gpus=1"]
    argv += ["--set", "execution.stall_timeout_s=5"]
    assert cli.main(argv) == cli.EXIT_STAGE_FAILED
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distill.py")]
    assert len(err) == 1 and "stage targets failed on the cluster" in err[0]


def test_actor_dying_mid_batch_ends_the_stage_after_its_restarts(ray_session, tmp_path):
    """map_on_actor_pool: an actor that dies on every batch is restarted max_actor_restarts
    times, then the stage fails as StageFailed (one line naming the stage), instead of
    restarting forever; building the stage emits no deprecation warning."""
    import ray.data

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
            ray.data.range(4, override_num_blocks=4),
            DiesOnEveryBatch,
            constructor_kwargs={"marker": str(marker)},
            batch_size=1,
            min_actors=1,
            max_actors=1,
            num_gpus=0,
            num_cpus=1,
            execution=execution,
        )
    with pytest.raises(StageFailed) as failed, stage_errors("solve"):
        ds.materialize()
    assert "stage solve failed on the cluster" in str(failed.value)
    assert len(str(failed.value).splitlines()) == 1
    # One first life plus one restart, each dying on its first batch.
    assert marker.read_text() == "x" * (1 + execution.max_actor_restarts)
