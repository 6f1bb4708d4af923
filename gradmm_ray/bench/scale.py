"""Scale suite: stage 1 streaming generated Parquet from 10k to 1M rows (tiny model, CPU actors).

Each measurement runs in a fresh child process (``python -m gradmm_ray.bench.scale TASK``), so
that the driver's peak RSS is that run's own. ``ours`` is ``targets.clean_class_sums`` (the
stream, the actors' clipped sums, the driver's reduce and exactly-once check); ``forward_only``
streams the same rows through the same pool with an actor that only tokenises and runs the
model's forward pass to the head inputs (the floor: no gradient, no clipping, no reduce).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradmm_ray.bench.harness import goal

HELP = """\
  scale       Stage 1 at data-lake sizes: generated Parquet (files of <= 100k rows, row groups
              of 16,384) at rows {10k, 100k, 1M} (quick: {2k, 20k}), tiny model, 2 CPU actors,
              each run in a fresh child process.
              fields: per size: driver_peak_rss_mb (the child's VmHWM, Ray and torch
                included), rows_per_s (stage 1 alone, ray.init excluded) and
                forward_only_rows_per_s (the same stream and pool, the model's forward only);
                stage1.driver_rss_growth = peak RSS at the largest size / at the smallest;
                stage1.fraction_of_forward_only_stream = rows_per_s / forward_only_rows_per_s
                at the largest size; cluster: the same stage 1 on a 3-node
                ray.cluster_utils.Cluster (a 0-CPU head and two 1-CPU workers) at 100k rows
                (quick: 20k). Goals: driver_rss_growth <= 1.25, fraction >= 0.8.
"""

WORDS = [
    "film",
    "movie",
    "plot",
    "cast",
    "score",
    "scenes",
    "acting",
    "story",
    "director",
    "script",
    "pace",
    "ending",
    "humor",
    "warm",
    "dull",
    "clever",
    "flat",
    "superb",
    "tedious",
    "gripping",
    "lifeless",
    "charming",
    "bland",
    "moving",
    "silly",
]


def write_lake(folder: Path, rows: int, *, rows_per_file: int = 100_000) -> None:
    """Parquet files of generated reviews (seeded), labels alternating."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(rows)
    for start in range(0, rows, rows_per_file):
        n = min(rows_per_file, rows - start)
        words = rng.choice(WORDS, size=(n, 12))
        texts = [" ".join(w).capitalize() + "." for w in words]
        labels = np.where(np.arange(start, start + n) % 2 == 0, "positive", "negative")
        pq.write_table(
            pa.table({"text": texts, "label": labels}),
            folder / f"part-{start // rows_per_file:05d}.parquet",
            row_group_size=16_384,
        )


class ForwardOnly:
    """Ray Data actor: the floor. The same tokenisation and micro-batches as stage 1's actor,
    the model's forward to the head inputs, nothing else."""

    def __init__(self, cfg):
        from gradmm_ray.core.lm import load_model

        self.lm = load_model(cfg.model, progress=False)
        self.cfg = cfg

    def __call__(self, batch: dict) -> dict:
        import torch

        from gradmm_ray.core.text import encode_pair

        d = self.cfg.data
        with torch.no_grad():
            for start in range(0, len(batch["text"]), self.cfg.targets.micro_batch_size):
                pairs = [
                    encode_pair(
                        self.lm.tokenizer,
                        str(t),
                        d.verbalizers[str(lab)],
                        template=d.prompt_template,
                    )
                    for t, lab in zip(
                        batch["text"][start : start + self.cfg.targets.micro_batch_size],
                        batch["label"][start : start + self.cfg.targets.micro_batch_size],
                        strict=True,
                    )
                ]
                self.lm.completion_states(pairs)
        return {"rows": np.array([len(batch["text"])])}


def child(task: dict) -> dict:
    """One measurement (in a fresh process): ``task`` = {mode, data, cluster}."""
    import ray

    from gradmm_ray.config import ExecutionConfig, build_config, load_yaml
    from gradmm_ray.distributed.ray_env import configure_ray_data, map_on_actor_pool
    from gradmm_ray.distributed.real_rows import stream_for_pool
    from gradmm_ray.distributed.targets import clean_class_sums
    from gradmm_ray.io.real_data import check_head, plan_source
    from gradmm_ray.presets import resolve_config_path

    cluster = None
    if task["cluster"]:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    else:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    cfg = build_config(
        load_yaml(resolve_config_path("tiny")),
        {
            "data": {"source": task["data"]},
            "model": {"device": "cpu"},
            "privacy": {"epsilon": float("inf")},
            "targets": {"min_actors": 2, "max_actors": 2, "num_gpus": 0, "num_cpus": 1},
            "output": "unused",
        },
    )
    configure_ray_data(ExecutionConfig())
    plan = plan_source(cfg.data)
    bytes_per_row = check_head(plan, cfg.data)
    t0 = time.perf_counter()
    if task["mode"] == "ours":
        clean_class_sums(plan, cfg, bytes_per_row=bytes_per_row)
    else:
        t = cfg.targets
        stream = stream_for_pool(plan, cfg.data, t, seed=0, bytes_per_row=bytes_per_row)
        ds = map_on_actor_pool(
            stream.rows,
            ForwardOnly,
            constructor_kwargs={"cfg": cfg},
            pool=t,
            batch_size=stream.per_call,
            execution=cfg.execution,
        )
        for _ in ds.iter_batches(batch_size=None):
            pass
    seconds = time.perf_counter() - t0
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
    return {"seconds": seconds, "driver_peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over from
    the parent across fork + exec, so a child would report at least its parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def _measure(mode: str, data: Path, cluster: bool = False) -> dict:
    task = json.dumps({"mode": mode, "data": str(data), "cluster": cluster})
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "gradmm_ray.bench.scale", task],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"scale child {mode} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def suite(s, quick: bool, lm=None) -> dict:
    sizes = (2_000, 20_000) if quick else (10_000, 100_000, 1_000_000)
    cluster_rows = 20_000 if quick else 100_000
    out: dict = {"sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            folder = Path(tmp) / str(n)
            write_lake(folder, n)
            ours, floor = _measure("ours", folder), _measure("forward", folder)
            out["sizes"][str(n)] = {
                "driver_peak_rss_mb": ours["driver_peak_rss_mb"],
                "rows_per_s": n / ours["seconds"],
                "forward_only_rows_per_s": n / floor["seconds"],
                "seconds": ours["seconds"],
            }
            print(f"  scale {n:>9,} rows: {out['sizes'][str(n)]}", flush=True)
        folder = Path(tmp) / f"cluster-{cluster_rows}"
        write_lake(folder, cluster_rows, rows_per_file=cluster_rows // 4)
        run = _measure("ours", folder, cluster=True)
        out["cluster"] = {
            "rows": cluster_rows,
            "nodes": 3,
            "rows_per_s": cluster_rows / run["seconds"],
            **run,
        }
    small, large = out["sizes"][str(sizes[0])], out["sizes"][str(sizes[-1])]
    out["driver_rss_growth"] = large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"]
    out["fraction_of_forward_only_stream"] = large["rows_per_s"] / large["forward_only_rows_per_s"]
    out["goals"] = {
        "driver_rss_growth": goal(out["driver_rss_growth"], "<=", 1.25),
        "fraction_of_forward_only_stream": goal(out["fraction_of_forward_only_stream"], ">=", 0.8),
    }
    out["_into"] = {
        "stage1": {
            "driver_rss_growth": out["driver_rss_growth"],
            "fraction_of_forward_only_stream": out["fraction_of_forward_only_stream"],
        }
    }
    return out


if __name__ == "__main__":
    from gradmm_ray.env import set_defaults

    set_defaults(offline=True)
    print(json.dumps(child(json.loads(sys.argv[1]))), flush=True)
