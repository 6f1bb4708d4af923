"""Herding and greedy k-center against brute-force twins on small point sets."""

import itertools
import math

import pytest
import torch

from gradmm_ray.core.coreset import covering_radius, herding, kcenter_greedy


def _dist(a, b) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))


def brute_herding(points: list[list[float]], k: int) -> list[int]:
    """Step t: try every unchosen point, keep the one whose addition puts the running mean
    closest to the mean of all points (first on ties). Plain Python floats."""
    n, d = len(points), len(points[0])
    mu = [sum(p[j] for p in points) / n for j in range(d)]
    chosen: list[int] = []
    for t in range(1, k + 1):
        best, best_gap = None, math.inf
        for i in range(n):
            if i in chosen:
                continue
            mean = [(sum(points[c][j] for c in chosen) + points[i][j]) / t for j in range(d)]
            gap = _dist(mu, mean)
            if gap < best_gap - 1e-12:
                best, best_gap = i, gap
        chosen.append(best)
    return chosen


def brute_kcenter(points: list[list[float]], k: int) -> list[int]:
    """Start nearest the mean; then the point whose nearest centre is farthest (first on ties)."""
    n, d = len(points), len(points[0])
    mu = [sum(p[j] for p in points) / n for j in range(d)]
    chosen = [min(range(n), key=lambda i: (_dist(points[i], mu), i))]
    while len(chosen) < k:
        best, best_d = None, -1.0
        for i in range(n):
            if i in chosen:
                continue
            near = min(_dist(points[i], points[c]) for c in chosen)
            if near > best_d + 1e-12:
                best, best_d = i, near
        chosen.append(best)
    return chosen


def optimal_radius(points: torch.Tensor, k: int) -> float:
    """The exact k-center optimum by trying every subset of k centres."""
    return min(
        covering_radius(points, list(c)) for c in itertools.combinations(range(len(points)), k)
    )


@pytest.mark.parametrize("seed", range(6))
def test_herding_matches_brute_force(seed):
    """Every greedy choice equals the exhaustive search over the remaining points."""
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(9, 3, generator=g, dtype=torch.float64)
    for k in (1, 3, 9):
        assert herding(points, k) == brute_herding(points.tolist(), k)


@pytest.mark.parametrize("seed", range(6))
def test_kcenter_matches_brute_force_and_is_within_twice_the_optimum(seed):
    """Same choices as the naive greedy twin; covering radius <= 2x the exhaustive optimum."""
    g = torch.Generator().manual_seed(100 + seed)
    points = torch.randn(9, 2, generator=g, dtype=torch.float64)
    for k in (1, 2, 3, 4):
        chosen = kcenter_greedy(points, k)
        assert chosen == brute_kcenter(points.tolist(), k)
        assert covering_radius(points, chosen) <= 2 * optimal_radius(points, k) + 1e-9


def test_selection_is_without_replacement_even_with_duplicate_points():
    """Duplicates of a chosen point are at distance 0 but are still distinct rows."""
    points = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    for choose in (herding, kcenter_greedy):
        chosen = choose(points, 5)
        assert sorted(chosen) == [0, 1, 2, 3, 4]


def test_herding_k1_is_the_point_nearest_the_mean_and_k0_is_empty():
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0]])  # mean 3.25
    assert herding(points, 1) == [2]
    assert herding(points, 0) == [] and kcenter_greedy(points, 0) == []


def test_bad_budget_is_refused():
    with pytest.raises(ValueError, match="k: got 5"):
        herding(torch.zeros(4, 2), 5)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        kcenter_greedy(torch.zeros(4), 1)
