"""Stage 2 on Ray: work items -> an autoscaling pool of solver actors -> solves/*.parquet.

A work item is (synthetic_id, label, rho, seed); its randomness comes from (seed, synthetic_id)
only. Items stream through ``map_batches`` to actors that load the model once and get the
released targets from the object store once. The driver writes each finished batch as its own
Parquet file, atomically, so a killed actor, node or driver loses no finished solve and
duplicates none: re-running the same command skips every (synthetic_id, rho) already written.
"""

from __future__ import annotations

import time
import uuid
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch

from gradmm_ray.config import Config
from gradmm_ray.core.admm import SequenceLayout, Target, solve_batch
from gradmm_ray.core.lm import load_model
from gradmm_ray.core.projection import allowed_token_mask
from gradmm_ray.core.target_space import target_space
from gradmm_ray.distributed.ray_env import StageBar, map_on_actor_pool
from gradmm_ray.errors import OutputError
from gradmm_ray.io.storage import OutputDir, OutputWarning, is_own

SOLVES_DIR = "solves"


@dataclass(frozen=True)
class WorkItem:
    synthetic_id: int
    label: str
    rho: float
    seed: int


def work_items(labels: list[str], cfg: Config) -> list[WorkItem]:
    """Every (synthetic_id, rho): ids are dense per label, in the sorted order of labels."""
    per = cfg.solve.candidates_per_class
    return [
        WorkItem(k * per + j, label, float(rho), cfg.seed)
        for k, label in enumerate(sorted(labels))
        for j in range(per)
        for rho in cfg.admm.rho
    ]


def pending_items(items: list[WorkItem], done: set[tuple[int, float]]) -> list[WorkItem]:
    return [it for it in items if (it.synthetic_id, it.rho) not in done]


def finished_keys(out: OutputDir) -> set[tuple[int, float]]:
    """(synthetic_id, rho) of every solve already written. A part that cannot be read (writes
    are atomic, so only a damaged disk or copy truncates one) is deleted with a warning: its
    items are not finished, so they are solved again."""
    tables, damaged = _read_parts(out, columns=["synthetic_id", "rho"])  # the keys only
    for rel in damaged:
        warnings.warn(
            f"{out.uri}/{rel} is unreadable; deleting it and solving its items again",
            OutputWarning,
            stacklevel=2,
        )
        out.delete(rel)
    return {
        (i, rho)
        for t in tables
        for i, rho in zip(
            t.column("synthetic_id").to_pylist(), t.column("rho").to_pylist(), strict=True
        )
    }


def read_solves(out: OutputDir) -> pa.Table | None:
    tables, damaged = _read_parts(out)
    if damaged:
        raise OutputError(
            f"{out.uri}/{damaged[0]} is unreadable; run the solve stage again (--stages solve,select) to recompute its items"
        )
    return pa.concat_tables(tables) if tables else None


def _read_parts(
    out: OutputDir, columns: list[str] | None = None
) -> tuple[list[pa.Table], list[str]]:
    """(tables of the readable parts, names of the unreadable ones); only parts a run wrote."""
    tables, damaged = [], []
    for rel in out.list(SOLVES_DIR, ".parquet"):
        if not is_own(rel):
            continue
        try:
            tables.append(out.read_parquet(rel, columns))
        except (OSError, pa.ArrowException):
            damaged.append(rel)
    return tables, damaged


