"""The space of the released target (``targets.gradient``): which head gradient is matched.

``full_head`` (GRADMM Sec. 4.1): the gradient of the mean next-token cross-entropy over the
completion w.r.t. the whole LM head, g_W = Bᵀ A (V x d), g_b = 1ᵀ B (V); see core.headgrad.

``label_rows``: the gradient of the downstream classification loss, cross-entropy over the
label options, w.r.t. the head rows of the verbalizer tokens S (one token per label, ordered by
sorted label; K = |S|). Per example, with h the hidden state that predicts the completion token
(A at the first completion position) and y the index of its label in S:

    z_S = τ(W_S h + b_S)            (K,)   τ: the model's logits tail (elementwise), if any
    p   = softmax(z_S)              (K,)
    r   = ∂CE(p, y)/∂(W_S h + b_S)  (K,)   = p − onehot(y) without a tail
    g_{W_S} = r ⊗ h  (K x d),       g_{b_S} = r  (K)   (when the head has a bias)

so one example's gradient has K·(d + 1) entries instead of V·(d + 1), and the same per-entry
noise costs sqrt(V / K) less in norm. For tied heads (GPT-2, SmolLM2, Gemma-2) this is the
gradient of the head's use of the shared rows only, as for ``full_head``.

Both are the same computation (core.headgrad) on different inputs: ``label_rows`` is the
full-head formula with the head restricted to the rows S, the states restricted to the first
completion position (T = 1) and the targets re-indexed into S. So norms, clipping, the clipped
sum and the single-backward cosine are shared, and each consumer (stage 1, the ADMM objective,
the scorer) calls one TargetSpace chosen once from the config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gradmm_ray.config import TARGET_SPACES
from gradmm_ray.core.headgrad import (
    clip_factors,
    clipped_head_grad_sum,
    head_grad_sq_norms,
    head_logits,
    logits_grad,
    match_loss,
    per_example_head_grads,
)
from gradmm_ray.core.lm import CausalLM
from gradmm_ray.core.text import check_verbalizers, encode_pair, format_prompt
from gradmm_ray.errors import DataError


def single_token_ids(tokenizer, verbalizers: dict[str, str]) -> list[int]:
    """The verbalizer token of each label, ordered by sorted label (S). DataError naming the
    first verbalizer that is not exactly one token."""
    ids = check_verbalizers(tokenizer, verbalizers)
    for label in sorted(ids):
        if len(ids[label]) != 1:
            raise DataError(
                f"targets.gradient label_rows: data.verbalizers.{label} {verbalizers[label]!r} "
                f"tokenises to {len(ids[label])} tokens {ids[label]}, expected 1 (use a "
                "single-token verbalizer, or targets.gradient full_head)"
            )
    return [ids[label][0] for label in sorted(ids)]


@dataclass(frozen=True)
class TargetSpace:
    """The matched head parameters and how a batch of completion states maps into them.

    ``rows`` None: the whole head (full_head). Otherwise the token ids S (label_rows): W and b
    hold only those rows, and ``restrict`` keeps the first completion position and maps its
    target token to its index in S."""

    name: str
    W: Tensor  # (V or K, d) fp32
    b: Tensor | None  # (V or K,)
    tail: Callable[[Tensor], Tensor] | None
    rows: Tensor | None  # (K,) token ids of S, or None
    index: Tensor | None  # (V,) position in S of each token id, -1 if not in S

    @property
    def dims(self) -> int:
        """Entries of one class's target: rows·d (+ rows with a head bias)."""
        return self.W.numel() + (0 if self.b is None else self.b.numel())

    def restrict(self, A: Tensor, targets: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Completion states (N, T, d), targets and mask (N, T) -> this space's (A, y, mask)."""
        if self.rows is None:
            return A, targets, mask
        y = self.index[targets[:, :1]]  # (N, 1): the completion token's position in S
        if bool((y < 0).any()):
            raise AssertionError(
                "Internal error: a completion's first token is not a verbalizer token of S"
            )
        return A[:, :1], y, mask[:, :1]  # (N, 1, d), (N, 1), (N, 1)

    def logits_grad(self, A: Tensor, targets: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(A, B) of this space for completion states: g_W = Bᵀ A, g_b = 1ᵀ B per example."""
        A, y, mask = self.restrict(A, targets, mask)
        return A, logits_grad(head_logits(A, self.W, self.b), y, mask, self.tail)

    def clipped_sum(
        self, A: Tensor, targets: Tensor, mask: Tensor, clip_norm: float | None
    ) -> tuple[Tensor, Tensor]:
        """Σᵢ clip_C(gᵢ) over the batch, clipped jointly (weight + bias): (rows, d), (rows,)."""
        A, B = self.logits_grad(A, targets, mask)
        factors = clip_factors(head_grad_sq_norms(A, B, with_bias=self.b is not None), clip_norm)
        return clipped_head_grad_sum(A, B, factors)

    def clipped_sum_of_pairs(
        self, lm: CausalLM, pairs: list[tuple[list[int], int]], clip_norm: float | None
    ) -> tuple[Tensor, Tensor]:
        """Stage 1's computation for a micro-batch of training pairs (ids, prompt length)."""
        return self.clipped_sum(*lm.completion_states(pairs), clip_norm)

    def example_gradients(self, A: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        """Each example's gradient in this space, unclipped, laid out as ``core.privacy.combined_target``:
        (N, dims). Materialised, so meant for label_rows (|S|·(d + 1) entries each);
        the set-matching selection sums them."""
        A, B = self.logits_grad(A, targets, mask)
        g_W, g_b = per_example_head_grads(A, B)
        return torch.cat([g_W.flatten(1)] + ([g_b] if self.b is not None else []), dim=1)

    def match_loss(
        self, A: Tensor, targets: Tensor, mask: Tensor, G_W: Tensor, G_b: Tensor | None
    ) -> Tensor:
        """Per-example mean over head tensors of 1 − cos(g, G), (N,); differentiable in A."""
        A, B = self.logits_grad(A, targets, mask)
        return match_loss(A, B, G_W, G_b)


def public_clip_norm(
    lm: CausalLM, template: str, verbalizers: dict[str, str], texts: list[str]
) -> float:
    """``privacy.clip_norm: auto``: half the median norm of the head's input h at the label
    position, over public ``texts`` in the template (the run's generation prefixes: config, not
    data, so it costs no privacy). One example's gradient is r ⊗ h with ‖r‖ = ‖p − onehot‖ in
    [0, √2] and ‖h‖ nearly constant after the final norm layer, so this clips only the rows the
    model gets badly wrong and keeps the weight (1 − p) of the rest (SmolLM2: 22.06, the
    median of real rows' norms 19.7)."""
    first = verbalizers[sorted(verbalizers)[0]]  # causal: h does not depend on the completion
    pairs = [encode_pair(lm.tokenizer, format_prompt(template, t), first) for t in texts]
    with torch.no_grad():
        A, _, _ = lm.completion_states(pairs)
    return 0.5 * float(A[:, 0].float().norm(dim=-1).median())


def target_space(
    name: str,
    lm: CausalLM,
    verbalizers: dict[str, str],
    *,
    head: tuple[Tensor, Tensor | None] | None = None,
) -> TargetSpace:
    """The TargetSpace ``targets.gradient`` names, for this model and these verbalizers.
    ``head``: ``lm.head_params_fp32()`` when the caller holds it already (one fp32 copy)."""
    if name not in TARGET_SPACES:
        raise AssertionError(f"Internal error: targets.gradient {name!r} passed validation")
    W, b = head or lm.head_params_fp32()
    tail = lm.logits_tail()
    if name == "full_head":
        return TargetSpace(name, W, b, tail, None, None)
    rows = torch.tensor(single_token_ids(lm.tokenizer, verbalizers), device=W.device)  # (K,)
    index = torch.full((W.shape[0],), -1, dtype=torch.long, device=W.device)  # (V,)
    index[rows] = torch.arange(len(rows), device=W.device)
    return TargetSpace(name, W[rows], None if b is None else b[rows], tail, rows, index)
