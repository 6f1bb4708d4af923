"""The opt-in audit on Ray (OUTSIDE THE DP GUARANTEE: distill/audit.py says why and what).

The real rows stream as in stage 1 (same files, same caps) through a pool of actors sized like
stage 1's; each actor embeds its block and answers, for every selected row, the nearest real
row and the longest shared token run in that block. The driver folds the answers: it never
holds the real rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from gradmm_ray.config import Config
from gradmm_ray.core.lm import load_model
from gradmm_ray.distill.audit import RealNeighbours, audit_table, merge_answers
from gradmm_ray.distributed.ray_env import map_on_actor_pool
from gradmm_ray.distributed.real_rows import stream_for_pool
from gradmm_ray.io.real_data import SourcePlan


class NearestRealRows:
    """Ray Data actor: a block of real rows in, one row per selected example out (its index,
    the block's nearest row's key and distance, the longest shared run)."""

    def __init__(self, cfg: Config, queries: list[str]):
        self.neighbours = RealNeighbours(load_model(cfg.model, progress=False), queries)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index, dist, ngram = self.neighbours.block([str(t) for t in batch["text"]])
        index = index.numpy()
        return {
            "query": np.arange(len(ngram)),
            "key": batch["key"][index].astype(np.uint64),
            "distance": dist.double().numpy(),
            "ngram": np.asarray(ngram, dtype=np.int64),
        }


def run_audit(
    plan: SourcePlan, selected: list[dict], cfg: Config, *, bytes_per_row: float
) -> pa.Table:
    t = cfg.targets
    stream = stream_for_pool(plan, cfg.data, t, seed=cfg.seed, bytes_per_row=bytes_per_row)
    answers = map_on_actor_pool(
        stream.rows,
        NearestRealRows,
        constructor_kwargs={"cfg": cfg, "queries": [r["text"] for r in selected]},
        pool=t,
        batch_size=stream.per_call,
        execution=cfg.execution,
    )
    best: dict[int, dict] = {}
    for part in answers.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in part.to_pylist():
            best[row["query"]] = merge_answers(best.get(row["query"]), row)
    files = {f.file_index: f.shown for f in plan.fragments}
    return audit_table(
        selected, [best[q] for q in range(len(selected))], [files[i] for i in sorted(files)]
    )
