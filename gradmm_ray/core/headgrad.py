"""Closed-form last-layer (LM head) gradients: per example, norms, clipped sums, cosine.

For one example with T loss positions (its completion tokens), let A (T x d) be the hidden states
fed to the head, Z = A Wᵀ + b the logits (T x V) and B = ∂loss/∂Z (T x V). With the loss the
mean cross-entropy over the T positions, B = (softmax(Z) - onehot(y)) / T, and

    g_W = Bᵀ A  (V x d),        g_b = 1ᵀ B  (V).

Everything below works on a padded batch: A (N, T, d), B (N, T, V) and a mask (N, T) whose
padded positions hold zero rows in A and B, so they contribute nothing to any sum.

  * ‖g_W‖² = ⟨A Aᵀ, B Bᵀ⟩ (two T x T Gram matrices): never a V x d tensor per example.
  * The clipped sum Σᵢ cᵢ Bᵢᵀ Aᵢ is one matmul of the stacked, scaled B and A.
  * ⟨g_W, G⟩ = Σ B ⊙ (A Gᵀ) for a fixed target G: an ordinary differentiable function of A and
    B, so the gradient of a cosine to G w.r.t. the inputs needs ONE backward (no create_graph).

(GRADMM, Sec. 4.1 matches this last-layer gradient.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def logits_grad(
    logits: Tensor, targets: Tensor, mask: Tensor, tail: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """B = ∂(mean CE over each example's unmasked positions)/∂(raw head output), (N, T, V) fp32.

    ``tail`` is the model's post-processing of raw head outputs (soft-capping, scaling); when
    present B is taken by autograd through that small tail only (keeping its graph when
    ``logits`` requires grad, so B stays differentiable in the solver).
    """
    logits = logits.float()
    counts = mask.sum(dim=1, keepdim=True).clamp(min=1).float()  # (N, 1)
    weight = mask.float() / counts  # (N, T): 1/T_i on real positions, 0 on padding
    if tail is None:
        probs = torch.softmax(logits, dim=-1)  # (N, T, V)
        y = targets.clamp(min=0).unsqueeze(-1)  # (N, T, 1)
        # softmax - onehot without a one-hot tensor; out of place: softmax's backward needs probs.
        B = probs.scatter_add(-1, y, torch.full(y.shape, -1.0, device=y.device))
        return B.mul_(weight.unsqueeze(-1))
    # Autograd through the tail only; keep the graph when the caller differentiates B itself.
    differentiable = logits.requires_grad
    with torch.enable_grad():
        z = logits if differentiable else logits.detach().requires_grad_(True)
        logp = torch.log_softmax(tail(z), dim=-1)  # (N, T, V)
        nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, T)
        (grad,) = torch.autograd.grad((nll * weight).sum(), z, create_graph=differentiable)
    return grad


class _TimesTallTransposed(torch.autograd.Function):
    """A Mᵀ for a tall M (V x d; A has few rows), computed as (M Aᵀ)ᵀ. On CPU the A Mᵀ
    orientation of this product runs 2-3x slower (oneDNN; 8 x 256 by 32,000 x 256: 5.3 ms
    against 2.0 ms on the development machine, the head matmuls of every ADMM step and
    projection). The backward keeps the fast orientations (dZ M and dZᵀ A) and is itself
    differentiable."""

    @staticmethod
    def forward(ctx, A: Tensor, M: Tensor) -> Tensor:
        ctx.save_for_backward(A, M)
        flat = A.reshape(-1, A.shape[-1])
        return (M @ flat.T).T.contiguous().view(*A.shape[:-1], M.shape[0])

    @staticmethod
    def backward(ctx, dZ: Tensor) -> tuple[Tensor | None, Tensor | None]:
        A, M = ctx.saved_tensors
        flat = dZ.reshape(-1, dZ.shape[-1])
        dA = (flat @ M).view(A.shape) if ctx.needs_input_grad[0] else None
        dM = flat.T @ A.reshape(-1, A.shape[-1]) if ctx.needs_input_grad[1] else None
        return dA, dM


_FEW_ROWS = 32  # measured crossover: at 64 rows both orientations cost the same, at 128 A Mᵀ wins


def times_transposed(A: Tensor, M: Tensor) -> Tensor:
    """A Mᵀ, (..., V) for A (..., d) and a tall M (V, d): the head's product, in the faster
    orientation for A's number of rows (see _TimesTallTransposed)."""
    if A.numel() > _FEW_ROWS * A.shape[-1]:
        return A @ M.T
    return _TimesTallTransposed.apply(A, M)


def head_logits(A: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    """Raw head output A Wᵀ + b, (N, T, V)."""
    z = times_transposed(A, W)
    return z if b is None else z + b


def per_example_head_grads(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """g_W (N, V, d) and g_b (N, V) materialised: for tests and small shapes only."""
    return B.transpose(1, 2) @ A, B.sum(dim=1)


def head_grad_sq_norms(A: Tensor, B: Tensor, *, with_bias: bool) -> Tensor:
    """‖g_W‖² (+ ‖g_b‖²) per example, (N,), from T x T Gram matrices."""
    if A.shape[1] == 1:  # T = 1: ‖b aᵀ‖² = ‖b‖²‖a‖²
        sq = A.square().sum((1, 2)) * B.square().sum((1, 2))
    else:
        gram_a = A @ A.transpose(1, 2)  # (N, T, T)
        gram_b = B @ B.transpose(1, 2)  # (N, T, T)
        sq = (gram_a * gram_b).sum((1, 2))
    if with_bias:
        sq = sq + B.sum(dim=1).square().sum(-1)
    return sq


def clip_factors(sq_norms: Tensor, clip_norm: float | None) -> Tensor:
    """cᵢ = min(1, C / ‖gᵢ‖); all ones when clipping is off."""
    if clip_norm is None:
        return torch.ones_like(sq_norms)
    norms = sq_norms.clamp(min=0).sqrt()
    return (clip_norm / norms.clamp(min=1e-12)).clamp(max=1.0)


def clipped_head_grad_sum(A: Tensor, B: Tensor, factors: Tensor) -> tuple[Tensor, Tensor]:
    """(Σᵢ cᵢ Bᵢᵀ Aᵢ, Σᵢ cᵢ 1ᵀ Bᵢ): (V, d) and (V,), one matmul over all N·T positions."""
    d, V = A.shape[-1], B.shape[-1]
    # cᵢ goes on the small side: Σᵢ cᵢ Bᵢᵀ Aᵢ = Bᵀ (c ⊙ A), and the bias sum is c ⊙ 1 times B.
    weights = factors.repeat_interleave(A.shape[1])  # (N·T,)
    flat_b = B.reshape(-1, V)  # (N·T, V)
    scaled_a = A.reshape(-1, d) * weights.unsqueeze(1)  # (N·T, d)
    return flat_b.T @ scaled_a, weights @ flat_b


def head_grad_cosines(
    A: Tensor, B: Tensor, G_W: Tensor, G_b: Tensor | None, eps: float = 1e-12
) -> Tensor:
    """cos(g_W, G_W) and, when G_b is given, cos(g_b, G_b) per example: (N, 1 or 2).

    Differentiable in A and B without forming g_W; G_W (V, d) is one shared target."""
    inner_w = (B * times_transposed(A, G_W)).sum((1, 2))  # (N,): Σ B ⊙ (A G_Wᵀ)
    norm_w = head_grad_sq_norms(A, B, with_bias=False).clamp(min=0).add(eps).sqrt()
    cos = [inner_w / (norm_w * G_W.norm().clamp(min=eps))]
    if G_b is not None:
        g_b = B.sum(dim=1)  # (N, V)
        cos.append((g_b @ G_b) / (g_b.norm(dim=-1).add(eps) * G_b.norm().clamp(min=eps)))
    return torch.stack(cos, dim=-1)


def match_loss(A: Tensor, B: Tensor, G_W: Tensor, G_b: Tensor | None) -> Tensor:
    """Per-example matching loss: mean over head tensors of 1 - cos, (N,). Independent per
    example, so the loss of a batch is a sum of per-example terms."""
    return (1.0 - head_grad_cosines(A, B, G_W, G_b)).mean(dim=-1)
