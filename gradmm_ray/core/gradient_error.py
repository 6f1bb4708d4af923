"""The gradient error of a training set (paper Fig. 2a): how far its mean last-layer gradient is
from the real data's, at the current parameters θ.

With G(D) the mean LM-head gradient of the completion cross-entropy over the rows of D (closed
form, ``core.headgrad``: the stage-1 computation without clipping),

    error = ‖G(train set) - G(real)‖ / ‖G(real)‖      (weight and bias jointly),

where "real" is a fixed, seeded subsample of the real training pool (``capped``).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from torch import Tensor

from gradmm_ray.core.lm import CausalLM
from gradmm_ray.core.target_space import target_space
from gradmm_ray.core.text import encode_pair

if TYPE_CHECKING:
    from gradmm_ray.core.training import Example

T = TypeVar("T")


HeadGrad = tuple[Tensor, Tensor | None]  # (G_W (V, d), G_b (V,) or None)


@torch.no_grad()
def head_gradient_sums(
    lm: CausalLM, examples: Sequence[Example], batch_size: int = 32
) -> dict[str | None, tuple[HeadGrad, int]]:
    """Per label: (Σ over its rows of the closed-form head gradient of the completion CE, rows)."""
    head = lm.head_params_fp32()
    space = target_space("full_head", lm, {}, head=head)
    sums: dict[str | None, tuple[HeadGrad, int]] = {}
    for label in sorted({ex.label for ex in examples}, key=str):
        rows = [ex for ex in examples if ex.label == label]
        sum_w = torch.zeros_like(head[0])
        sum_b = torch.zeros_like(head[1]) if head[1] is not None else None
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            pairs = [encode_pair(lm.tokenizer, ex.prompt, ex.completion) for ex in chunk]
            gw, gb = space.clipped_sum_of_pairs(lm, pairs, None)  # no clipping: plain sums
            sum_w += gw
            if sum_b is not None:
                sum_b += gb
        sums[label] = ((sum_w, sum_b), len(rows))
    return sums


def _mean(parts: Sequence[tuple[HeadGrad, int]]) -> HeadGrad:
    n = max(sum(k for _, k in parts), 1)
    weight = sum(g[0] for g, _ in parts) / n
    bias = sum(g[1] for g, _ in parts) / n if parts[0][0][1] is not None else None
    return weight, bias


def relative_error(grad: HeadGrad, reference: HeadGrad) -> tuple[float, float]:
    """(‖g - r‖ / ‖r‖, cos(g, r)) over the head's weight and bias jointly."""
    g = torch.cat([t.flatten() for t in grad if t is not None]).double()
    r = torch.cat([t.flatten() for t in reference if t is not None]).double()
    r_norm = r.norm().clamp(min=1e-30)
    return float((g - r).norm() / r_norm), float(g @ r / (g.norm().clamp(min=1e-30) * r_norm))


def gradient_errors(
    set_sums: dict[str | None, tuple[HeadGrad, int]],
    real_sums: dict[str | None, tuple[HeadGrad, int]],
) -> dict[str, float]:
    """``grad_error`` and ``grad_cosine`` of the set's mean gradient against the real one (what
    drives the fine-tuning trajectory); ``grad_error_classwise``: the mean over the labels both
    have of the per-label error (what GRADMM matches: one target per class)."""
    error, cosine = relative_error(_mean(list(set_sums.values())), _mean(list(real_sums.values())))
    out = {"grad_error": error, "grad_cosine": cosine}
    shared = [lab for lab in set_sums if lab is not None and lab in real_sums]
    if shared:
        out["grad_error_classwise"] = statistics.fmean(
            relative_error(_mean([set_sums[lab]]), _mean([real_sums[lab]]))[0] for lab in shared
        )
    return out


def capped(examples: Sequence[T], limit: int, seed: int) -> list[T]:
    """At most ``limit`` rows: a seeded subsample (the whole set when it fits)."""
    if len(examples) <= limit:
        return list(examples)
    idx = np.sort(np.random.default_rng(seed).choice(len(examples), size=limit, replace=False))
    return [examples[i] for i in idx]
