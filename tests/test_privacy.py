"""The DP boundary: noise calibration, the noisy release, clipping and the privacy record.

The calibration is checked against an independent computation written here: the exact delta of
the Gaussian mechanism (Balle & Wang 2018, Thm 8) and a bisection for the smallest valid sigma.
"""

import json
import math
import re

import pytest
import torch

from gradmm_ray.config import PrivacyConfig
from gradmm_ray.headgrad import (
    clip_factors,
    clipped_head_grad_sum,
    head_grad_sq_norms,
    per_example_head_grads,
)
from gradmm_ray.privacy import (
    noise_generator,
    noise_multiplier,
    privacy_record,
    release_noisy_means,
    sensitivity,
)

# dp_accounting finds sigma by a binary search; its relative tolerance is well inside 1e-3.
REL_TOL = 1e-3


def _phi(x: float) -> float:
    """Standard normal CDF."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def exact_delta(eps: float, sigma: float) -> float:
    """delta(eps) of the Gaussian mechanism, sensitivity 1, noise std sigma (Balle-Wang Thm 8)."""
    a = 1.0 / (2.0 * sigma)
    return _phi(a - eps * sigma) - math.exp(eps) * _phi(-a - eps * sigma)


def reference_sigma(eps: float, delta: float) -> float:
    """Smallest sigma with exact_delta(eps, sigma) <= delta, by bisection (decreasing in sigma)."""
    lo, hi = 1e-4, 1.0
    while exact_delta(eps, hi) > delta:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if exact_delta(eps, mid) <= delta:
            hi = mid
        else:
            lo = mid
    return hi


def classic_sigma(eps: float, delta: float) -> float:
    """The reference code's classic calibration sqrt(2 ln(1.25/delta)) / eps."""
    return math.sqrt(2.0 * math.log(1.25 / delta)) / eps


GRID = [(e, d) for e in (0.05, 0.5, 1.0, 4.0, 16.0) for d in (1e-5, 1e-4)]


# ---------------------------------------------------------------------------------------------
# Calibration


@pytest.mark.parametrize(("eps", "delta"), GRID)
def test_noise_multiplier_matches_exact_gaussian_mechanism(eps, delta):
    """z(eps, delta) equals the independently bisected smallest valid sigma (rel 1e-3)."""
    z = noise_multiplier(eps, delta)
    assert z == pytest.approx(reference_sigma(eps, delta), rel=REL_TOL)


@pytest.mark.parametrize(("eps", "delta"), GRID)
def test_noise_multiplier_is_valid_and_nearly_tight(eps, delta):
    """The returned z achieves delta (valid) and 0.1% less noise would not (tight)."""
    z = noise_multiplier(eps, delta)
    assert exact_delta(eps, z) <= delta * (1 + 1e-6)
    assert exact_delta(eps, z * (1 - REL_TOL)) > delta


@pytest.mark.parametrize(
    ("eps", "delta", "expected"),
    [
        # Computed once with reference_sigma above; a silent change of calibration is caught.
        (1.0, 1e-4, 3.18570),
        (0.05, 1e-4, 44.7846),
        (16.0, 1e-5, 0.344177),
    ],
)
def test_noise_multiplier_pinned_values(eps, delta, expected):
    """Literal values of z for a few (eps, delta)."""
    assert noise_multiplier(eps, delta) == pytest.approx(expected, rel=REL_TOL)


def test_classic_formula_invalid_at_large_epsilon_ours_valid():
    """At eps=16 the reference code's sqrt(2 ln(1.25/delta))/eps misses delta (by ~34x); ours
    does not, and ours adds more noise there."""
    eps, delta = 16.0, 1e-4
    classic = classic_sigma(eps, delta)
    assert exact_delta(eps, classic) > 10 * delta
    z = noise_multiplier(eps, delta)
    assert exact_delta(eps, z) <= delta * (1 + 1e-6)
    assert z > classic


def test_noise_multiplier_decreasing_in_epsilon_and_delta():
    """More budget, less noise."""
    zs = [noise_multiplier(e, 1e-5) for e in (0.05, 0.5, 1.0, 4.0, 16.0)]
    assert all(a > b for a, b in zip(zs, zs[1:], strict=False))
    assert noise_multiplier(1.0, 1e-5) > noise_multiplier(1.0, 1e-4)


# ---------------------------------------------------------------------------------------------
# The release


DIMS = 2000 * 256 + 2000  # _zero_sums: weight and bias entries of one class


