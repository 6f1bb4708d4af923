"""Scaling suite: Ray stage 2 (``distributed.solve.run_solve``, tiny model, CPU actors) with 1
and 2 actors. The only suite that imports Ray (lazily: skipped where Ray is not importable)."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict

import torch

from gradmm_ray.bench.harness import goal
from gradmm_ray.bench.workload import Settings
from gradmm_ray.core.lm import CausalLM

HELP = """\
  scaling     Ray stage 2 (gradmm_ray.distributed.solve.run_solve, tiny model, CPU actors) with 1 and 2
              actors on a local ray.init(num_cpus=4), 96 work items against random targets in
              the default (label_rows) space; skipped when Ray is not importable.
              fields: examples_per_s {1, 2}: the stage's steady rate, items solved after the
                first result (less each actor's first batch) / time after the first result;
                stage2.scaling_2_actors = examples_per_s(2) / examples_per_s(1);
                first_result_seconds {1, 2} (actor start-up, model load, one batch) and seconds
                {1, 2} (whole run); end_to_end_examples_per_s and end_to_end_scaling_2_actors
                (start-up included). Goal: scaling_2_actors >= 1.7. Each actor takes one CPU,
                so the goal needs two idle cores besides the driver and Ray's own processes.
"""


def suite(s: Settings, quick: bool, lm: CausalLM | None) -> dict:
    try:
        import ray
        import ray.data
    except ImportError:
        return {"skipped": "ray is not importable in this environment"}
    from gradmm_ray.config import build_config
    from gradmm_ray.core.lm import load_causal_lm
    from gradmm_ray.core.target_space import target_space
    from gradmm_ray.distributed.solve import run_solve
    from gradmm_ray.io.storage import OutputDir

    tiny = load_causal_lm("tiny", dtype="float32", device="cpu")  # builds the cache entry once
    verbalizers = build_config({"model": {"name": "tiny"}}).data.verbalizers
    space = target_space("label_rows", tiny, verbalizers)  # the default target space
    g = torch.Generator().manual_seed(5)
    targets = {
        label: {"weight": torch.randn(space.W.shape, generator=g) * 1e-3} for label in verbalizers
    }
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ctx = ray.data.DataContext.get_current()  # no Ray Data progress bars or start banners
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    def solve_with(actors: int, per_class: int):
        """One run_solve into a fresh temporary output directory."""
        with tempfile.TemporaryDirectory() as tmp:
            cfg = build_config(
                {
                    "model": {"name": "tiny", "dtype": "float32", "device": "cpu"},
                    "admm": {**asdict(s.scaling_admm), "rho": [1.0]},
                    "targets": {"gradient": "label_rows"},  # the targets above
                    "solve": {
                        "candidates_per_class": per_class,
                        "batch_size": s.scaling_batch,
                        "min_actors": actors,
                        "max_actors": actors,
                        "num_gpus": 0,
                        "num_cpus": 1,
                    },
                    "output": tmp,
                }
            )
            return run_solve(targets, cfg, OutputDir(tmp))

    items = len(verbalizers) * s.scaling_per_class
    runs = {}
    try:
        if s.scaling_warmup:  # Ray Data's first execution in a session pays one-off costs
            solve_with(1, 1)
        for actors in (1, 2):
            runs[str(actors)] = stats = solve_with(actors, s.scaling_per_class)
            assert stats.solved == items, (stats.solved, items)
    finally:
        if started:
            ray.shutdown()
    rate, end_to_end = {}, {}
    for actors, stats in runs.items():
        # After the first result: every actor is up and past its first batch.
        steady_items = items - int(actors) * s.scaling_batch
        rate[actors] = steady_items / (stats.seconds - stats.first_result_seconds)
        end_to_end[actors] = items / stats.seconds
    out = {
        "examples_per_s": rate,
        "scaling_2_actors": rate["2"] / rate["1"],
        "first_result_seconds": {a: st.first_result_seconds for a, st in runs.items()},
        "seconds": {a: st.seconds for a, st in runs.items()},
        "end_to_end_examples_per_s": end_to_end,
        "end_to_end_scaling_2_actors": end_to_end["2"] / end_to_end["1"],
        "items": items,
        "cores": os.cpu_count(),
        "settings": {
            "model": "tiny",
            "warmup_run": s.scaling_warmup,
            "batch_size": s.scaling_batch,
            "admm": asdict(s.scaling_admm),
        },
    }
    out["goals"] = {"scaling_2_actors": goal(out["scaling_2_actors"], ">=", 1.7)}
    out["_into"] = {"stage2": {"scaling_2_actors": out["scaling_2_actors"]}}
    return out
