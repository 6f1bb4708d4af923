"""The operator's paths, end to end on this machine. The README's cluster path: a local `ray start` head (loopback, its
own temp dir and ports, stopped by pid, never `ray stop`), then `ray job submit --working-dir .
--runtime-env cluster/runtime_env.yaml -- python jobs/distill.py ...`. The job must succeed with
the project imported from the uploaded working dir and nothing installed (no pip, no
virtualenv: the runtime environment has nothing to set up but the files). And a deliberate
stop: one line saying what was kept, then the same command resumes."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from gradmm_ray.io.storage import LOCK_FILE

REPO = Path(__file__).resolve().parents[1]
# What a healthy run must not print: a C++ (glog) error-level line, a Python ERROR log line, a
# traceback or a signal's stack dump.
ERROR_LEVEL = re.compile(r"^\[[^\]]* E \d+ \d+\]|\bERROR\b|Traceback|\*\*\* SIG", re.MULTILINE)
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _pids_under(folder: str) -> list[int]:
    """Processes whose command line names ``folder`` (the head's own processes)."""
    out = subprocess.run(["pgrep", "-f", folder], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split() if int(p) != os.getpid()]


@pytest.fixture
def ray_head():
    """A head on loopback with 2 CPUs; yields (jobs API address, env for the CLI, its temp dir)."""
    temp = tempfile.mkdtemp(prefix="gr-", dir="/tmp")  # short: Ray's socket paths are limited
    gcs, dashboard, agent = _free_ports(3)
    # `python` in the job's entrypoint is the node's: here, this environment's (as an image's).
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(Path(bin_dir) / "ray")
    start = [
        ray_cli, "start", "--head", f"--temp-dir={temp}", "--node-ip-address=127.0.0.1",
        f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
        "--include-dashboard=true", f"--dashboard-agent-listen-port={agent}",
        "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats",
    ]  # fmt: skip
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, text=True, timeout=180)
        yield f"http://127.0.0.1:{dashboard}", env, Path(temp)
    finally:
        for pid in _pids_under(temp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(1)
        shutil.rmtree(temp, ignore_errors=True)


def _ray(*args: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    ray_cli = str(Path(sys.executable).with_name("ray"))
    return subprocess.run(
        [ray_cli, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_submit_stop_and_resubmit_with_the_readme_runtime_env(ray_head, tmp_path):
    """The README's cluster path on a local head, as an operator runs it: submit (the code from
    the uploaded working dir, nothing installed), `ray job stop` mid-solve (the job's log ends
    with one line saying what the output keeps: no stack dump, the lock released), then the
    same submit resumes and succeeds, printing no error-level line. Then the runtime env's stop
    grace: a job that needs 5 s to stop (Ray kills after 3 s by default) finishes stopping."""
    address, env, temp = ray_head
    out = tmp_path / "out"
    distill = [
        "python", "jobs/distill.py", "--config", "tiny", "--output", str(out),
        "--set", "solve.candidates_per_class=12", "--set", "solve.max_actors=1",
        "--set", "targets.max_actors=1", "--set", "targets.num_gpus=0",
    ]  # fmt: skip
    submit = [
        "job", "submit", f"--address={address}", "--working-dir", ".",
        "--runtime-env", "cluster/runtime_env.yaml",
    ]  # fmt: skip
    deadline = time.monotonic() + 120
    while True:  # the head's job agent registers a few seconds after `ray start` returns
        first = _ray(*submit, "--submission-id", "first", "--no-wait", "--", *distill, env=env)
        if "No available agent" not in first.stdout + first.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    deadline = time.monotonic() + 300
    while not list((out / "solves").glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert list((out / "solves").glob("part-*.parquet")), _ray(
        "job", "logs", f"--address={address}", "first", env=env
    ).stdout[-3000:]
    stop = _ray("job", "stop", f"--address={address}", "first", env=env)
    assert stop.returncode == 0, stop.stderr[-2000:]
    log = _ray("job", "logs", f"--address={address}", "first", env=env).stdout
    last = log.strip().splitlines()[-1]
    assert last.startswith(f"distill.py: stopped by SIGTERM; {out} keeps targets.safetensors, "), (
        log[-3000:]
    )
    assert not ERROR_LEVEL.search(log), log[-3000:]
    assert not (out / LOCK_FILE).exists()

    again = _ray(*submit, "--", *distill, env=env)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    assert "succeeded" in log.lower(), log[-3000:]
    assert "already done" in log and "0 already done" not in log, log[-3000:]
    assert not ERROR_LEVEL.search(again.stdout), again.stdout[-3000:]  # the job's log
    assert (out / "synthetic.parquet").stat().st_size > 0
    # What the head's runtime-env agent made: the unpacked code, and no environment (the pip,
    # uv and conda folders stay empty unless they install something).
    resources = temp / "session_latest" / "runtime_resources"
    assert any((resources / "working_dir_files").iterdir())
    for installer in ("pip", "uv", "conda"):
        folder = resources / installer
        assert not folder.exists() or not any(folder.iterdir()), installer

    # The runtime env's stop grace reaches Ray's job supervisor: a job that needs 5 s to stop
    # (Ray's default is SIGKILL after 3 s) still finishes its handler.
    slow_stopper = tmp_path / "slow_stopper.py"
    slow_stopper.write_text(
        "import signal, sys, time\n"
        "def stop(*_):\n"
        "    time.sleep(5)\n"
        "    print('stopped after 5 s', flush=True)\n"
        "    sys.exit(130)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('waiting', flush=True)\n"
        "time.sleep(600)\n"
    )
    slow = _ray(
        *submit, "--submission-id", "slow", "--no-wait", "--", "python", str(slow_stopper), env=env
    )
    assert slow.returncode == 0, (slow.stdout + slow.stderr)[-3000:]
    deadline = time.monotonic() + 120
    while "waiting" not in _ray("job", "logs", f"--address={address}", "slow", env=env).stdout:
        assert time.monotonic() < deadline, "the slow-stopping job never started"
        time.sleep(1)
    assert _ray("job", "stop", f"--address={address}", "slow", env=env).returncode == 0
    log = _ray("job", "logs", f"--address={address}", "slow", env=env).stdout
    assert log.strip().splitlines()[-1] == "stopped after 5 s", log[-2000:]


def test_a_stopped_run_says_what_it_kept_and_resumes(tmp_path):
    """SIGTERM (what `ray job stop` sends) during stage 2: exit 130, one plain line naming what
    the output keeps, no stack dump, the lock released; the same command then resumes."""
    out = tmp_path / "out"
    argv = [
        sys.executable, "jobs/distill.py", "--config", "tiny", "--output", str(out),
        "--set", "solve.candidates_per_class=20", "--set", "solve.max_actors=1",
        "--set", "admm.outer_iters=10",  # 5 batches of ~6 s: the stop lands mid-solve
    ]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not list((out / "solves").glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.5)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"distill.py: stopped by SIGTERM; {out} keeps targets.safetensors, ")
    assert "re-run the same command to resume" in last
    assert "SIGTERM received" not in err and "Traceback" not in err
    assert not (out / LOCK_FILE).exists()
    again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already done" in again.stdout and "0 already done" not in again.stdout
    # A healthy run (stages 2 and 3 on Ray Data actor pools) prints no error-level line.
    assert not ERROR_LEVEL.search(again.stderr), again.stderr[-3000:]


def test_the_readme_token_command_writes_a_private_file_and_prints_nothing(tmp_path):
    """README step 1, as written, in a fresh HOME: the token file is mode 0600 (Ray's own
    --generate writes 0644) and the token is not printed."""
    readme = (REPO / "README.md").read_text()
    (line,) = [
        ln for ln in readme.splitlines() if "get-auth-token --generate" in ln and "umask" in ln
    ]
    command = line.split("#")[0].strip()
    env = {**os.environ, "HOME": str(tmp_path)}
    done = subprocess.run(
        ["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    token = (tmp_path / ".ray" / "auth_token").read_text().strip()
    assert len(token) >= 32
    assert (tmp_path / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600
    assert token not in done.stdout + done.stderr
