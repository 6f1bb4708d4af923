"""A stage that cannot make progress ends the job with one clear line, not a hang."""

import shutil

from gradmm_ray import cli
from gradmm_ray.lm import ensure_tiny_model


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
