"""The benchmark's harness, independent of the CLI and of any suite: device sync, peak memory,
fresh child processes per measured method, goals, the run's meta, printing, and ``run``, which
runs named suites and merges their results into the JSON file.

A suite is a function ``(settings, quick, lm) -> dict`` registered as ``Suite``; a method
measured in a child process is named by ``"module:function"`` so that the child finds it without
this module knowing the suites. Run as ``python -m gradmm_ray.bench.harness TASK OUT`` it is that
child.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gradmm_ray.bench.workload import (
    FULL,
    MODEL_SHAPE,
    QUICK,
    Settings,
    build_lm,
    settings_from_dict,
)
from gradmm_ray.core.lm import CausalLM, pick_device

COMMON_HELP = """\
every suite also records: device, measured_at, quick, settings, suite_seconds,
  goals {field: {target, value, met}} and load_average [1-min load before, after]: other
  processes on the machine slow the timings down, and not all methods equally.
meta (of the latest run): torch / transformers / python versions, device, cpu_count,
  torch_threads, date, model shape, suites_run, quick, total_seconds.
--quick: small sizes (16 stage-1 examples, a 2-example 1-iteration solve, n = 16 projection,
  4 scaling items) and each suite's methods in one child: a smoke test, figures indicative only.
"""


def device() -> torch.device:
    """Where the benchmark runs: CUDA when available, else CPU."""
    return pick_device("auto")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Peak memory


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc malloc_trim) so that RSS tracks live memory."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: RSS may over-count
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


CPU_MEMORY_METHOD = (
    "CPU: each method runs in a fresh child process that builds the model and inputs first; "
    "freed heap memory is returned to the OS (malloc_trim) before the baseline; "
    "peak = the kernel's peak RSS (VmHWM, reset through /proc/self/clear_refs: exact, no "
    "overhead) or, where that reset is not allowed, the max of the RSS sampled every 1 ms by a "
    "psutil thread; minus the RSS just before the method's warm-up; over warm-up and timed runs."
)
CUDA_MEMORY_METHOD = (
    "CUDA: each method in a fresh child process; torch.cuda.max_memory_allocated() minus "
    "memory_allocated() just before the method's warm-up, over warm-up and timed runs."
)


class PeakMemory:
    """Peak memory above the level at entry, bytes, over a ``with`` block (*_MEMORY_METHOD)."""

    def __init__(self, dev: torch.device):
        self.device = dev
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return self
        _release_free_memory()
        self.base = self._max = _rss()
        self._hwm_ok = _reset_hwm()
        self._thread = None
        if not self._hwm_ok:  # fallback: a sampler (it competes for the GIL and the cores)
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._max = max(self._max, _rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        top = max(self._max, _rss(), _hwm() if self._hwm_ok else 0)
        self.peak = max(0, top - self.base)


def memory_method(quick: bool) -> str:
    text = CUDA_MEMORY_METHOD if device().type == "cuda" else CPU_MEMORY_METHOD
    if quick:
        text += " --quick: all methods of the suite in ONE child, in order; indicative only."
    return text


# ---------------------------------------------------------------------------------------------
# One method per fresh process

# A method runner: (benchmark LM, settings, method name) -> its result (picklable by torch.save).
MethodRunner = Callable[[CausalLM, Settings, str], dict]


def measure(runner: str, methods: list[str], s: Settings, *, one_process_each: bool) -> dict:
    """{method: result} of the ``"module:function"`` runner (a ``MethodRunner``), each method in
    a fresh child process (or, for --quick, all of them one after another in a single child:
    peaks of later methods may then be understated)."""
    groups = [[m] for m in methods] if one_process_each else [methods]
    results = {}
    for group in groups:
        results.update(
            run_in_fresh_process({"runner": runner, "methods": group, "settings": asdict(s)})
        )
    return results


def run_in_fresh_process(task: dict) -> dict:
    """Run ``child_main(task)`` in a new interpreter, return its result dict."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        cmd = [sys.executable, "-m", __name__, json.dumps(task), out]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"child {task['methods']} failed:\n{proc.stderr[-4000:]}")
        return torch.load(out, weights_only=False)


def child_main(task: dict, out: str) -> None:
    s = settings_from_dict(task["settings"])
    module, name = task["runner"].split(":")
    runner: MethodRunner = getattr(importlib.import_module(module), name)
    lm = build_lm(device())
    torch.save({m: runner(lm, s, m) for m in task["methods"]}, out)


# ---------------------------------------------------------------------------------------------
# Goals, meta, output


def goal(value: float, op: str, threshold: float) -> dict:
    met = value >= threshold if op == ">=" else value <= threshold
    return {"target": f"{op} {threshold:.4g}", "value": value, "met": bool(met)}


