"""Stage 1 on Ray: real rows -> per-class clipped sums -> ONE noisy release -> targets file.

The real rows stream from their files (distributed/real_rows.py) into an autoscaling pool of
actors that hold the model; the driver never holds them. Each actor call takes a block of rows,
runs them `micro_batch_size` at a time, keeps a per-class running sum of clipped per-example
head gradients (fp32) over the rows its Poisson sample keeps (privacy.sample_rate) and emits that
partial sum once per call. Emitting through the dataflow (rather than keeping state in the actor
until the end) makes retries exact: a call that dies is re-run, and its output is counted once;
each partial also says how many rows of each fragment it counted, and the driver checks that
every fragment's rows arrived exactly once. The driver adds the partials in place in float64 as
they stream in (memory: one sum per class, whatever the row count) and adds the noise exactly
once (privacy.release_noisy_sums). The release is the noisy SUMS: no count of real rows leaves
here. No per-example vocabulary-sized array leaves an actor.

This is the only stage that reads real examples.
"""

from __future__ import annotations

import json
import struct
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from gradmm_ray.config import Config
from gradmm_ray.core.lm import load_model
from gradmm_ray.core.privacy import (
    PrivacyRecord,
    combined_noise_to_signal,
    noise_source,
    noise_std_of_sum,
    noise_to_signal,
    poisson_keep,
    privacy_record,
    release_noisy_sums,
    sampling_seed,
)
from gradmm_ray.core.target_space import public_clip_norm, target_space
from gradmm_ray.core.text import encode_pair
from gradmm_ray.distributed.ray_env import StageBar, actor_gpus, map_on_actor_pool
from gradmm_ray.distributed.real_rows import stream_for_pool
from gradmm_ray.errors import OutputError
from gradmm_ray.io.real_data import SourcePlan, check_class_counts
from gradmm_ray.io.storage import OutputDir

TARGETS_FILE = "targets.safetensors"
TARGETS_RECORD = "targets.json"


class ClippedHeadGradSums:
    """Ray Data actor: a batch of real rows in, one row per class seen out (label, rows_seen,
    sums of the clipped gradients of the rows the Poisson sample kept, in the target space
    ``targets.gradient`` names: weight (V or |S|, d), bias (V or |S|,); and ``fragments``, the
    rows of that class counted per fragment with the number each fragment holds)."""

    def __init__(self, cfg: Config):
        self.lm = load_model(cfg.model, progress=False)
        self.space = target_space(cfg.targets.gradient, self.lm, cfg.data.verbalizers)
        self.template = cfg.data.prompt_template
        self.verbalizers = cfg.data.verbalizers
        self.clip_norm = cfg.privacy.clip_norm
        if isinstance(self.clip_norm, str):  # the noise is calibrated to one resolved value
            raise AssertionError(
                f"Internal error: privacy.clip_norm {self.clip_norm!r} reached a stage-1 actor "
                "unresolved (run_targets resolves it)"
            )
        self.sample_rate = cfg.privacy.sample_rate
        self.sample_seed = sampling_seed(cfg.privacy, cfg.seed)
        self.micro = cfg.targets.micro_batch_size
        # Bounds every pair, hence every micro-batch's padded width (lm.pad_pairs).
        self.max_tokens = self.lm.token_limit(cfg.data.max_tokens)

    # no_grad, not inference_mode: a model with a logits tail (Gemma-2's soft-cap) takes B by
    # autograd through that tail, which inference tensors refuse.
    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        all_labels = np.asarray([str(x) for x in batch["label"]])
        seen = {
            str(k): int(n) for k, n in zip(*np.unique(all_labels, return_counts=True), strict=True)
        }
        keep = poisson_keep(batch["key"], self.sample_rate, seed=self.sample_seed)
        texts, labels = batch["text"][keep], all_labels[keep]
        W, b = self.space.W, self.space.b
        sums = {}  # a class seen but not sampled still gets (zero) sums
        for lab in seen:
            rows = texts[labels == lab]
            s_w, s_b = W.new_zeros(W.shape), W.new_zeros(W.shape[0])
            for start in range(0, len(rows), self.micro):
                pairs = [
                    encode_pair(
                        self.lm.tokenizer,
                        str(t),
                        self.verbalizers[lab],
                        template=self.template,
                        max_tokens=self.max_tokens,
                    )
                    for t in rows[start : start + self.micro]
                ]
                part_w, part_b = self.space.clipped_sum_of_pairs(self.lm, pairs, self.clip_norm)
                s_w += part_w
                s_b += part_b
            sums[lab] = (s_w, s_b)
        order = sorted(seen)
        out = {
            "label": np.array(order, dtype=object),
            "rows_seen": np.array([seen[k] for k in order], dtype=np.int64),
            "fragments": np.array(
                [fragment_counts(batch, all_labels == k) for k in order], dtype=object
            ),
            "weight_sum": np.stack([sums[k][0].cpu().numpy() for k in order]),
        }
        if b is not None:
            out["bias_sum"] = np.stack([sums[k][1].cpu().numpy() for k in order])
        return out


