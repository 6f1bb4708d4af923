"""A wheel built from the repo carries its presets: installed away from the checkout, it resolves
the DeepSpeed presets ``zero2`` / ``zero3`` and the job YAMLs from package data, and takes one
DeepSpeed training step of the finetune loop with each (in one process: world size 1, gloo, the
tiny model). The 2-worker Ray Train runs of the same presets are in test_finetune.py."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "gradmm_ray" / "presets"

pytestmark = pytest.mark.slow  # builds a wheel (~10 s) and initialises DeepSpeed twice

# Runs in a folder outside the checkout, with only the installed wheel on sys.path ahead of the
# venv (whose editable install would otherwise point back to the repo).
SCRIPT = r"""
import copy, os, sys
from pathlib import Path

site = Path(sys.argv[1]).resolve()
import gradmm_ray
assert Path(gradmm_ray.__file__).resolve().is_relative_to(site), gradmm_ray.__file__

from gradmm_ray.presets import deepspeed_config_path, preset_names, resolve_config_path
assert preset_names() == sys.argv[3].split(","), preset_names()  # the checkout's presets
for name in preset_names():
    assert resolve_config_path(name).resolve().is_relative_to(site)

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", LOCAL_RANK="0",
                  WORLD_SIZE="1")
import torch
import deepspeed
from gradmm_ray.config import DataConfig, ModelConfig
from gradmm_ray.core.lm import load_model
from gradmm_ray.core.training import EvalSets, Example, RunSpec, run_one
from gradmm_ray.distributed.train import DeepSpeedBackend, finalise_deepspeed_config
from gradmm_ray.finetune.config import ProtocolConfig, load_deepspeed_config

deepspeed.init_distributed(dist_backend="gloo")
lm = load_model(ModelConfig(name="tiny", device="cpu", dtype="float32"), progress=False)
verbalizers = {"positive": " great", "negative": " bad"}
rows = [Example("A wonderful film. It was", " great", "positive", "t:0"),
        Example("A dull mess. It was", " bad", "negative", "t:1")]
protocol = ProtocolConfig(steps=1, eval_every=1, batch_size=2, lrs=(1e-3,))
for zero, stage in (("zero2", 2), ("zero3", 3)):
    path = deepspeed_config_path(zero)
    assert path.resolve().is_relative_to(site), path
    ds = finalise_deepspeed_config(load_deepspeed_config(zero), protocol, 1, "no")
    assert ds["zero_optimization"]["stage"] == stage
    model = copy.deepcopy(lm.model).requires_grad_(True).train()  # as train_worker does
    backend = DeepSpeedBackend(model, 1e-3, protocol, 1, ds, torch.device("cpu"))
    records = run_one(
        RunSpec("synthetic", "synthetic", 0, 1e-3, 1), backend, lm.tokenizer, rows,
        EvalSets(rows, rows, rows), data=DataConfig(verbalizers=verbalizers), protocol=protocol,
        device=torch.device("cpu"),
    )
    assert [r["step"] for r in records] == [0, 1] and records[1]["train_loss"] > 0
    backend.close()
    print(zero, "ok", records[1]["train_loss"])
"""


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_installed_wheel_runs_finetune_with_the_deepspeed_presets(tmp_path):
    # Build from a copy without the checkout's build/ folder: setuptools copies package data into
    # build/lib without removing what is gone, so a preset deleted from the checkout would ship.
    source = tmp_path / "src"
    shutil.copytree(
        ROOT, source,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "outputs", "*.egg-info",
                                      "__pycache__", ".pytest_cache", ".ruff_cache"),
    )  # fmt: skip
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), "-q"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("gradmm_ray-*.whl")
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
         str(wheel)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    shipped = sorted(p for p in PRESETS.iterdir() if p.suffix in (".yaml", ".json"))
    assert {p.name for p in shipped} >= {"deepspeed_zero2.json", "deepspeed_zero3.json"}
    for preset in shipped:
        assert (site / "gradmm_ray" / "presets" / preset.name).is_file(), preset.name
    assert (site / "bin" / "gradmm-finetune").is_file() and (
        site / "bin" / "gradmm-distill"
    ).is_file()

    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(site), _free_port(),
         ",".join(p.stem for p in shipped if p.suffix == ".yaml")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "zero2 ok" in run.stdout and "zero3 ok" in run.stdout
    # The console script answers --help from the installed package.
    script = subprocess.run(
        [sys.executable, str(site / "bin" / "gradmm-finetune"), "--help"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert script.returncode == 0 and "zero3" in script.stdout