class AdmmSolver:
    """Ray Data actor: a batch of work items in, one row per solved item out."""

    def __init__(self, cfg: Config, targets_ref: list):
        import ray

        self.lm = load_model(cfg.model, progress=False)
        released = ray.get(targets_ref[0])  # once per actor, from the object store
        dev = self.lm.device
        self.targets = {
            label: Target(t["weight"].to(dev), t["bias"].to(dev) if "bias" in t else None)
            for label, t in released.items()
        }
        d = cfg.data
        self.layouts = {
            label: SequenceLayout.build(
                self.lm.tokenizer,
                d.prompt_template,
                d.verbalizers[label],
                d.generation_prefix.format(label=label),
                d.generation_chat,
            )
            for label in released
        }
        self.allowed = allowed_token_mask(
            self.lm.tokenizer, self.lm.vocab_size, word_like_only=cfg.admm.word_like_only
        )
        self.admm = cfg.admm
        self.space = target_space(cfg.targets.gradient, self.lm, cfg.data.verbalizers)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows: dict[str, list] = {
            k: []
            for k in (
                "synthetic_id",
                "label",
                "rho",
                "seed",
                "token_ids",
                "text",
                "match_loss",
                "initial_match_loss",
                "best_iter",
                "loss_curve",
                "projected_loss_curve",
                "residual_curve",
                "solve_seconds",
            )
        }
        labels = [str(x) for x in batch["label"]]
        for label in sorted(set(labels)):  # one label per solve: one layout, one target
            idx = [i for i, lab in enumerate(labels) if lab == label]
            seeds = {int(batch["seed"][i]) for i in idx}
            for seed in sorted(seeds):
                sub = [i for i in idx if int(batch["seed"][i]) == seed]
                items = [(int(batch["synthetic_id"][i]), float(batch["rho"][i])) for i in sub]
                for r in solve_batch(
                    self.lm,
                    self.layouts[label],
                    self.targets[label],
                    items,
                    self.admm,
                    seed=seed,
                    allowed=self.allowed,
                    space=self.space,
                ):
                    rows["synthetic_id"].append(r.synthetic_id)
                    rows["label"].append(label)
                    rows["rho"].append(r.rho)
                    rows["seed"].append(seed)
                    rows["token_ids"].append(r.token_ids)
                    rows["text"].append(
                        self.lm.tokenizer.decode(r.token_ids, skip_special_tokens=True).strip()
                    )
                    rows["match_loss"].append(r.match_loss)
                    rows["initial_match_loss"].append(r.initial_match_loss)
                    rows["best_iter"].append(r.best_iter)
                    rows["loss_curve"].append(r.loss_curve)
                    rows["projected_loss_curve"].append(r.projected_loss_curve)
                    rows["residual_curve"].append(r.residual_curve)
                    rows["solve_seconds"].append(r.seconds)
        return rows


@dataclass
class SolveStats:
    total: int
    skipped: int
    solved: int
    seconds: float
    # Stage start to the first finished batch: actor start-up (on a cluster, GPU nodes coming
    # up), model load, one batch. None when nothing was left to solve.
    first_result_seconds: float | None = None


def run_solve(
    targets: dict[str, dict[str, torch.Tensor]], cfg: Config, out: OutputDir
) -> SolveStats:
    import ray
    import ray.data

    start = time.perf_counter()
    items = work_items(list(targets), cfg)
    todo = pending_items(items, finished_keys(out))
    stats = SolveStats(total=len(items), skipped=len(items) - len(todo), solved=0, seconds=0.0)
    if todo:
        s = cfg.solve
        targets_ref = ray.put(targets)
        items_table = pa.Table.from_pylist([asdict(it) for it in todo])
        solved = map_on_actor_pool(
            items_table,
            AdmmSolver,
            constructor_kwargs={"cfg": cfg, "targets_ref": [targets_ref]},
            pool=s,
            batch_size=s.batch_size,
            execution=cfg.execution,
        )
        with StageBar(
            total=len(items),
            initial=stats.skipped,
            desc="solve: synthetic examples",
            unit="ex",
            model=cfg.model.name,
        ) as bar:
            for batch in solved.iter_batches(
                batch_size=None, batch_format="pyarrow", prefetch_batches=0
            ):
                out.write_parquet(f"{SOLVES_DIR}/part-{uuid.uuid4().hex}.parquet", batch)
                if stats.first_result_seconds is None:
                    stats.first_result_seconds = time.perf_counter() - start
                stats.solved += batch.num_rows
                bar.update(batch.num_rows)
    stats.seconds = time.perf_counter() - start
    return stats