@dataclass
class TargetsResult:
    targets: dict[str, dict[str, torch.Tensor]]
    record: PrivacyRecord
    seconds: float


def fragment_counts(batch: dict[str, np.ndarray], mask: np.ndarray) -> str:
    """JSON {fragment: [rows counted here, rows of this class the fragment holds]}."""
    frags, first, n = np.unique(batch["fragment"][mask], return_index=True, return_counts=True)
    holds = batch["expected"][mask][first]  # the same for every row of a fragment and class
    return json.dumps({int(f): [int(k), int(e)] for f, k, e in zip(frags, n, holds, strict=True)})


class ExactlyOnce:
    """Rows counted per (fragment, class) against the rows each fragment holds: a lost or twice
    counted partial shows as a fragment short or over. Memory: a few numbers per fragment."""

    def __init__(self, plan: SourcePlan, kept: dict[str, int] | None):
        self.plan, self.kept = plan, kept  # kept: rows per class after the caps, when capped
        self.counted: dict[tuple[int, str], int] = {}
        self.holds: dict[tuple[int, str], int] = {}

    def add(self, label: str, fragments: str) -> None:
        for frag, (counted, holds) in json.loads(fragments).items():
            key = (int(frag), label)
            self.counted[key] = self.counted.get(key, 0) + counted
            self.holds[key] = holds

    def check(self, seen: dict[str, int]) -> None:
        # No numbers in the message: they are private.
        broken = "Internal error: stage 1 lost or double-counted a partial sum"
        if self.counted != self.holds:
            raise AssertionError(broken)
        if self.kept is not None:
            if seen != {k: n for k, n in self.kept.items() if n}:
                raise AssertionError(broken)
            return
        per_fragment: dict[int, int] = {}
        for (frag, _), n in self.counted.items():
            per_fragment[frag] = per_fragment.get(frag, 0) + n
        for f in self.plan.fragments:  # Parquet and Arrow fragments: known from metadata
            if f.rows is not None and per_fragment.get(f.index, 0) != f.rows:
                raise AssertionError(broken)


def clean_class_sums(
    plan: SourcePlan, cfg: Config, *, bytes_per_row: float
) -> dict[str, dict[str, torch.Tensor]]:
    """Σ of clipped per-example head gradients per class over the Poisson-sampled rows, reduced
    over all actors (float64). Private: never leaves stage 1 without noise."""
    t, d = cfg.targets, cfg.data
    stream = stream_for_pool(plan, d, t, seed=cfg.seed, bytes_per_row=bytes_per_row)
    partials = map_on_actor_pool(
        stream.rows,
        ClippedHeadGradSums,
        constructor_kwargs={"cfg": cfg},
        pool=t,
        batch_size=stream.per_call,
        execution=cfg.execution,
    )
    sums: dict[str, dict[str, torch.Tensor]] = {}
    seen: dict[str, int] = {}
    exactly_once = ExactlyOnce(plan, stream.kept)
    # The bar shows a percentage only (of an estimate for JSON and CSV): row counts are private.
    bar_format = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]"
    with StageBar(
        total=max(stream.expected_rows, 1),
        desc="targets",
        bar_format=bar_format,
        model=cfg.model.name,
    ) as bar:
        for out in partials.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
            label, rows_seen = str(out["label"][0]), int(out["rows_seen"][0])
            acc = sums.setdefault(label, {})
            for name in ("weight", "bias"):
                if f"{name}_sum" in out:
                    value = torch.from_numpy(np.array(out[f"{name}_sum"][0], dtype=np.float64))
                    if name in acc:  # in place: one float64 sum per class, however many partials
                        acc[name].add_(value)
                    else:
                        acc[name] = value
            seen[label] = seen.get(label, 0) + rows_seen
            exactly_once.add(label, str(out["fragments"][0]))
            bar.update(min(rows_seen, bar.total - bar.n))
        bar.update(bar.total - bar.n)  # the estimate was off: the stream is done all the same
    exactly_once.check(seen)
    check_class_counts(seen, d, plan.name)  # a class with < 2 rows: DataError, nothing released
    return sums


AUTO_CLIP_SOURCE = (
    "auto: half the model's median head-input norm on the generation prefixes in the template "
    "(public text; no data read)"
)


def public_clip_norm_task(cfg: Config) -> float:
    """Runs where stage 1's actors run (a Ray task with their resources)."""
    lm = load_model(cfg.model, progress=False)
    d = cfg.data
    texts = [d.generation_prefix.format(label=label) for label in sorted(d.verbalizers)]
    return public_clip_norm(lm, d.prompt_template, d.verbalizers, texts)


