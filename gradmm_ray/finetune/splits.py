"""Splits and real baselines, as pure functions of labels and seeds.

Splits. TEST is the source's own test split when it has one (``splits.test_split``), else a seeded
slice of ``data.split``; DEV is a seeded, stratified slice of ``data.split``; the POOL (every real
baseline draws from it) is the rest. When the --train set was generated from ``data.split`` (its
manifest.json says so), the generation rows are kept out of DEV and TEST (out of DEV only when
enough other rows exist; the overlap is then recorded).

Baselines. Random, herding and k-center subsets of the pool with the training set's per-class
counts (its budget); herding and k-center on embeddings the caller computes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gradmm_ray.core.coreset import herding, kcenter_greedy
from gradmm_ray.core.text import normalise_text
from gradmm_ray.core.training import Example
from gradmm_ray.finetune.config import FinetuneError
from gradmm_ray.io.real_data import stratified_sample


@dataclass(frozen=True)
class SplitRows:
    """Row indices into data.split: disjoint by construction."""

    pool: np.ndarray  # what any real baseline may train on
    dev: np.ndarray  # for choosing the learning rate and the checkpoint
    test: np.ndarray  # carved TEST rows; empty when TEST is the source's own test split
    dev_generation_overlap: int  # dev rows that generation used (only when unavoidable)


def split_rows(
    labels: Sequence[str],
    *,
    dev_size: int,
    test_size: int | None,
    seed: int,
    generation_rows: Collection[int] = (),
) -> SplitRows:
    """Seeded, stratified DEV (and TEST when ``test_size``) slices of a split; the POOL is the
    rest. Generation rows never go to TEST; they go to DEV only when the other rows run out."""
    n = len(labels)
    label_arr = np.asarray(labels, dtype=object)
    used = np.zeros(n, dtype=bool)
    used[np.asarray(list(generation_rows), dtype=np.int64)] = True
    eligible = np.flatnonzero(~used)

    def draw(candidates: np.ndarray, size: int, draw_seed: int) -> np.ndarray:
        if size <= 0 or len(candidates) == 0:
            return np.array([], dtype=np.int64)
        if size >= len(candidates):
            return candidates
        picked = stratified_sample(
            label_arr[candidates].tolist(), per_class=None, max_examples=size, seed=draw_seed
        )
        return candidates[picked]

    test = np.array([], dtype=np.int64)
    if test_size:
        if len(eligible) <= test_size:
            raise FinetuneError(
                f"data.split has {len(eligible)} rows not used for generation, too few for a "
                f"test slice of splits.test_size={test_size} rows plus dev and pool rows; give a "
                "source with a test split or lower splits.test_size"
            )
        test = draw(eligible, test_size, seed)
        eligible = np.setdiff1d(eligible, test)
    dev = draw(eligible, dev_size, seed + 1)
    overlap = 0
    if len(dev) < dev_size:  # generation used (nearly) every row: top up from its rows
        extra = draw(np.setdiff1d(np.flatnonzero(used), test), dev_size - len(dev), seed + 2)
        dev = np.sort(np.concatenate([dev, extra]))
        overlap = len(extra)
    pool = np.setdiff1d(np.arange(n), np.concatenate([dev, test]))
    if len(pool) == 0:
        raise FinetuneError(
            f"data.split has {n} rows: nothing is left to train on after dev ({len(dev)}) and "
            f"test ({len(test)}); lower splits.dev_size"
        )
    return SplitRows(
        pool=pool, dev=np.sort(dev), test=np.sort(test), dev_generation_overlap=overlap
    )


def drop_held_out_duplicates(
    pool: Sequence[Example], pool_texts: Sequence[str], held_out_texts: Collection[str]
) -> tuple[list[Example], int]:
    """Pool rows whose (normalised) text also appears in DEV or TEST are dropped: a duplicate
    across splits would let a real baseline train on a test example."""
    held = {normalise_text(t) for t in held_out_texts}
    kept = [ex for ex, t in zip(pool, pool_texts, strict=True) if normalise_text(t) not in held]
    return kept, len(pool) - len(kept)


# ---------------------------------------------------------------------------------------------
# Real baselines of the same size as the training set


Budget = dict[str | None, int]  # label -> rows; {None: n} when the set has unlabelled rows


def class_budget(examples: Sequence[Example]) -> Budget:
    labels = [ex.label for ex in examples]
    if any(lab is None for lab in labels):
        return {None: len(labels)}
    return dict(sorted(Counter(labels).items()))


def _groups(labels: Sequence[str | None], budget: Budget) -> dict[str | None, np.ndarray]:
    arr = np.asarray(labels, dtype=object)
    if None in budget:
        return {None: np.arange(len(labels))}
    return {lab: np.flatnonzero(arr == lab) for lab in budget}


def check_budget(labels: Sequence[str | None], budget: Budget, what: str) -> None:
    for lab, idx in _groups(labels, budget).items():
        if len(idx) < budget[lab]:
            which = f"{lab!r} rows" if lab is not None else "rows"
            raise FinetuneError(
                f"{what}: needs {budget[lab]} {which} of the real pool to match the training set, "
                f"the pool has {len(idx)}"
            )


def random_subset(labels: Sequence[str | None], budget: Budget, seed: int) -> np.ndarray:
    """Seeded random rows with the budget's per-class counts (sorted indices)."""
    rng = np.random.default_rng(seed)
    picked = [
        rng.choice(idx, size=budget[lab], replace=False)
        for lab, idx in _groups(labels, budget).items()
    ]
    return np.sort(np.concatenate(picked)) if picked else np.array([], dtype=np.int64)


def coreset_subset(
    labels: Sequence[str | None], embeddings: Tensor, budget: Budget, method: str
) -> np.ndarray:
    """Herding or greedy k-center within each class, on the rows' embeddings (sorted indices)."""
    choose = {"herding": herding, "kcenter": kcenter_greedy}[method]
    picked = []
    for lab, idx in _groups(labels, budget).items():
        chosen = choose(embeddings[torch.as_tensor(idx)], budget[lab])
        picked.append(idx[np.asarray(chosen, dtype=np.int64)])
    return np.sort(np.concatenate(picked)) if picked else np.array([], dtype=np.int64)
