"""Coreset selection of real rows by their embeddings: herding and greedy k-center (pure torch).

Both are the real-subset baselines of the paper's Table 1; the embeddings are mean-pooled LM
hidden states of the real training rows. Both are greedy and deterministic (ties go to the lower
index), and both select without replacement.

Herding (Welling 2009; Rebuffi et al. 2017): with μ the mean of all n points and S_{t-1} the
points chosen so far, step t picks

    x_t = argmin_{x ∉ S_{t-1}} ‖ μ - (Σ_{s ∈ S_{t-1}} s + x) / t ‖,

so the running mean of the chosen points tracks the mean of all points.

Greedy k-center (Sener & Savarese 2018): start from the point nearest μ, then repeatedly pick

    x_t = argmax_{x ∉ S} min_{s ∈ S} ‖x - s‖,

the point farthest from the chosen centres; its covering radius is within 2x the optimum.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(points: Tensor, k: int) -> None:
    if points.dim() != 2:
        raise ValueError(f"points: expected a (n, d) matrix, got shape {tuple(points.shape)}")
    if not 0 <= k <= points.shape[0]:
        raise ValueError(f"k: got {k}, expected 0 <= k <= {points.shape[0]} (the number of points)")


def herding(points: Tensor, k: int) -> list[int]:
    """Indices of k points chosen by herding, in the order chosen."""
    _check(points, k)
    x = points.double()
    mu = x.mean(dim=0)
    chosen: list[int] = []
    total = torch.zeros_like(mu)
    available = torch.ones(x.shape[0], dtype=torch.bool)
    for t in range(1, k + 1):
        gap = (mu - (total + x) / t).norm(dim=1)  # (n,): the running mean's error per candidate
        gap[~available] = float("inf")
        i = int(torch.argmin(gap))  # first minimum: ties go to the lower index
        chosen.append(i)
        available[i] = False
        total += x[i]
    return chosen


def kcenter_greedy(points: Tensor, k: int) -> list[int]:
    """Indices of k centres chosen by greedy k-center, in the order chosen."""
    _check(points, k)
    if k == 0:
        return []
    x = points.double()
    first = int(torch.argmin((x - x.mean(dim=0)).norm(dim=1)))
    chosen = [first]
    nearest = (x - x[first]).norm(dim=1)  # (n,): distance to the nearest chosen centre
    for _ in range(k - 1):
        far = nearest.clone()
        far[chosen] = -1.0  # never re-pick a centre (duplicates of a centre have distance 0 too)
        i = int(torch.argmax(far))
        chosen.append(i)
        nearest = torch.minimum(nearest, (x - x[i]).norm(dim=1))
    return chosen


def covering_radius(points: Tensor, centres: list[int]) -> float:
    """max_x min_{s ∈ centres} ‖x - s‖: what k-center minimises."""
    x = points.double()
    return float(torch.cdist(x, x[centres]).min(dim=1).values.max())