def resolve_clip_norm(cfg: Config) -> tuple[Config, str]:
    """(cfg with privacy.clip_norm a number, where it came from). ``auto`` is computed ONCE,
    before any real row is read, and handed to every actor: the noise is calibrated to that one
    value, so no actor may clip to another (actors computing it themselves could differ in the
    last bits on mixed hardware)."""
    if cfg.privacy.clip_norm != "auto":
        return cfg, "set in the config"
    import ray

    t, e = cfg.targets, cfg.execution
    task = ray.remote(public_clip_norm_task).options(
        num_gpus=actor_gpus(t.num_gpus), num_cpus=t.num_cpus
    )
    timeout = None if e.stall_timeout_s == -1 else e.stall_timeout_s
    # Before stage 1's bar: on a cluster this task may wait for a GPU node to start.
    print(
        f"targets: privacy.clip_norm auto: measuring {cfg.model.name}'s head-input norm on the "
        "public generation prefixes (one task on a stage-1 node)",
        file=sys.stderr,
        flush=True,
    )
    value = round(ray.get(task.remote(cfg), timeout=timeout), 4)
    return replace(cfg, privacy=replace(cfg.privacy, clip_norm=value)), AUTO_CLIP_SOURCE


def run_targets(
    plan: SourcePlan,
    cfg: Config,
    out: OutputDir,
    *,
    bytes_per_row: float,
    model_revision: str | None,
) -> TargetsResult:
    start = time.perf_counter()
    cfg, clip_source = resolve_clip_norm(cfg)
    sums = clean_class_sums(plan, cfg, bytes_per_row=bytes_per_row)
    std = noise_std_of_sum(cfg.privacy)
    targets = release_noisy_sums(sums, std, noise_source(cfg.privacy, cfg.seed))
    del sums  # nothing un-noised outlives this function
    record = privacy_record(
        cfg.privacy,
        deterministic_caps=cfg.data.per_class is not None or cfg.data.max_examples is not None,
        target_space=cfg.targets.gradient,
        target_dims=sum(t.numel() for t in next(iter(targets.values())).values()),
        noise_to_signal={label: noise_to_signal(t, std) for label, t in targets.items()},
        noise_to_signal_combined=combined_noise_to_signal(targets, std),
        clip_norm_source=clip_source,
    )
    write_targets(out, targets, record, cfg, model_revision=model_revision)
    return TargetsResult(targets, record, time.perf_counter() - start)


def targets_metadata(
    record: PrivacyRecord, labels: list[str], cfg: Config, model_revision: str | None
) -> dict:
    return {
        "privacy": record.to_dict(),
        "model": {"name": cfg.model.name, "revision": model_revision},
        "tokenizer": cfg.model.name,
        "prompt_template": cfg.data.prompt_template,
        "verbalizers": cfg.data.verbalizers,
        "labels": sorted(labels),
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

    meta = targets_metadata(record, list(targets), cfg, model_revision)
    tensors = {
        f"{label}/{name}": t.contiguous() for label, d in targets.items() for name, t in d.items()
    }
    # One unit: targets.safetensors, written last (atomically), is the commit point, and the
    # record embedded in it is the source of truth; targets.json is a readable copy written
    # first. A crash in between leaves no release, so the next run computes it again.
    out.write_json(TARGETS_RECORD, meta)
    out.write_bytes(TARGETS_FILE, save(tensors, metadata={"gradmm": json.dumps(meta)}))


_REDO_RELEASE = (
    "restore it, or pass --overwrite to recompute (a new release spends the privacy budget again)"
)


def read_release_record(out: OutputDir) -> dict:
    """The record embedded in targets.safetensors, from its header alone (cheap: prepare checks
    a resumed release with it). OutputError naming the file when it is missing or damaged."""
    where = f"{out.uri}/{TARGETS_FILE}"
    if not out.exists(TARGETS_FILE):
        raise OutputError(f"{where} is missing: run the targets stage (--stages targets,...)")
    try:
        with out.open_file(TARGETS_FILE) as f:
            size = f.size()
            (n,) = struct.unpack("<Q", f.read_at(8, 0))  # safetensors: u64 header length, header
            header = json.loads(f.read_at(n, 8)) if 8 + n <= size else {}
        if not header:
            raise OutputError(f"{where} is truncated ({size} bytes); {_REDO_RELEASE}")
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
        record = json.loads(header["__metadata__"]["gradmm"])
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise OutputError(f"{where} is not a readable release ({e}); {_REDO_RELEASE}") from None
    if size != 8 + n + end:
        raise OutputError(f"{where} is truncated ({size} of {8 + n + end} bytes); {_REDO_RELEASE}")
    return record


def read_targets(out: OutputDir) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """The released targets and their record (for stages 2 and 3, and resumed runs)."""
    from safetensors.torch import load

    record = read_release_record(out)
    try:
        tensors = load(out.read_bytes(TARGETS_FILE))
    except Exception as e:  # safetensors raises its own error type for every malformed file
        raise OutputError(
            f"{out.uri}/{TARGETS_FILE} is not a readable release ({e}); {_REDO_RELEASE}"
        ) from None
    targets: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        label, name = key.rsplit("/", 1)
        targets.setdefault(label, {})[name] = t
    return targets, record
