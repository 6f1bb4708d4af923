"""The label-rows target space (gradmm_ray.core.target_space) against brute-force autograd.

Brute force = run the FULL model on prompt + completion ids (the encode_pair rule), take its own
output logits at the position that predicts the completion token (after the model's logits tail:
Gemma-2's soft-cap), restrict them to the verbalizer tokens S, cross-entropy against the label's
index in S, and differentiate w.r.t. the head's weight (and bias) only (``head_only_copy``: for
tied heads the head's use of the matrix). Its rows outside S are zero; its rows S are the
label-rows gradient. Architectures: Llama-style, GPT-2 (tied), Phi (bias), Gemma-2 (tied,
soft-cap).

Tolerances: gradients elementwise rtol 1e-5, atol 1e-6 x max|expected| (fp32 both sides);
clipped sums and cosines against float64 references built from the brute-force gradients,
rtol 1e-5 (sums: atol 1e-6 x C).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gradmm_ray.bench.references import head_only_copy
from gradmm_ray.core.headgrad import per_example_head_grads
from gradmm_ray.core.lm import CausalLM
from gradmm_ray.core.privacy import combined_target
from gradmm_ray.core.target_space import target_space
from gradmm_ray.core.text import encode_pair, format_prompt
from gradmm_ray.errors import DataError

TEMPLATE = "{text} It was"
# Three labels, one token each under the tiny tokenizer; S is ordered by sorted label.
VERBALIZERS = {"positive": " great", "negative": " bad", "neutral": " wonderful"}
ROWS = [
    ("The plot was dull.", "negative"),
    ("What a charming film with warm and tender moments.", "positive"),
    ("A shrill, exhausting comedy that never stops yelling.", "negative"),
    ("I found the cast very sharp.", "neutral"),
    ("Overall a messy comedy.", "positive"),
]
ARCHS = ["llama", "gpt2", "phi", "gemma2"]


def assert_grad_close(actual: Tensor, expected: Tensor, rtol: float = 1e-5) -> None:
    scale = float(expected.abs().max())
    assert scale > 0, "degenerate reference gradient"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-6 * scale)


def pairs_of(lm: CausalLM) -> list[tuple[list[int], int]]:
    return [
        encode_pair(lm.tokenizer, format_prompt(TEMPLATE, t), VERBALIZERS[lab]) for t, lab in ROWS
    ]


def brute_force_label_rows(lm: CausalLM) -> list[tuple[Tensor, Tensor | None]]:
    """Per example, (g_{W_S} (K, d), g_{b_S} (K,) or None) by full-model autograd of the
    label-option cross-entropy; asserts the gradient is zero off the rows S."""
    model = head_only_copy(lm)
    head = model.get_output_embeddings()
    params = [head.weight] + ([head.bias] if head.bias is not None else [])
    labels = sorted(VERBALIZERS)
    S = torch.tensor(
        [lm.tokenizer(VERBALIZERS[lab], add_special_tokens=False)["input_ids"][0] for lab in labels]
    )
    out = []
    for (ids, n_prompt), (_, label) in zip(pairs_of(lm), ROWS, strict=True):
        logits = model(input_ids=torch.tensor([ids])).logits[0, n_prompt - 1].float()  # (V,)
        loss = F.cross_entropy(logits[S].unsqueeze(0), torch.tensor([labels.index(label)]))
        grads = torch.autograd.grad(loss, params)
        off = torch.ones(grads[0].shape[0], dtype=torch.bool)
        off[S] = False
        assert all(float(g[off].abs().max()) == 0 for g in grads)
        out.append((grads[0][S], grads[1][S] if len(grads) > 1 else None))
    return out


def flat(g_w: Tensor, g_b: Tensor | None) -> Tensor:
    return torch.cat([g_w.flatten()] + ([] if g_b is None else [g_b.flatten()])).double()


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, tiny_archs):
    lm = tiny_archs[request.param]
    return lm, target_space("label_rows", lm, VERBALIZERS), brute_force_label_rows(lm)


def test_label_rows_gradient_equals_autograd(arch):
    """Closed form (restrict -> logits over S -> B -> Bᵀ A) equals autograd of the label-option
    cross-entropy, per example, on every head kind; shapes (K, d) and (K,)."""
    lm, space, brute = arch
    A, B = space.logits_grad(*lm.completion_states(pairs_of(lm)))
    g_w, g_b = per_example_head_grads(A, B)  # (N, K, d), (N, K)
    K, d = len(VERBALIZERS), lm.head.weight.shape[1]
    assert g_w.shape == (len(ROWS), K, d) and space.W.shape == (K, d)
    assert space.dims == K * d + (K if lm.has_head_bias else 0)
    for i, (e_w, e_b) in enumerate(brute):
        assert_grad_close(g_w[i], e_w.float())
        if e_b is None:
            assert space.b is None
        else:
            assert_grad_close(g_b[i], e_b.float())


@pytest.mark.parametrize("clip_scale", [0.5, 1.0, 1e6])  # all clipped, some, none
def test_label_rows_clipped_sum_equals_brute_force(arch, clip_scale):
    """Σᵢ min(1, C/‖gᵢ‖) gᵢ with the joint (weight + bias) norm, against float64 brute force."""
    lm, space, brute = arch
    norms = torch.stack([flat(*g).norm() for g in brute])
    C = clip_scale * float(norms.median())
    s_w, s_b = space.clipped_sum_of_pairs(lm, pairs_of(lm), C)
    expected = sum(flat(*g) * min(1.0, C / float(n)) for g, n in zip(brute, norms, strict=True))
    got = flat(s_w, s_b if space.b is not None else None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * C)


def test_label_rows_match_loss_equals_cosines_of_materialised_gradients(arch):
    """match_loss = mean over head tensors of 1 − cos(g, G), g the brute-force gradient."""
    lm, space, brute = arch
    g = torch.Generator().manual_seed(0)
    G_W = torch.randn(space.W.shape, generator=g)
    G_b = None if space.b is None else torch.randn(space.b.shape, generator=g)
    loss = space.match_loss(*lm.completion_states(pairs_of(lm)), G_W, G_b)
    for i, (e_w, e_b) in enumerate(brute):
        terms = [1 - F.cosine_similarity(e_w.double().flatten(), G_W.double().flatten(), dim=0)]
        if G_b is not None:
            terms.append(1 - F.cosine_similarity(e_b.double(), G_b.double(), dim=0))
        assert float(loss[i]) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)


def test_example_gradients_are_the_brute_force_gradients_in_the_release_layout(arch):
    """example_gradients row i = flat(g_{W_S}, g_{b_S}) of example i, the layout in which
    combined_target flattens a release (weight rows, then bias where the head has one)."""
    lm, space, brute = arch
    got = space.example_gradients(*lm.completion_states(pairs_of(lm)))
    assert got.shape == (len(ROWS), space.dims)
    for i, g in enumerate(brute):
        assert_grad_close(got[i].double(), flat(*g))
    released = {
        label: {"weight": brute[i][0]} | ({} if brute[i][1] is None else {"bias": brute[i][1]})
        for i, label in enumerate(["a", "b"])
    }
    torch.testing.assert_close(combined_target(released), flat(*brute[0]) + flat(*brute[1]))


def test_full_head_space_is_the_head(tiny_archs):
    """full_head: the whole head, and the states pass through unchanged."""
    lm = tiny_archs["phi"]
    space = target_space("full_head", lm, VERBALIZERS)
    assert space.W.shape == lm.head.weight.shape and space.rows is None
    A, targets, mask = lm.completion_states(pairs_of(lm))
    assert space.restrict(A, targets, mask)[0] is A


def test_multi_token_verbalizer_refused(tiny_archs):
    lm = tiny_archs["llama"]
    with pytest.raises(DataError, match=r"data.verbalizers.negative ' terrible' tokenises to 3"):
        target_space("label_rows", lm, {"positive": " great", "negative": " terrible"})
