"""The DP boundary: calibrate Gaussian noise, sample the real rows, release noisy per-class sums.

Unit of privacy: one row (one labelled example) of the input data.

Mechanism. Each row is kept independently with probability q (Poisson sampling; q = 1 keeps
all). Per class k, S_k = Σᵢ clip_C(gᵢ) over the class's kept rows (head weight and bias flattened
jointly); the release is S_k + N(0, (z·Δ)² I). Under add/remove-one adjacency one row changes
one S_k by at most Δ = C (Δ = 2C under replace-one). Classes are disjoint, so the release of all
classes is one Gaussian mechanism with sensitivity Δ, subsampled with rate q: (ε, δ)-DP overall.

Nothing else about the real rows is released: matching is by cosine, so the sums are never
divided by the (private) per-class counts, and no count is recorded or printed.

Calibration. z is the smallest noise multiplier for which the mechanism is (ε, δ)-DP, from
Google's ``dp_accounting``: the analytic Gaussian mechanism (Balle & Wang, ICML 2018) for q = 1,
the privacy-loss-distribution accountant for the Poisson-subsampled Gaussian for q < 1.

Randomness. By default the noise and the sampling come from the operating system's CSPRNG
(``os.urandom``), fresh for every release and never recorded: nobody, the operator included, can
regenerate them. Gaussian noise is drawn in float64 by Box-Muller from 53-bit uniforms and added
to the float64 sum; the release is rounded to float32. The float32 grid is 2^29 times coarser than
the float64 noise's resolution, so every float32 value near the sum is reachable: the gaps in the
set of reachable outputs that floating-point attacks exploit (Mironov, CCS 2012) are rounded away.
Like Opacus' secure mode this is a mitigation, not a proof. ``insecure_reproducible_noise`` draws
both from ``seed`` instead, for tests and debugging only: the record says ``private: false``.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import asdict, dataclass
from importlib.metadata import version

import numpy as np
import torch
from torch import Tensor

from gradmm_ray.config import PrivacyConfig

ACCOUNTING_LIBRARY = "dp-accounting"
MIN_SUBSAMPLED_Z = 0.3  # see noise_multiplier
NOISE_CHUNK = 1 << 22  # entries drawn at a time: bounds the noise's extra memory to ~100 MB
INSECURE_WARNING = (
    "privacy.insecure_reproducible_noise is on: the noise and the sampling are drawn from the "
    "seed, so anyone who knows it can remove the noise. This output is NOT private."
)


TARGET_SPACE_WORDS = {  # targets.gradient, for the record
    "full_head": "next-token cross-entropy w.r.t. the whole head",
    "label_rows": "cross-entropy over the label options w.r.t. the verbalizer tokens' head rows",
}


class InsecureNoiseWarning(UserWarning):
    """Issued on every run whose release is reproducible from the seed."""


# ---------------------------------------------------------------------------------------------
# Calibration


@functools.lru_cache(maxsize=64)
def noise_multiplier(epsilon: float, delta: float, sample_rate: float = 1.0) -> float:
    """Smallest z such that N(0, z²) noise on a sensitivity-1 query, over rows Poisson-sampled
    with rate ``sample_rate``, is (ε, δ)-DP under add/remove-one adjacency (0 for ε = inf)."""
    if math.isinf(epsilon):
        return 0.0
    import dp_accounting
    from dp_accounting.pld import common, pld_privacy_accountant, privacy_loss_mechanism

    full = privacy_loss_mechanism.GaussianPrivacyLoss.from_privacy_guarantee(
        common.DifferentialPrivacyParameters(epsilon, delta), sensitivity=1.0
    ).standard_deviation
    if sample_rate >= 1.0:
        return float(full)

    def subsampled(z: float) -> dp_accounting.DpEvent:
        return dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(z))

    # Sampling only helps, so the unsampled z bounds it above. Below MIN_SUBSAMPLED_Z the loss
    # distribution grows too wide to discretise; such small noise is then used as is (valid,
    # since more noise than needed never hurts the guarantee).
    def accountant() -> dp_accounting.PrivacyAccountant:
        # The accountant rounds pessimistically: a coarser grid only over-estimates epsilon.
        return pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)

    if accountant().compose(subsampled(MIN_SUBSAMPLED_Z)).get_epsilon(delta) <= epsilon:
        return MIN_SUBSAMPLED_Z
    return float(
        dp_accounting.calibrate_dp_mechanism(
            accountant,
            subsampled,
            epsilon,
            delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(MIN_SUBSAMPLED_Z, full),
            tol=1e-4,
        )
    )


def sensitivity(cfg: PrivacyConfig) -> float:
    """L2 sensitivity of the per-class clipped sums to one row (inf when clipping is off)."""
    if cfg.clip_norm is None:
        return math.inf
    if not isinstance(cfg.clip_norm, float | int):  # "auto" is resolved before stage 1
        raise AssertionError(f"Internal error: privacy.clip_norm {cfg.clip_norm!r} unresolved")
    return cfg.clip_norm * (2.0 if cfg.adjacency == "replace_one" else 1.0)


def noise_std_of_sum(cfg: PrivacyConfig) -> float:
    """z·Δ: the noise's standard deviation on every entry of a class's sum (0 for ε = inf)."""
    z = noise_multiplier(cfg.epsilon, cfg.delta, cfg.sample_rate)
    return z * sensitivity(cfg) if z > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Randomness


def _secure_uniform_bits(n: int) -> np.ndarray:
    """n independent uint64 from the OS CSPRNG."""
    return np.frombuffer(os.urandom(8 * n), dtype=np.uint64)


def seeded_uniform_bits(seed: int, stream: int, index: np.ndarray) -> np.ndarray:
    """uint64 per index, a pure function of (seed, stream, index): SplitMix64's finaliser.
    Streams: 1 the Poisson sample (tests only), 2 the data caps (io.real_data)."""
    with np.errstate(over="ignore"):
        x = index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(
            (seed * 0x632BE59BD9B4E019 + stream) % 2**64
        )
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _unit_interval(bits: np.ndarray) -> np.ndarray:
    """uint64 -> float64 in [0, 1) with 53 random bits."""
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def standard_normal(n: int, generator: torch.Generator | None) -> Tensor:
    """n draws of N(0, 1) in float64: Box-Muller on CSPRNG uniforms, or from ``generator``."""
    if generator is not None:
        return torch.randn(n, generator=generator, dtype=torch.float64)
    m = (n + 1) // 2
    u1 = 1.0 - _unit_interval(_secure_uniform_bits(m))  # (0, 1]: log is finite
    u2 = _unit_interval(_secure_uniform_bits(m))
    r = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    return torch.from_numpy(np.concatenate([r * np.cos(angle), r * np.sin(angle)])[:n])


def poisson_keep(rows: np.ndarray, sample_rate: float, *, seed: int | None) -> np.ndarray:
    """Which rows a Poisson sample keeps: each independently with probability ``sample_rate``.
    From the OS CSPRNG (``seed`` None), or, for tests, a function of (seed, row key): adding
    a row never changes the fate of another."""
    if sample_rate >= 1.0:
        return np.ones(len(rows), dtype=bool)
    if seed is None:
        bits = _secure_uniform_bits(len(rows))
    else:
        bits = seeded_uniform_bits(seed, 1, np.asarray(rows))
    return _unit_interval(bits) < sample_rate


def noise_source(cfg: PrivacyConfig, seed: int) -> torch.Generator | None:
    """None (the OS CSPRNG, the default) or, only with insecure_reproducible_noise, a generator
    seeded from ``seed`` (and a warning, every time)."""
    if not cfg.insecure_reproducible_noise:
        return None
    warnings.warn(INSECURE_WARNING, InsecureNoiseWarning, stacklevel=2)
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def sampling_seed(cfg: PrivacyConfig, seed: int) -> int | None:
    """The seed of the Poisson sample: only with insecure_reproducible_noise."""
    return seed if cfg.insecure_reproducible_noise else None


# ---------------------------------------------------------------------------------------------
# The release


def release_noisy_sums(
    sums: dict[str, dict[str, Tensor]], std: float, generator: torch.Generator | None
) -> dict[str, dict[str, Tensor]]:
    """S_k + N(0, std²) for every tensor of every class, float64 inside, float32 out. The noise
    is added exactly once, here; classes and tensors in sorted order, so a seeded release is
    reproducible."""
    out: dict[str, dict[str, Tensor]] = {}
    for label in sorted(sums):
        out[label] = {}
        for name in sorted(sums[label]):
            s = sums[label][name].to(dtype=torch.float64, device="cpu").flatten().clone()
            if std > 0:
                for start in range(0, s.numel(), NOISE_CHUNK):
                    chunk = s[start : start + NOISE_CHUNK]
                    chunk.add_(standard_normal(chunk.numel(), generator), alpha=std)
            out[label][name] = s.float().view(sums[label][name].shape)
    return out


def noise_to_signal(released: dict[str, Tensor], std: float) -> float:
    """E‖noise‖ / ‖clean sum‖ of one class, estimated from the release alone (post-processing:
    no privacy cost). E‖S + N‖² = ‖S‖² + std²·D, so ‖S‖² ≈ ‖release‖² − std²·D, with a
    relative error of about std²·√(2D) / ‖S‖². inf when the noise explains the whole release."""
    if std == 0:
        return 0.0
    dims = sum(t.numel() for t in released.values())
    total = sum(float(t.double().square().sum()) for t in released.values())
    noise_sq = std**2 * dims
    signal_sq = total - noise_sq
    return math.sqrt(noise_sq / signal_sq) if signal_sq > 0 else math.inf


def combined_target(released: dict[str, dict[str, Tensor]]) -> Tensor:
    """The sum of every class's released target as one float64 vector (weight rows, then the
    bias where the head has one): the real data's whole gradient up to scale, which the
    set-matching selection matches (post-processing of the release)."""
    flat = [
        torch.cat([t["weight"].flatten()] + ([t["bias"].flatten()] if "bias" in t else []))
        for t in released.values()
    ]
    return torch.stack(flat).double().sum(0)


def combined_noise_to_signal(released: dict[str, dict[str, Tensor]], std: float) -> float:
    """noise_to_signal of the sum over the K classes' releases: K independent noises, std·√K
    per entry."""
    return noise_to_signal({"all": combined_target(released)}, std * math.sqrt(len(released)))


# ---------------------------------------------------------------------------------------------
# The record


@dataclass(frozen=True)
class PrivacyRecord:
    private: bool  # false: no noise (epsilon inf) or reproducible noise
    unit_of_privacy: str
    epsilon: float | str
    delta: float
    clip_norm: float | None
    clip_norm_source: str  # set in the config, or auto (public_clip_norm: no data read)
    adjacency: str
    sensitivity: float | str
    sampling: str
    sample_rate: float
    noise_multiplier: float
    noise_std_of_sum: float
    noise_source: str
    released: str
    target_space: str  # targets.gradient: full_head (V rows of the head) or label_rows (|S|)
    target_dims: int  # entries of one class's target: rows·d (+ rows with a head bias)
    # Per class: E‖noise‖ / ‖clean sum‖, estimated from the release (see noise_to_signal).
    noise_to_signal: dict[str, float]
    # The same for the sum over classes (what select.rule set_match matches): the classes' sums
    # nearly cancel in it, so its ratio is larger than any class's.
    noise_to_signal_combined: float
    counts: str
    mechanism: str
    accounting: str
    accounting_library: str
    accounting_library_version: str
    num_releases: int
    note: str

    def to_dict(self) -> dict:
        return asdict(self)


def privacy_record(
    cfg: PrivacyConfig,
    *,
    deterministic_caps: bool,
    target_space: str,
    target_dims: int,
    noise_to_signal: dict[str, float],
    noise_to_signal_combined: float = 0.0,
    clip_norm_source: str = "set in the config",
) -> PrivacyRecord:
    sample_rate = cfg.sample_rate
    z = noise_multiplier(cfg.epsilon, cfg.delta, sample_rate)
    delta_sens = sensitivity(cfg)
    if deterministic_caps:
        sampling = "deterministic caps (data.per_class / data.max_examples): no privacy"
    elif sample_rate < 1.0:
        sampling = "Poisson: each row kept independently with probability sample_rate"
    else:
        sampling = "none: every row is used"
    private = z > 0 and not cfg.insecure_reproducible_noise
    if z == 0:
        note = "NOT PRIVATE: epsilon is inf, the clipped sums are released without noise."
    elif cfg.insecure_reproducible_noise:
        note = "NOT PRIVATE: " + INSECURE_WARNING.split(": ", 1)[1]
    else:
        note = (
            f"{cfg.adjacency.replace('_', '/')} adjacency, one row is the unit of privacy; "
            "classes are disjoint, so the per-class releases together are one (epsilon, "
            "delta)-DP release. Stages after this one read only the released sums."
        )
    return PrivacyRecord(
        private=private,
        unit_of_privacy="one row (one labelled example) of the input data",
        epsilon="inf" if math.isinf(cfg.epsilon) else cfg.epsilon,
        delta=cfg.delta,
        clip_norm=cfg.clip_norm,
        clip_norm_source=clip_norm_source,
        adjacency=cfg.adjacency,
        sensitivity="inf" if math.isinf(delta_sens) else delta_sens,
        sampling=sampling,
        sample_rate=sample_rate,
        noise_multiplier=z,
        noise_std_of_sum=noise_std_of_sum(cfg),
        noise_source=(
            "none"
            if z == 0
            else "seed (INSECURE, reproducible: testing only)"
            if cfg.insecure_reproducible_noise
            else "OS CSPRNG, fresh for this release, never recorded"
        ),
        released="per class: the sum of clipped per-example LM-head gradients (weight and bias "
        f"jointly; {TARGET_SPACE_WORDS[target_space]}) plus Gaussian noise; not divided by the "
        "class's count",
        target_space=target_space,
        target_dims=target_dims,
        noise_to_signal=dict(noise_to_signal),
        noise_to_signal_combined=noise_to_signal_combined,
        counts="not released: no count of real rows is recorded or printed",
        mechanism="Gaussian mechanism on each class's sum of per-example clipped LM-head "
        "gradients" + (", Poisson-subsampled" if sample_rate < 1.0 else ""),
        accounting=(
            "privacy loss distribution of the Poisson-subsampled Gaussian mechanism"
            if sample_rate < 1.0
            else "analytic Gaussian mechanism (Balle & Wang 2018), exact"
        ),
        accounting_library=ACCOUNTING_LIBRARY,
        accounting_library_version=version(ACCOUNTING_LIBRARY),
        num_releases=1,
        note=note,
    )
