"""Stage 1 on Ray: real rows -> per-class clipped sums -> ONE noisy release -> targets file.

Ray Data shards the validated rows over an autoscaling pool of actors that hold the model. Each
actor call takes `targets.rows_per_partial` rows, runs them `micro_batch_size` at a time, keeps a
per-class running sum of clipped per-example head gradients (fp32) and emits that partial sum once
per call. Emitting through the dataflow (rather than keeping state in the actor until the end)
makes retries exact: a call that dies is re-run, and its output is counted once. The driver
reduces the partials in float64 as they stream in and adds the noise exactly once
(privacy.release_noisy_means). No per-example vocabulary-sized array leaves an actor.

This is the only stage that reads real examples.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from gradmm_ray.config import Config
from gradmm_ray.data import RealExamples, encode_pair, format_prompt
from gradmm_ray.headgrad import (
    clip_factors,
    clipped_head_grad_sum,
    head_grad_sq_norms,
    head_logits,
    logits_grad,
)
from gradmm_ray.lm import load_model
from gradmm_ray.privacy import PrivacyRecord, noise_generator, privacy_record, release_noisy_means
from gradmm_ray.ray_env import map_on_actor_pool
from gradmm_ray.storage import OutputDir

TARGETS_FILE = "targets.safetensors"
TARGETS_RECORD = "targets.json"


class ClippedHeadGradSums:
    """Ray Data actor: a batch of real rows in, one row per class out (label, count, sums)."""

    def __init__(self, cfg: Config):
        self.lm = load_model(cfg.model, progress=False)
        self.W, self.b = self.lm.head_params_fp32()
        self.tail = self.lm.logits_tail()
        self.template = cfg.data.prompt_template
        self.verbalizers = cfg.data.verbalizers
        self.clip_norm = cfg.privacy.clip_norm
        self.micro = cfg.targets.micro_batch_size

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sums: dict[str, list] = {}  # label -> [weight sum (V, d), bias sum (V,), count]
        texts, labels = batch["text"], batch["label"]
        for start in range(0, len(texts), self.micro):
            chunk_labels = [str(x) for x in labels[start : start + self.micro]]
            pairs = [
                encode_pair(
                    self.lm.tokenizer, format_prompt(self.template, str(t)), self.verbalizers[lab]
                )
                for t, lab in zip(texts[start : start + self.micro], chunk_labels, strict=True)
            ]
            A, targets, mask = self.lm.completion_states(pairs)  # (n, T, d) fp32
            B = logits_grad(head_logits(A, self.W, self.b), targets, mask, self.tail)  # (n, T, V)
            factors = clip_factors(
                head_grad_sq_norms(A, B, with_bias=self.b is not None), self.clip_norm
            )
            label_arr = np.asarray(chunk_labels)
            for lab in sorted(set(chunk_labels)):
                idx = torch.from_numpy(np.flatnonzero(label_arr == lab)).to(A.device)
                s_w, s_b = clipped_head_grad_sum(A[idx], B[idx], factors[idx])
                acc = sums.setdefault(lab, [torch.zeros_like(s_w), torch.zeros_like(s_b), 0])
                acc[0] += s_w
                acc[1] += s_b
                acc[2] += len(idx)
        order = sorted(sums)
        out = {
            "label": np.array(order, dtype=object),
            "count": np.array([sums[k][2] for k in order], dtype=np.int64),
            "weight_sum": np.stack([sums[k][0].cpu().numpy() for k in order]),
        }
        if self.b is not None:
            out["bias_sum"] = np.stack([sums[k][1].cpu().numpy() for k in order])
        return out


def blocks_of(table: pa.Table, rows_per_block: int, min_blocks: int) -> list[pa.Table]:
    """Slices of at most ``rows_per_block`` rows, at least ``min_blocks`` of them when possible."""
    size = max(1, min(rows_per_block, -(-table.num_rows // min_blocks)))
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


@dataclass
class TargetsResult:
    targets: dict[str, dict[str, torch.Tensor]]
    record: PrivacyRecord
    seconds: float
    rows: int


def clean_class_sums(
    real: RealExamples, cfg: Config, *, num_gpus: float
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]:
    """Σ of clipped per-example head gradients per class, reduced over all actors (float64)."""
    import ray.data

    t = cfg.targets
    # Blocks are cut here, on the driver: a repartition would need a CPU task that a pool of
    # actors holding every CPU could starve.
    ds = ray.data.from_arrow(
        blocks_of(real.table.select(["text", "label"]), t.rows_per_partial, 4 * t.max_actors)
    )
    partials = map_on_actor_pool(
        ds,
        ClippedHeadGradSums,
        constructor_kwargs={"cfg": cfg},
        batch_size=t.rows_per_partial,
        min_actors=t.min_actors,
        max_actors=t.max_actors,
        num_gpus=num_gpus,
        num_cpus=t.num_cpus,
        execution=cfg.execution,
    )
    sums: dict[str, dict[str, torch.Tensor]] = {}
    counts: dict[str, int] = {}
    with tqdm(total=real.table.num_rows, desc="targets: real rows", unit="row") as bar:
        for out in partials.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
            label, count = str(out["label"][0]), int(out["count"][0])
            acc = sums.setdefault(label, {})
            for name in ("weight", "bias"):
                if f"{name}_sum" in out:
                    value = torch.from_numpy(np.array(out[f"{name}_sum"][0], dtype=np.float64))
                    acc[name] = acc[name] + value if name in acc else value
            counts[label] = counts.get(label, 0) + count
            bar.update(count)
    if counts != real.counts:
        raise AssertionError(f"Internal error: stage 1 counted {counts}, expected {real.counts}")
    return sums, counts


def run_targets(
    real: RealExamples, cfg: Config, out: OutputDir, *, num_gpus: float, model_revision: str | None
) -> TargetsResult:
    start = time.perf_counter()
    sums, counts = clean_class_sums(real, cfg, num_gpus=num_gpus)
    generator, noise_seed = noise_generator(cfg.privacy, cfg.seed)
    dims = sum(t.numel() for t in next(iter(sums.values())).values())  # same for every class
    record = privacy_record(cfg.privacy, counts, seed=noise_seed, target_dims=dims)
    targets = release_noisy_means(sums, counts, record, generator)
    del sums  # nothing un-noised outlives this function
    write_targets(out, targets, record, cfg, model_revision=model_revision)
    return TargetsResult(targets, record, time.perf_counter() - start, real.table.num_rows)


def targets_metadata(record: PrivacyRecord, cfg: Config, model_revision: str | None) -> dict:
    return {
        "privacy": record.to_dict(),
        "model": {"name": cfg.model.name, "revision": model_revision},
        "tokenizer": cfg.model.name,
        "prompt_template": cfg.data.prompt_template,
        "verbalizers": cfg.data.verbalizers,
        "labels": sorted(record.n_per_class),
    }


def write_targets(
    out: OutputDir,
    targets: dict[str, dict[str, torch.Tensor]],
    record: PrivacyRecord,
    cfg: Config,
    *,
    model_revision: str | None,
) -> None:
    from safetensors.torch import save

    meta = targets_metadata(record, cfg, model_revision)
    tensors = {
        f"{label}/{name}": t.contiguous() for label, d in targets.items() for name, t in d.items()
    }
    out.write_bytes(TARGETS_FILE, save(tensors, metadata={"gradmm": json.dumps(meta)}))
    out.write_json(TARGETS_RECORD, meta)


def read_targets(out: OutputDir) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """The released targets and their record (for stages 2 and 3, and resumed runs)."""
    from safetensors.torch import load

    tensors = load(out.read_bytes(TARGETS_FILE))
    targets: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        label, name = key.rsplit("/", 1)
        targets.setdefault(label, {})[name] = t
    return targets, out.read_json(TARGETS_RECORD)