def meta() -> dict:
    import transformers

    dev = device()
    V, d = MODEL_SHAPE["vocab_size"], MODEL_SHAPE["hidden_size"]
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            **MODEL_SHAPE,
            "tie_word_embeddings": False,
            "head_params": V * d,
            "dtype": "float32",
            "init": "random (seed 0), Llama-style; token embeddings rescaled to norm ~1.4",
        },
    }


def merge_write(path: Path, results: dict) -> dict:
    """Merge suites into an existing JSON file (a suite's keys replace that suite's old keys)."""
    existing = {}
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except json.JSONDecodeError:
            existing = {}
    for suite, values in results.items():
        existing[suite] = {**existing.get(suite, {}), **values}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(existing, indent=2) + "\n")
    return existing


def fmt(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    if isinstance(value, int) and value > 10_000_000:
        return f"{value / 2**20:.1f} MiB"
    return str(value)


def print_suite(name: str, result: dict) -> None:
    print(f"\n== {name} " + "=" * (76 - len(name)))
    if "skipped" in result:
        print(f"  skipped: {result['skipped']}")
        return
    for key, value in result.items():
        if key in ("goals", "settings", "note", "device", "measured_at", "quick"):
            continue
        if key.endswith("_method"):
            continue
        if isinstance(value, dict):
            inner = ", ".join(
                f"{k}={fmt(v)}" for k, v in value.items() if not isinstance(v, dict | list)
            )
            nested = ", ".join(
                f"{k}: " + " ".join(f"{kk}={fmt(vv)}" for kk, vv in v.items())
                for k, v in value.items()
                if isinstance(v, dict)
            )
            if inner or nested:
                print(f"  {key:<30} {inner or nested}")
        elif isinstance(value, list):
            print(f"  {key:<30} [{', '.join(fmt(v) for v in value[:8])}]")
        else:
            print(f"  {key:<30} {fmt(value)}")
    for key, g in result.get("goals", {}).items():
        status = "met" if g["met"] else "MISSED"
        print(f"  goal {key:<25} {fmt(g['value']):>12} (target {g['target']}): {status}")
    if not result.get("goals"):
        print("  (no goal for this suite)")


# ---------------------------------------------------------------------------------------------
# The runner


@dataclass(frozen=True)
class Suite:
    """A suite: ``run(settings, quick, lm)`` returns its JSON fields; ``lm`` is the shared
    benchmark LM when ``needs_lm``, else None. Fields under the key ``"_into"`` ({suite: fields})
    are merged into other suites' results (scaling writes stage2.scaling_2_actors)."""

    run: Callable[[Settings, bool, CausalLM | None], dict]
    needs_lm: bool = False
    help: str = ""


def run(suites: dict[str, Suite], names: list[str], *, quick: bool, json_path: Path) -> dict:
    """Run the named suites in order, print each, merge all into ``json_path``; the results."""
    s = QUICK if quick else FULL
    torch.manual_seed(0)
    info = {**meta(), "suites_run": names, "quick": quick}
    print(
        f"GRADMM benchmark ({'quick' if quick else 'full'}): device {info['device']}, "
        f"{info['cpu_count']} CPUs, torch {info['torch']}, model V={MODEL_SHAPE['vocab_size']} "
        f"d={MODEL_SHAPE['hidden_size']} layers={MODEL_SHAPE['num_hidden_layers']}"
    )
    results: dict[str, dict] = {"meta": info}
    lm = build_lm(device()) if any(suites[n].needs_lm for n in names) else None
    start = time.perf_counter()
    for name in names:
        t0, load_before = time.perf_counter(), os.getloadavg()[0]
        out = suites[name].run(s, quick, lm)
        for other, fields in out.pop("_into", {}).items():
            results.setdefault(other, {}).update(fields)
        out.update(
            load_average=[load_before, os.getloadavg()[0]],
            device=info["device"],
            measured_at=info["date"],
            quick=quick,
            suite_seconds=time.perf_counter() - t0,
        )
        results[name] = {**results.get(name, {}), **out}
        print_suite(name, results[name])
    results["meta"]["total_seconds"] = time.perf_counter() - start
    merge_write(json_path, results)
    print(f"\nwrote {json_path} ({results['meta']['total_seconds']:.0f} s)")
    return results


if __name__ == "__main__":  # a child process of ``measure``: TASK (JSON) and the output path
    # Through the imported module, not this __main__ copy: one harness in the process.
    from gradmm_ray.bench import harness

    harness.child_main(json.loads(sys.argv[1]), sys.argv[2])
