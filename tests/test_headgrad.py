"""Closed-form LM-head gradients (gradmm_ray.core.headgrad) against brute-force autograd.

Brute force = run the FULL model on prompt + completion ids (the encode_pair rule), mean
cross-entropy over the completion tokens, and differentiate with respect to the head's weight
(and bias) only (``gradmm_ray.bench.references``: the benchmark's per-example loop uses the same
function). Architectures: Llama-style (no head bias), GPT-2 (tied embeddings), Phi (head
bias) and Gemma2 (tied, with final logit soft-capping, i.e. a non-trivial logits tail).

Tolerances: gradients agree elementwise to rtol 1e-5 with atol 1e-6 x max|expected| (fp32 on both
sides); norms, clipped sums and cosines are compared with float64 references built from the
materialised gradients.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gradmm_ray.bench.references import brute_force_grads, head_only_copy
from gradmm_ray.core.headgrad import (
    clip_factors,
    clipped_head_grad_sum,
    head_grad_cosines,
    head_grad_sq_norms,
    head_logits,
    logits_grad,
    match_loss,
    per_example_head_grads,
    times_transposed,
)
from gradmm_ray.core.lm import CausalLM, logits_tail_for, pad_pairs
from gradmm_ray.core.text import encode_pair, format_prompt

TEMPLATE = "{text} It was"
# Verbalizers of 1, 3, 1 and 2 tokens under the tiny tokenizer (checked in the fixture), with
# prompts of different lengths: the padded batch mixes completion AND prompt lengths.
MIXED = [
    ("The plot was dull.", " great", 1),
    ("What a charming film with warm and tender moments.", " terrible", 3),
    ("I found the cast very sharp.", " bad", 1),
    ("Overall a messy comedy.", " great movie", 2),
]
SINGLE = [
    ("The plot was dull.", " great", 1),
    ("A shrill, exhausting comedy that never stops yelling.", " bad", 1),
    ("I found the cast very sharp.", " wonderful", 1),
]
ARCHS = ["llama", "gpt2", "phi", "gemma2"]


def assert_grad_close(actual: Tensor, expected: Tensor, rtol: float = 1e-5) -> None:
    scale = float(expected.abs().max())
    assert scale > 0, "degenerate reference gradient"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-6 * scale)


@dataclass
class Case:
    lm: CausalLM
    pairs: list[tuple[list[int], int]]
    A: Tensor
    targets: Tensor
    mask: Tensor
    W: Tensor
    b: Tensor | None
    B: Tensor
    lengths: list[int]


def make_case(lm: CausalLM, rows) -> Case:
    tok = lm.tokenizer
    pairs = [encode_pair(tok, format_prompt(TEMPLATE, t), c) for t, c, _ in rows]
    lengths = [len(ids) - n for ids, n in pairs]
    assert lengths == [n for _, _, n in rows], "verbalizer token counts changed"
    A, targets, mask = lm.completion_states(pairs)
    W, b = lm.head_params_fp32()
    B = logits_grad(head_logits(A, W, b), targets, mask, lm.logits_tail())
    return Case(lm, pairs, A, targets, mask, W, b, B, lengths)


@pytest.fixture(scope="module")
def models(tiny_archs) -> dict[str, CausalLM]:
    return tiny_archs


@pytest.fixture(scope="module")
def cases(models):
    """Lazily built Case per (architecture, batch kind), shared by the tests of this module."""
    built: dict[tuple[str, str], Case] = {}

    def get(arch: str, which: str) -> Case:
        if (arch, which) not in built:
            built[arch, which] = make_case(models[arch], MIXED if which == "mixed" else SINGLE)
        return built[arch, which]

    return get


@pytest.fixture(params=ARCHS)
def mixed(request, cases) -> Case:
    """Padded batch mixing completion lengths 1, 3, 1, 2 (and prompt lengths)."""
    return cases(request.param, "mixed")


@pytest.fixture(params=[(a, w) for a in ARCHS for w in ("mixed", "single")], ids="-".join)
def case(request, cases) -> Case:
    """Both batch kinds: all single-token completions (T = 1) and the mixed one (T = 3)."""
    return cases(*request.param)


def materialised64(case: Case) -> tuple[Tensor, Tensor]:
    """Per-example g_W (N, V, d) and g_b (N, V) in float64, written out independently."""
    A, B = case.A.double(), case.B.double()
    return torch.einsum("ntv,ntd->nvd", B, A), B.sum(dim=1)


# ---------------------------------------------------------------------------------------------
# Per-example gradients


def test_per_example_grads_match_brute_force_autograd(case):
    """Closed-form g_W = BᵀA and g_b = 1ᵀB on a padded batch equal full-model autograd of each
    example alone w.r.t. the head only (rtol 1e-5, atol 1e-6 x max)."""
    gW, gb = per_example_head_grads(case.A, case.B)
    model = head_only_copy(case.lm)
    for i, pair in enumerate(case.pairs):
        ref_w, ref_b = brute_force_grads(model, pair)
        assert_grad_close(gW[i], ref_w)
        if case.lm.has_head_bias:
            assert_grad_close(gb[i], ref_b)


def test_tied_head_grad_is_not_the_full_tied_grad(models):
    """The GPT-2 reference really isolates the head's use: the gradient of the SHARED matrix
    (head + embedding lookup) differs, so the brute force above could catch a mix-up."""
    lm = models["gpt2"]
    case = make_case(lm, MIXED[:1])
    ids, n_prompt = case.pairs[0]
    model = copy.deepcopy(lm.model)
    shared = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is shared
    shared.requires_grad_(True)
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0, n_prompt - 1 : len(ids) - 1]
    (full,) = torch.autograd.grad(F.cross_entropy(logits, x[0, n_prompt:]), shared)
    gW, _ = per_example_head_grads(case.A, case.B)
    rel = float((full - gW[0]).norm() / gW[0].norm())
    assert rel > 1e-2, rel


def test_model_logits_equal_head_of_A(mixed):
    """A is the head input: the model's own logits at the loss positions equal
    tail(A Wᵀ + b) (tail = soft-capping for Gemma2, identity otherwise); rtol/atol 1e-5."""
    case = mixed
    ids, attention, positions, _, mask = pad_pairs(case.pairs, case.lm.tokenizer.pad_token_id)
    pos_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = case.lm.model(input_ids=ids, attention_mask=attention, position_ids=pos_ids).logits
    own = logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))[mask]
    z = head_logits(case.A, case.W, case.b)
    tail = case.lm.logits_tail()
    if tail is not None:
        z = tail(z)
    torch.testing.assert_close(z[mask], own.float(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Norms, clipping, cosines


def test_sq_norms_match_materialised(case):
    """head_grad_sq_norms equals ‖g_W‖² (+ ‖g_b‖² when the head has a bias, and also when asked
    for one without) from materialised gradients: T = 1 fast path and T > 1 Gram path (rtol
    1e-5)."""
    assert (case.A.shape[1] == 1) == (max(case.lengths) == 1)
    gW, gb = materialised64(case)
    sq_w = gW.square().sum((1, 2))
    sq_b = gb.square().sum(-1)
    got_w = head_grad_sq_norms(case.A, case.B, with_bias=False)
    got_wb = head_grad_sq_norms(case.A, case.B, with_bias=True)
    torch.testing.assert_close(got_w.double(), sq_w, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_wb.double(), sq_w + sq_b, rtol=1e-5, atol=0)
    if case.lm.has_head_bias:
        assert (sq_b > 1e-3 * sq_w).all(), "bias part too small to be tested"


def test_clipped_sum_matches_example_by_example(mixed):
    """clipped_head_grad_sum with cᵢ = min(1, C/‖gᵢ‖) equals Σ cᵢ gᵢ built example by example;
    C splits the batch (some clipped, some not); each clipped norm <= C(1 + 1e-6); rtol 1e-5."""
    case = mixed
    with_bias = case.lm.has_head_bias
    gW, gb = materialised64(case)
    norms = (gW.square().sum((1, 2)) + (gb.square().sum(-1) if with_bias else 0)).sqrt()
    C = float(norms.median())
    assert (norms > C * 1.01).any() and (norms < C * 0.99).any()
    factors = clip_factors(head_grad_sq_norms(case.A, case.B, with_bias=with_bias), C)
    S_W, S_b = clipped_head_grad_sum(case.A, case.B, factors)
    ref_w = torch.zeros_like(gW[0])
    ref_b = torch.zeros_like(gb[0])
    for i in range(len(case.pairs)):
        c = min(1.0, C / float(norms[i]))
        clipped_norm = c * float(norms[i])
        assert clipped_norm <= C * (1 + 1e-6)
        assert float(factors[i]) == pytest.approx(c, rel=1e-5)
        ref_w += c * gW[i]
        ref_b += c * gb[i]
    assert_grad_close(S_W.double(), ref_w)
    assert_grad_close(S_b.double(), ref_b)


def test_no_clipping_gives_plain_sum(mixed):
    """clip_norm None: every factor is exactly 1 and the sum is the plain Σ gᵢ (rtol 1e-5)."""
    case = mixed
    sq = head_grad_sq_norms(case.A, case.B, with_bias=True)
    factors = clip_factors(sq, None)
    assert torch.equal(factors, torch.ones_like(sq))
    S_W, S_b = clipped_head_grad_sum(case.A, case.B, factors)
    gW, gb = materialised64(case)
    assert_grad_close(S_W.double(), gW.sum(0))
    assert_grad_close(S_b.double(), gb.sum(0))


def test_cosines_and_match_loss_match_materialised(mixed):
    """head_grad_cosines / match_loss equal cosines of materialised gradients with a target
    (G_W, G_b) = mean of normalised gradients + random noise (cosines not all ~0); atol 1e-5."""
    case = mixed
    gW, gb = materialised64(case)
    g = torch.Generator().manual_seed(0)
    noise_w = torch.randn(gW.shape[1:], generator=g, dtype=torch.float64)
    noise_b = torch.randn(gb.shape[1:], generator=g, dtype=torch.float64)
    mean_w = (gW / gW.flatten(1).norm(dim=1).view(-1, 1, 1)).mean(0)
    mean_b = (gb / gb.norm(dim=1, keepdim=True)).mean(0)
    G_W = mean_w + 0.5 * noise_w * mean_w.norm() / noise_w.norm()
    G_b = mean_b + 0.5 * noise_b * mean_b.norm() / noise_b.norm()
    ref_w = F.cosine_similarity(gW.flatten(1), G_W.flatten().unsqueeze(0), dim=1)
    ref_b = F.cosine_similarity(gb, G_b.unsqueeze(0), dim=1)
    assert ref_w.abs().max() > 0.2, "target too weakly correlated to test cosines"

    got = head_grad_cosines(case.A, case.B, G_W.float(), None)
    assert got.shape == (len(case.pairs), 1)
    torch.testing.assert_close(got[:, 0].double(), ref_w, rtol=0, atol=1e-5)
    loss = match_loss(case.A, case.B, G_W.float(), None)
    torch.testing.assert_close(loss.double(), 1 - ref_w, rtol=0, atol=1e-5)

    got = head_grad_cosines(case.A, case.B, G_W.float(), G_b.float())
    assert got.shape == (len(case.pairs), 2)
    torch.testing.assert_close(got.double(), torch.stack([ref_w, ref_b], -1), rtol=0, atol=1e-5)
    loss = match_loss(case.A, case.B, G_W.float(), G_b.float())
    torch.testing.assert_close(loss.double(), 1 - (ref_w + ref_b) / 2, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Logits tail (soft-capping, scaling)


def test_logits_tail_for_known_configs():
    """logits_tail_for: soft-capping c·tanh(z/c), Cohere z·scale, Granite z/scaling, None when
    nothing applies (exact to 1e-6)."""
    z = torch.linspace(-5, 5, 41)
    cap = logits_tail_for(SimpleNamespace(final_logit_softcapping=2.0))
    torch.testing.assert_close(cap(z), torch.tanh(z / 2.0) * 2.0, rtol=1e-6, atol=1e-6)
    scale = logits_tail_for(SimpleNamespace(logit_scale=0.25))
    torch.testing.assert_close(scale(z), z * 0.25, rtol=1e-6, atol=1e-6)
    div = logits_tail_for(SimpleNamespace(logits_scaling=4.0))
    torch.testing.assert_close(div(z), z / 4.0, rtol=1e-6, atol=1e-6)
    assert logits_tail_for(SimpleNamespace()) is None
    assert logits_tail_for(SimpleNamespace(final_logit_softcapping=None, logit_scale=1.0)) is None


def test_logits_grad_with_tail_equals_autograd():
    """B from logits_grad with a soft-capping tail equals autograd of Σᵢ mean-CE(tail(zᵢ)) over
    each example's unmasked positions (rtol 1e-5); padded rows of B are exactly 0; without the
    tail B would differ (the check can fail)."""
    g = torch.Generator().manual_seed(0)
    N, T, V, c = 3, 3, 17, 1.5
    z = 3 * torch.randn((N, T, V), generator=g)
    targets = torch.randint(0, V, (N, T), generator=g)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    targets[~mask] = -100

    def tail(x):
        return torch.tanh(x / c) * c

    B = logits_grad(z, targets, mask, tail)
    leaf = z.clone().requires_grad_(True)
    loss = sum(F.cross_entropy(tail(leaf[i, mask[i]]), targets[i, mask[i]]) for i in range(N))
    (ref,) = torch.autograd.grad(loss, leaf)
    assert_grad_close(B, ref)
    assert torch.equal(B[~mask], torch.zeros_like(B[~mask]))
    assert not B.requires_grad
    plain = logits_grad(z, targets, mask)
    assert float((plain - ref).norm() / ref.norm()) > 1e-2


def test_gemma2_tail_is_active(models):
    """The Gemma2 fixture's soft-capping changes B substantially, so the brute-force agreement
    on gemma2 above really tests the tail path."""
    lm = models["gemma2"]
    assert lm.logits_tail() is not None
    case = make_case(lm, MIXED)
    plain = logits_grad(head_logits(case.A, case.W, case.b), case.targets, case.mask)
    assert float((plain - case.B).norm() / case.B.norm()) > 1e-1


# ---------------------------------------------------------------------------------------------
# Edges: empty batch, padding


def test_empty_batch_gives_zero_sums():
    """N = 0: norms (0,), factors (0,), clipped sums are zeros of shape (V, d) and (V,)."""
    V, d, T = 11, 5, 2
    A = torch.zeros((0, T, d))
    B = torch.zeros((0, T, V))
    sq = head_grad_sq_norms(A, B, with_bias=True)
    assert sq.shape == (0,)
    for clip in (1.0, None):
        factors = clip_factors(sq, clip)
        assert factors.shape == (0,)
        S_W, S_b = clipped_head_grad_sum(A, B, factors)
        assert S_W.shape == (V, d) and S_b.shape == (V,)
        assert torch.equal(S_W, torch.zeros(V, d)) and torch.equal(S_b, torch.zeros(V))


def test_padded_positions_contribute_nothing(mixed):
    """Padded positions hold zero rows in A and B (even where the raw logits there are not 0,
    e.g. a head bias); norms, clipped sums and cosines of the padded batch equal those of each
    example trimmed to its own T (rtol 1e-5), and extra zero padding changes nothing."""
    case = mixed
    pad = ~case.mask
    assert pad.any()
    assert torch.equal(case.A[pad], torch.zeros_like(case.A[pad]))
    assert torch.equal(case.B[pad], torch.zeros_like(case.B[pad]))
    # Garbage logits at padded positions must not leak into B.
    z = head_logits(case.A, case.W, case.b)
    z_garbage = z.clone()
    z_garbage[pad] = 50 * torch.randn_like(z_garbage[pad])
    B2 = logits_grad(z_garbage, case.targets, case.mask, case.lm.logits_tail())
    torch.testing.assert_close(B2, case.B, rtol=0, atol=0)

    with_bias = case.lm.has_head_bias
    G_W = torch.randn_like(case.W)
    G_b = torch.randn(case.W.shape[0]) if with_bias else None
    sq = head_grad_sq_norms(case.A, case.B, with_bias=with_bias)
    factors = clip_factors(sq, float(sq.sqrt().median()))
    S_W, S_b = clipped_head_grad_sum(case.A, case.B, factors)
    cos = head_grad_cosines(case.A, case.B, G_W, G_b)
    ref_w, ref_b = torch.zeros_like(S_W), torch.zeros_like(S_b)
    for i, t in enumerate(case.lengths):
        Ai, Bi = case.A[i : i + 1, :t], case.B[i : i + 1, :t]
        sq_i = head_grad_sq_norms(Ai, Bi, with_bias=with_bias)
        torch.testing.assert_close(sq_i, sq[i : i + 1], rtol=1e-5, atol=0)
        torch.testing.assert_close(
            head_grad_cosines(Ai, Bi, G_W, G_b), cos[i : i + 1], rtol=1e-5, atol=1e-6
        )
        s_w, s_b = clipped_head_grad_sum(Ai, Bi, factors[i : i + 1])
        ref_w += s_w
        ref_b += s_b
    assert_grad_close(S_W, ref_w)
    assert_grad_close(S_b, ref_b)
    # Two more all-zero positions: same results.
    A_p = F.pad(case.A, (0, 0, 0, 2))
    B_p = F.pad(case.B, (0, 0, 0, 2))
    torch.testing.assert_close(head_grad_sq_norms(A_p, B_p, with_bias=with_bias), sq)
    torch.testing.assert_close(head_grad_cosines(A_p, B_p, G_W, G_b), cos)


@pytest.mark.parametrize("rows", [1, 8, 40])  # both orientations: at most _FEW_ROWS, and more
def test_times_transposed_equals_matmul_with_gradients(rows):
    """times_transposed(A, M) is A Mᵀ: value, dA, dM and a double backward (the reference
    objective differentiates through it with create_graph) equal plain autograd's."""
    g = torch.Generator().manual_seed(rows)
    A = torch.randn(rows, 1, 16, generator=g, dtype=torch.float64, requires_grad=True)
    M = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(rows, 1, 50, generator=g, dtype=torch.float64)

    def grads(product):
        z = product(A, M)
        dA, dM = torch.autograd.grad((z * w).sum() ** 2, (A, M), create_graph=True)
        (ddA,) = torch.autograd.grad(dA.square().sum() + dM.sum(), A)
        return z, dA, dM, ddA

    for ours, plain in zip(grads(times_transposed), grads(lambda a, m: a @ m.T), strict=True):
        torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
