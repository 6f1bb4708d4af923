"""The finetune job as a recipe: prepare (every user-input check, the splits, before Ray
starts), plan (the training sets and one run per method, seed and learning rate), run (on Ray
Train, ``distributed/train.py``), write the report (``report.py``).

Protocol (paper Table 1): full fine-tuning for ``steps`` steps, global batch ``batch_size``, AdamW
with a linear decay to 0, the learning rate from a grid, an evaluation every ``eval_every`` steps
(``core/training.py``). Unlike the reference code, the learning rate and the checkpoint are chosen
on a DEV split; the TEST split is only read at that choice (``report.choose_on_dev``). The splits
and baselines: ``splits.py``; the gradient error: ``core/gradient_error.py``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from gradmm_ray.config import DataConfig, build_typed
from gradmm_ray.core.gradient_error import capped
from gradmm_ray.core.text import check_verbalizers
from gradmm_ray.core.training import EvalSets, Example, RunSpec
from gradmm_ray.errors import ConfigError, OutputError
from gradmm_ray.finetune.config import (
    SYNTHETIC,
    FinetuneConfig,
    FinetuneError,
    load_deepspeed_config,
)
from gradmm_ray.finetune.examples import (
    has_named_splits,
    read_split,
    read_train_file,
    training_examples,
)
from gradmm_ray.finetune.report import (
    METRICS_FILE,
    FinetuneSummary,
    metrics_document,
    n_train_of,
    summarise,
    write_outputs,
)
from gradmm_ray.finetune.splits import (
    check_budget,
    class_budget,
    coreset_subset,
    drop_held_out_duplicates,
    random_subset,
    split_rows,
)
from gradmm_ray.io.real_data import load_real_examples, looks_like_path
from gradmm_ray.io.storage import OutputDir, check_output_location


@dataclass(frozen=True)
class PreparedJob:
    cfg: FinetuneConfig
    train_set: list[Example]
    pool: list[Example]
    dev: list[Example]
    test: list[Example]
    generation: list[Example] | None  # pool rows the --train set was generated from (if known)
    split_info: dict[str, Any]
    deepspeed: dict[str, Any] | None


def read_manifest(train_path: str) -> dict[str, Any] | None:
    """manifest.json beside the --train file (written by distill.py), when there is one."""
    parent = train_path.rstrip("/").rsplit("/", 1)[0] if "/" in train_path else "."
    try:
        out = OutputDir(parent)
        return out.read_json("manifest.json") if out.exists("manifest.json") else None
    except (OSError, ValueError):
        return None


def manifest_defaults(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """A lowest-precedence config layer from the generation run: the same templates, label words
    and model, so that the evaluation scores the label words the set was generated with."""
    if not manifest or "config" not in manifest:
        return {}
    data = manifest["config"].get("data", {})
    keys = ("text_column", "label_column", "label_names", "prompt_template", "verbalizers")
    layer: dict[str, Any] = {"data": {k: data[k] for k in keys if k in data}}
    if "name" in manifest["config"].get("model", {}):
        layer["model"] = {"name": manifest["config"]["model"]["name"]}
    return layer


def generation_rows(manifest: dict[str, Any] | None, data: DataConfig) -> list[int] | None:
    """Rows of data.split the --train set was generated from: the generation run's own seeded
    sample, reproduced; None when it used another source or split (or there is no manifest)."""
    if not manifest or "config" not in manifest:
        return None
    gen = manifest["config"].get("data", {})

    def same(a: str, b: str) -> bool:
        return a == b or (
            looks_like_path(a) and looks_like_path(b) and os.path.abspath(a) == os.path.abspath(b)
        )

    if not same(str(gen.get("source")), data.source) or gen.get("split") != data.split:
        return None
    try:
        gen_cfg = build_typed(DataConfig, [gen], lambda _: [])
    except ConfigError:
        return None
    real = load_real_examples(gen_cfg, int(manifest["config"].get("seed", 0)))
    return real.table.column("row").to_pylist()


def prepare_job(cfg: FinetuneConfig, *, overwrite: bool) -> PreparedJob:
    """Read and check the inputs, make the splits. Writes nothing; raises a user-facing error."""
    from gradmm_ray.core.lm import load_tokenizer
    from gradmm_ray.models.sources import resolve_model_source

    check_output_location(cfg.output)
    out = OutputDir(cfg.output)
    if out.exists(METRICS_FILE) and not overwrite:
        raise OutputError(
            f"output {out.uri!r} already holds {METRICS_FILE}; pass --overwrite to replace it"
        )
    table, shown = read_train_file(cfg.train)
    train_set = training_examples(table, cfg.data, loss=cfg.protocol.loss, shown=shown)
    tokenizer = load_tokenizer(
        resolve_model_source(cfg.model.name), cfg.model.revision, cfg.model.trust_remote_code
    )
    check_verbalizers(tokenizer, cfg.data.verbalizers)
    ds = (
        load_deepspeed_config(cfg.workers.deepspeed_config)
        if cfg.workers.strategy == "deepspeed"
        else None
    )

    manifest = read_manifest(cfg.train)
    gen_rows = generation_rows(manifest, cfg.data)
    train_rows, train_texts = read_split(cfg.data, cfg.data.split)
    labels = [ex.label for ex in train_rows]
    named = has_named_splits(cfg.data.source) and cfg.splits.test_split is not None
    if named and cfg.splits.test_split == cfg.data.split:
        raise FinetuneError(
            f"splits.test_split {cfg.splits.test_split!r} is data.split: TEST must be another split"
        )
    rows = split_rows(
        labels,
        dev_size=cfg.splits.dev_size,
        test_size=None if named else cfg.splits.test_size,
        seed=cfg.splits.seed,
        generation_rows=gen_rows or (),
    )
    if named:
        test, test_texts = read_split(cfg.data, cfg.splits.test_split)
    else:
        test = [train_rows[i] for i in rows.test]
        test_texts = [train_texts[i] for i in rows.test]
    dev = [train_rows[i] for i in rows.dev]
    pool, dropped = drop_held_out_duplicates(
        [train_rows[i] for i in rows.pool],
        [train_texts[i] for i in rows.pool],
        [*test_texts, *(train_texts[i] for i in rows.dev)],
    )
    generation = None
    if gen_rows is not None:
        in_pool = {f"{cfg.data.split}:{r}" for r in gen_rows}
        generation = [ex for ex in pool if ex.origin in in_pool]
    split_info = {
        "source": cfg.data.source,
        "train_split": cfg.data.split,
        "test_split": cfg.splits.test_split
        if named
        else f"{cfg.splits.test_size} rows carved from {cfg.data.split}",
        "pool": len(pool),
        "dev": len(dev),
        "test": len(test),
        "pool_rows_dropped_as_duplicates_of_held_out_text": dropped,
        "generation_rows_known": gen_rows is not None,
        "generation_rows": len(gen_rows) if gen_rows is not None else None,
        "dev_rows_used_by_generation": rows.dev_generation_overlap,
        "split_seed": cfg.splits.seed,
    }

    budget = class_budget(train_set)
    pool_labels = [ex.label for ex in pool]
    for name in cfg.baselines:
        if name in ("random", "herding", "kcenter"):
            check_budget(pool_labels, budget, f"baseline {name!r}")
        if name == "same-real" and not generation:
            raise FinetuneError(
                "baseline 'same-real': the real rows the --train set was generated from are unknown "
                "(needs manifest.json beside --train naming the same data.source and data.split)"
            )
    if cfg.protocol.loss == "classification" and len(dev) == 0:
        raise FinetuneError("the dev split is empty")
    return PreparedJob(cfg, train_set, pool, dev, test, generation, split_info, ds)


# ---------------------------------------------------------------------------------------------
# Planning the runs


def plan_runs(
    prep: PreparedJob, embeddings: Tensor | None
) -> tuple[dict[str, list[Example]], list[RunSpec]]:
    """The training sets (random differs per seed) and one run per (method, seed, lr); zero-shot
    is one evaluation (it has no randomness)."""
    cfg, p = prep.cfg, prep.cfg.protocol
    budget = class_budget(prep.train_set)
    labels = [ex.label for ex in prep.pool]
    sets: dict[str, list[Example]] = {SYNTHETIC: list(prep.train_set)}
    set_of: dict[str, dict[int, str]] = {SYNTHETIC: dict.fromkeys(p.seeds, SYNTHETIC)}
    for name in cfg.baselines:
        if name == "random":
            set_of[name] = {}
            for seed in p.seeds:
                idx = random_subset(labels, budget, seed)
                sets[f"random@{seed}"] = [prep.pool[i] for i in idx]
                set_of[name][seed] = f"random@{seed}"
        elif name in ("herding", "kcenter"):
            if embeddings is None:
                raise AssertionError("Internal error: herding/kcenter need pool embeddings")
            idx = coreset_subset(labels, embeddings, budget, name)
            sets[name] = [prep.pool[i] for i in idx]
            set_of[name] = dict.fromkeys(p.seeds, name)
        elif name == "full":
            sets[name] = list(prep.pool)
            set_of[name] = dict.fromkeys(p.seeds, name)
        elif name == "same-real":
            sets[name] = list(prep.generation or [])
            set_of[name] = dict.fromkeys(p.seeds, name)
    runs = []
    if "zero-shot" in cfg.baselines:
        runs.append(RunSpec("zero-shot", "", p.seeds[0], 0.0, 0))
    order = [SYNTHETIC, *(b for b in cfg.baselines if b != "zero-shot")]
    for name in order:
        for seed in p.seeds:
            for lr in p.lrs:
                runs.append(RunSpec(name, set_of[name][seed], seed, lr, p.steps))
    return sets, runs


# ---------------------------------------------------------------------------------------------
# Running: Ray Train, then the report


def run_job(prep: PreparedJob) -> FinetuneSummary:
    """Embeddings (if needed) -> plan -> train and evaluate on Ray -> metrics, results, plots."""
    import ray

    from gradmm_ray.distributed.ray_env import init_ray
    from gradmm_ray.distributed.train import (
        TrainingJob,
        embed_prompts,
        run_training,
        storage_for,
        worker_gpus,
    )

    cfg = prep.cfg
    started = time.perf_counter()
    cluster, started_ray = init_ray()
    try:
        embeddings = None
        if {"herding", "kcenter"} & set(cfg.baselines):
            embeddings = embed_prompts(
                cfg.model, [ex.prompt for ex in prep.pool], worker_gpus(cfg.workers)
            )
        sets, runs = plan_runs(prep, embeddings)
        job = TrainingJob(
            model=cfg.model,
            data=cfg.data,
            protocol=cfg.protocol,
            workers=cfg.workers,
            deepspeed=prep.deepspeed,
            sets=sets,
            runs=runs,
            evals=EvalSets(
                dev=prep.dev,
                test=prep.test,
                grad_reference=capped(prep.pool, cfg.splits.grad_error_rows, seed=cfg.splits.seed),
            ),
            grad_error_rows=cfg.splits.grad_error_rows,
        )
        histories = run_training(
            job, storage_path=storage_for(cfg.output), name=f"finetune-{int(time.time())}"
        )
    finally:
        if started_ray:
            ray.shutdown()
    runs_summary = summarise(histories, n_train_of(sets, runs), cfg.protocol.seeds)
    notes = []
    if cfg.model.name == "tiny":
        notes.append(
            "The tiny offline model is not Phi-1.5: the paper's learning rates (7e-6..1.5e-5) barely "
            "move its weights, so use --lrs with larger values (e.g. 1e-3) for it."
        )
    seconds = time.perf_counter() - started
    metrics = metrics_document(
        runs_summary, cfg=cfg, split_info=prep.split_info, seconds=seconds, notes=notes
    )
    files = write_outputs(OutputDir(cfg.output), metrics, histories)
    return FinetuneSummary(cfg.output, cluster, files, runs_summary, seconds)