def _zero_sums(V: int = 2000, d: int = 256) -> dict[str, dict[str, torch.Tensor]]:
    return {
        label: {"weight": torch.zeros(V, d), "bias": torch.zeros(V)} for label in ("neg", "pos")
    }


def test_epsilon_inf_no_noise_exact_clipped_mean():
    """eps = inf: z = 0, std 0, and the release is exactly sum / n."""
    assert noise_multiplier(math.inf, 1e-5) == 0.0
    cfg = PrivacyConfig(epsilon=math.inf)
    counts = {"neg": 3, "pos": 7}
    record = privacy_record(cfg, counts, seed=0, target_dims=DIMS)
    assert record.noise_multiplier == 0.0
    assert record.noise_std_of_sum == 0.0
    assert record.epsilon == "inf"
    gen = torch.Generator().manual_seed(0)
    sums = {
        label: {"weight": torch.randn(5, 4, generator=gen), "bias": torch.randn(5, generator=gen)}
        for label in counts
    }
    out = release_noisy_means(sums, counts, record, torch.Generator().manual_seed(1))
    for label, n in counts.items():
        for name, s in sums[label].items():
            assert torch.equal(out[label][name], (s.double() / n).float())
            torch.testing.assert_close(out[label][name], s / n)


def test_epsilon_inf_without_clipping_record():
    """eps = inf with clipping off: sensitivity inf, still no noise (no NaN from 0 * inf)."""
    record = privacy_record(
        PrivacyConfig(epsilon=math.inf, clip_norm=None),
        {"neg": 2, "pos": 2},
        seed=0,
        target_dims=DIMS,
    )
    assert record.sensitivity == "inf"
    assert record.noise_std_of_sum == 0.0
    assert record.sigma_of_mean == {"neg": 0.0, "pos": 0.0}
    assert record.noise_to_signal_min == {"neg": 0.0, "pos": 0.0}


@pytest.mark.parametrize(("adjacency", "factor"), [("add_remove", 1.0), ("replace_one", 2.0)])
def test_noise_statistics_match_z_delta_over_n(adjacency, factor):
    """Empirical std of (noisy - clean) is z * Delta / n per class (2%), mean ~ 0, the bias gets
    noise too, replace-one doubles it, and the record's sigma_of_mean says the same."""
    C = 0.5
    cfg = PrivacyConfig(epsilon=1.0, delta=1e-5, clip_norm=C, adjacency=adjacency)
    counts = {"neg": 50, "pos": 200}
    record = privacy_record(cfg, counts, seed=0, target_dims=DIMS)
    z = noise_multiplier(1.0, 1e-5)
    assert sensitivity(cfg) == pytest.approx(factor * C)
    assert record.sensitivity == pytest.approx(factor * C)
    assert record.noise_std_of_sum == pytest.approx(z * factor * C)
    sums = _zero_sums()
    gen, _ = noise_generator(cfg, 0)
    out = release_noisy_means(sums, counts, record, gen)
    for label, n in counts.items():
        expected = z * factor * C / n
        assert record.sigma_of_mean[label] == pytest.approx(expected)
        noise_w = out[label]["weight"].double() - sums[label]["weight"].double() / n
        assert noise_w.std().item() == pytest.approx(expected, rel=0.02)
        assert abs(noise_w.mean().item()) < 0.01 * expected
        noise_b = out[label]["bias"].double() - sums[label]["bias"].double() / n
        assert noise_b.std().item() == pytest.approx(expected, rel=0.1)
        # The recorded noise-to-signal bound is the noise's norm over all entries / C.
        noise_norm = torch.cat([noise_w.flatten(), noise_b]).norm().item()
        assert record.noise_to_signal_min[label] == pytest.approx(noise_norm / C, rel=0.02)
    # The weight noise of the two classes is independent.
    a = out["neg"]["weight"].double().flatten()
    b = out["pos"]["weight"].double().flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.01


def _release(cfg: PrivacyConfig, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    counts = {"neg": 4, "pos": 5}
    gen, noise_seed = noise_generator(cfg, seed)
    record = privacy_record(cfg, counts, seed=noise_seed, target_dims=DIMS)
    sums = {label: {"weight": torch.ones(30, 8), "bias": torch.ones(30)} for label in counts}
    return release_noisy_means(sums, counts, record, gen)


def _same(a, b) -> bool:
    return all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])


def test_seeded_release_is_reproducible():
    """Same seed, identical noise; a different seed, different noise."""
    cfg = PrivacyConfig(epsilon=1.0)
    assert _same(_release(cfg, 7), _release(cfg, 7))
    assert not _same(_release(cfg, 7), _release(cfg, 8))


