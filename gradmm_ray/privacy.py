"""The DP boundary: calibrate Gaussian noise and release the noisy per-class mean gradients.

Mechanism. Per class k, S_k = Σᵢ clip_C(gᵢ) over the class's examples (head weight and bias
flattened jointly), released as (S_k + N(0, (z·Δ)² I)) / n_k. Under add/remove-one adjacency one
example changes one S_k by at most Δ = C (Δ = 2C under replace-one). Classes are disjoint, so the
release of all classes is one Gaussian mechanism with sensitivity Δ: (ε, δ)-DP overall.

Calibration. z is the smallest noise multiplier for which the Gaussian mechanism is (ε, δ)-DP,
computed exactly (analytic Gaussian mechanism, Balle & Wang, ICML 2018) by Google's
``dp_accounting`` library. The per-class counts n_k are treated as public (dividing by a noisy
count would cost budget); the record says so. ε = inf releases the clipped means without noise.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass
from importlib.metadata import version

import torch
from torch import Tensor

from gradmm_ray.config import PrivacyConfig

ACCOUNTING_LIBRARY = "dp-accounting"


def noise_multiplier(epsilon: float, delta: float) -> float:
    """Smallest z such that N(0, z²) noise on a sensitivity-1 query is (ε, δ)-DP (0 for ε=inf)."""
    if math.isinf(epsilon):
        return 0.0
    from dp_accounting.pld import common, privacy_loss_mechanism

    loss = privacy_loss_mechanism.GaussianPrivacyLoss.from_privacy_guarantee(
        common.DifferentialPrivacyParameters(epsilon, delta), sensitivity=1.0
    )
    return float(loss.standard_deviation)


def sensitivity(cfg: PrivacyConfig) -> float:
    """L2 sensitivity of one class's clipped sum (inf when clipping is off)."""
    if cfg.clip_norm is None:
        return math.inf
    return cfg.clip_norm * (2.0 if cfg.adjacency == "replace_one" else 1.0)


@dataclass(frozen=True)
class PrivacyRecord:
    epsilon: float | str
    delta: float
    clip_norm: float | None
    adjacency: str
    sensitivity: float | str
    noise_multiplier: float
    noise_std_of_sum: float
    sigma_of_mean: dict[str, float]  # per class: z·Δ / n_k, the noise std of each target entry
    target_dims: int  # entries of one class's target: V·d (+ V with a head bias)
    # Per class: E‖noise‖ / C = σ_k √D / C. The clean mean's norm is at most C, so the target's
    # noise-to-signal ratio is at least this; above ~1 the matching mostly fits noise.
    noise_to_signal_min: dict[str, float]
    n_per_class: dict[str, int]
    counts_public: bool
    mechanism: str
    accounting_library: str
    accounting_library_version: str
    noise_seed: int | str
    num_releases: int
    note: str

    def to_dict(self) -> dict:
        return asdict(self)


def privacy_record(
    cfg: PrivacyConfig, n_per_class: dict[str, int], *, seed: int | None, target_dims: int
) -> PrivacyRecord:
    z = noise_multiplier(cfg.epsilon, cfg.delta)
    delta_sens = sensitivity(cfg)
    std_sum = z * delta_sens if z > 0 else 0.0
    sigma = {k: std_sum / n for k, n in n_per_class.items()}
    return PrivacyRecord(
        epsilon="inf" if math.isinf(cfg.epsilon) else cfg.epsilon,
        delta=cfg.delta,
        clip_norm=cfg.clip_norm,
        adjacency=cfg.adjacency,
        sensitivity="inf" if math.isinf(delta_sens) else delta_sens,
        noise_multiplier=z,
        noise_std_of_sum=std_sum,
        sigma_of_mean=sigma,
        target_dims=target_dims,
        noise_to_signal_min={
            k: s * math.sqrt(target_dims) / cfg.clip_norm if s > 0 else 0.0
            for k, s in sigma.items()
        },
        n_per_class=dict(n_per_class),
        counts_public=True,
        mechanism="Gaussian mechanism on each class's sum of per-example clipped LM-head gradients "
        "(weight and bias jointly), calibrated exactly (analytic Gaussian mechanism, Balle & Wang 2018)",
        accounting_library=ACCOUNTING_LIBRARY,
        accounting_library_version=version(ACCOUNTING_LIBRARY),
        noise_seed="os-entropy" if seed is None else seed,
        num_releases=1,
        note=(
            "No privacy: epsilon is inf, the clipped means are released exactly."
            if z == 0
            else f"{cfg.adjacency.replace('_', '/')} adjacency; classes are disjoint, so the "
            "per-class releases together are one (epsilon, delta)-DP release; per-class counts "
            "are treated as public. Stages after this one read only the released targets."
        ),
    )


def noise_generator(cfg: PrivacyConfig, seed: int) -> tuple[torch.Generator, int | None]:
    """A CPU generator for the noise: from ``seed`` (reproducible), or from OS entropy."""
    g = torch.Generator(device="cpu")
    if cfg.secure_rng:
        g.manual_seed(secrets.randbits(63))
        return g, None
    g.manual_seed(seed)
    return g, seed


def release_noisy_means(
    sums: dict[str, dict[str, Tensor]],
    counts: dict[str, int],
    record: PrivacyRecord,
    generator: torch.Generator,
) -> dict[str, dict[str, Tensor]]:
    """(S_k + N(0, (z Δ)²)) / n_k for every tensor of every class, in a fixed (sorted) order so
    that a seeded release is reproducible. Noise is added exactly once, here."""
    std = record.noise_std_of_sum
    out: dict[str, dict[str, Tensor]] = {}
    for label in sorted(sums):
        out[label] = {}
        for name in sorted(sums[label]):
            s = sums[label][name].to(dtype=torch.float64, device="cpu")
            if std > 0:
                s = s + std * torch.randn(s.shape, generator=generator, dtype=torch.float64)
            out[label][name] = (s / counts[label]).float()
    return out