def test_secure_rng_differs_and_is_recorded():
    """secure_rng: two releases with the same seed differ; the record says os-entropy."""
    cfg = PrivacyConfig(epsilon=1.0, secure_rng=True)
    assert not _same(_release(cfg, 7), _release(cfg, 7))
    _, noise_seed = noise_generator(cfg, 7)
    assert noise_seed is None
    assert (
        privacy_record(cfg, {"a": 1}, seed=noise_seed, target_dims=DIMS).noise_seed == "os-entropy"
    )
    seeded = privacy_record(
        PrivacyConfig(), {"a": 1}, seed=noise_generator(PrivacyConfig(), 7)[1], target_dims=DIMS
    )
    assert seeded.noise_seed == 7


# ---------------------------------------------------------------------------------------------
# Clipping


@pytest.mark.parametrize("T", [1, 5])
def test_clipping_bounds_every_per_example_norm(T):
    """Clipped per-example gradients (weight and bias jointly) have norm <= C, exactly C when
    clipped; examples already under C are unchanged; the clipped sum is their sum."""
    torch.manual_seed(0)
    N, d, V, C = 12, 16, 40, 1.0
    A = 10.0 * torch.randn(N, T, d, dtype=torch.float64)
    B = 10.0 * torch.randn(N, T, V, dtype=torch.float64)
    small = torch.tensor([1, 4, 9])
    A[small] *= 1e-3  # these have norm < C
    B[small] *= 1e-3
    if T > 1:
        A[2, -2:] = 0.0  # padded positions: zero rows
        B[2, -2:] = 0.0
    g_w, g_b = per_example_head_grads(A, B)
    raw = (g_w.square().sum((1, 2)) + g_b.square().sum(1)).sqrt()
    sq = head_grad_sq_norms(A, B, with_bias=True)
    torch.testing.assert_close(sq.sqrt(), raw)
    assert (raw[small] < C).all()
    big = torch.ones(N, dtype=torch.bool)
    big[small] = False
    assert (raw[big] > C).all()

    factors = clip_factors(sq, C)
    cw, cb = g_w * factors.view(-1, 1, 1), g_b * factors.view(-1, 1)
    clipped = (cw.square().sum((1, 2)) + cb.square().sum(1)).sqrt()
    assert (clipped <= C * (1 + 1e-6)).all()
    torch.testing.assert_close(clipped[big], torch.full_like(clipped[big], C))
    assert (factors[small] == 1.0).all()
    assert torch.equal(cw[small], g_w[small]) and torch.equal(cb[small], g_b[small])

    sum_w, sum_b = clipped_head_grad_sum(A, B, factors)
    torch.testing.assert_close(sum_w, cw.sum(0))
    torch.testing.assert_close(sum_b, cb.sum(0))


def test_clip_factors_off_is_identity():
    """clip_norm None: factors are all ones."""
    sq = torch.tensor([0.0, 1.0, 1e6])
    assert torch.equal(clip_factors(sq, None), torch.ones(3))
    torch.testing.assert_close(clip_factors(sq, 2.0), torch.tensor([1.0, 1.0, 2.0 / 1e3]))


# ---------------------------------------------------------------------------------------------
# The record


def test_privacy_record_fields():
    """counts public, adjacency named, dp-accounting with its version, one release, JSON-able."""
    from importlib.metadata import version

    cfg = PrivacyConfig(epsilon=0.5, delta=1e-5, clip_norm=2.0, adjacency="replace_one")
    counts = {"neg": 10, "pos": 20}
    rec = privacy_record(cfg, counts, seed=3, target_dims=DIMS)
    assert rec.counts_public is True
    assert rec.adjacency == "replace_one"
    assert "replace/one" in rec.note
    assert rec.accounting_library == "dp-accounting"
    assert rec.accounting_library_version == version("dp-accounting")
    assert re.match(r"^\d+(\.\d+)*", rec.accounting_library_version)
    assert rec.num_releases == 1
    assert rec.epsilon == 0.5 and rec.delta == 1e-5 and rec.clip_norm == 2.0
    assert rec.noise_multiplier == pytest.approx(noise_multiplier(0.5, 1e-5))
    assert rec.n_per_class == counts
    assert rec.noise_seed == 3
    d = rec.to_dict()
    assert json.loads(json.dumps(d)) == d
    add_remove = privacy_record(PrivacyConfig(), counts, seed=0, target_dims=DIMS)
    assert add_remove.adjacency == "add_remove"
    assert "add/remove" in add_remove.note
