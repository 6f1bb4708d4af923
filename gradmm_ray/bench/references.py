"""Slow, obviously-correct references, written by this project: the benchmark times its fast
paths against them, and the tests' brute-force twins compare with the same functions.

None of these is outside code (issue 14 measures against Opacus and the authors' approach):
  head_only_copy / brute_force_grads  one example's head gradient by full-model autograd
  stage1_loop                         our per-example autograd loop (a V x d gradient per example)
  stage1_vmap                         our torch.func vmap(grad(head-only CE)) per-sample gradients
  ReferenceObjective                  our double-backward reference of the matching loss: it
                                      materialises N per-example V x d gradients and backwards
                                      through them, which the authors' code does not (it matches
                                      ONE joint gradient per batch): a strawman for speed, exact
                                      for checking the value
  x_update / reference_solve_batch    solve_batch's ADMM loop around that objective, with the
                                      un-cached projection
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from gradmm_ray.core.admm import (
    MatchingObjective,
    SequenceLayout,
    SolveResult,
    Target,
    clip_per_example_,
    solve_batch,
)
from gradmm_ray.core.lm import CausalLM
from gradmm_ray.core.projection import project

# ---------------------------------------------------------------------------------------------
# One example's head gradient


def head_only_copy(lm: CausalLM) -> torch.nn.Module:
    """A copy of the model whose head owns a PRIVATE leaf weight (and bias) requiring grad and
    nothing else does. With tied embeddings (GPT-2, Gemma2) the head's weight is replaced by a
    separate copy, so the brute-force gradient is that of the head's use of the matrix only,
    never of the input-embedding lookup (GRADMM's "last layer" is the head's use)."""
    model = copy.deepcopy(lm.model).requires_grad_(False)
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    assert head.weight is not model.get_input_embeddings().weight
    if head.bias is not None:
        head.bias = torch.nn.Parameter(head.bias.detach().clone())
    return model


def brute_force_grads(model: torch.nn.Module, pair: tuple[list[int], int]):
    """(g_W, g_b or None) of one example alone: full forward, mean CE over completion tokens,
    differentiated w.r.t. the head's weight (and bias). ``model``'s head must be its own leaf
    (``head_only_copy``, or an untied head made to require grad)."""
    ids, n_prompt = pair
    x = torch.tensor([ids], device=model.device)  # (1, L)
    logits = model(input_ids=x).logits[0, n_prompt - 1 : len(ids) - 1].float()  # (T, V)
    loss = F.cross_entropy(logits, x[0, n_prompt:])
    head = model.get_output_embeddings()
    params = [head.weight] + ([head.bias] if head.bias is not None else [])
    grads = torch.autograd.grad(loss, params)
    return grads[0], (grads[1] if len(grads) > 1 else None)


# ---------------------------------------------------------------------------------------------
# Stage 1: the clipped per-example head-gradient sum


def stage1_loop(lm: CausalLM, pairs: list, *, micro: int, clip_norm: float) -> torch.Tensor:
    """Our per-example autograd loop: per example a full forward and ``brute_force_grads`` into
    the head only (materialises the V x d gradient), clip by the joint norm, add. (V, d).
    ``micro`` is unused (one example at a time). The head must be untied (the benchmark
    model's): it is differentiated in place, not copied."""
    head = lm.head
    assert head.weight is not lm.model.get_input_embeddings().weight, (
        "Internal error: stage1_loop differentiates the head in place; a tied head needs "
        "head_only_copy"
    )
    head.requires_grad_(True)
    S = torch.zeros_like(head.weight, dtype=torch.float32)  # (V, d)
    try:
        for pair in pairs:
            grads = [g for g in brute_force_grads(lm.model, pair) if g is not None]
            norm = torch.sqrt(sum(g.float().square().sum() for g in grads))
            S += grads[0].float() * (clip_norm / norm).clamp(max=1.0)
    finally:
        head.requires_grad_(False)
    return S


def stage1_vmap(lm: CausalLM, pairs: list, *, micro: int, clip_norm: float) -> torch.Tensor:
    """Our torch.func per-sample gradients of a head-only loss: (m, V, d) per micro-batch of
    one-token completions. (V, d)."""
    from torch.func import functional_call, grad, vmap

    head = lm.head
    params = {k: v.detach() for k, v in head.named_parameters()}

    def head_loss(p: dict, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(head, p, (a,)).float()  # (T, V)
        return F.cross_entropy(logits, y)  # T = 1: no padding to mask

    per_sample = vmap(grad(head_loss), in_dims=(None, 0, 0))
    S = torch.zeros_like(params["weight"], dtype=torch.float32)  # (V, d)
    for start in range(0, len(pairs), micro):
        with torch.no_grad():
            A, y, _ = lm.completion_states(pairs[start : start + micro])  # (m, 1, d)
        g = per_sample(params, A.to(head.weight.dtype), y)  # {"weight": (m, V, d), ...}
        sq = sum(t.float().flatten(1).square().sum(1) for t in g.values())  # (m,)
        factors = (clip_norm / sq.sqrt()).clamp(max=1.0)
        S += torch.einsum("m,mvd->vd", factors, g["weight"].float())
    return S


# ---------------------------------------------------------------------------------------------
# Stage 2: our double-backward reference of the matching loss, and its solver


EVAL_ROWS = 8  # the stage2 suite's batch


class ReferenceObjective(MatchingObjective):
    """Our double-backward reference of f(X) per example: the head gradient g_W (V x d) per
    example by autograd.grad(create_graph=True), cosine to the target, and (when X requires
    grad) a double backward through g_W. Logits only at the loss positions. The sequence
    layout, head and target are MatchingObjective's; only the loss differs."""

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        """X (N, n, d) -> matching loss (N,)."""
        N, T = X.shape[0], self.T
        create_graph = torch.is_grad_enabled() and X.requires_grad
        if not create_graph and N > EVAL_ROWS:
            # Evaluations (the init's draws, projected tokens) EVAL_ROWS at a time: a 64-row
            # chunk's per-example V x d gradients would hold ~2 GB, a figure of the chunk size,
            # not of the method.
            return torch.cat([self(X[i : i + EVAL_ROWS]) for i in range(0, N, EVAL_ROWS)])
        with torch.enable_grad():
            hidden = self.sequence_states(X)  # (N, L, d)
            A = hidden[:, -T - 1 : -1].float()  # (N, T, d): the states predicting the completion
            # One head copy per example (a broadcast view), so that autograd.grad gives the
            # per-example gradients (N, V, d) rather than their batch sum.
            W_rep = self.W.detach().requires_grad_(True).expand(N, -1, -1)  # (N, V, d)
            params = [W_rep]
            logits = A @ W_rep.transpose(1, 2)  # (N, T, V)
            if self.b is not None:
                b_rep = self.b.detach().requires_grad_(True).expand(N, 1, -1)  # (N, 1, V)
                params.append(b_rep)
                logits = logits + b_rep
            if self.tail is not None:
                logits = self.tail(logits)
            ce = F.cross_entropy(
                logits.reshape(N * T, -1), self.targets[0].repeat(N), reduction="none"
            )  # (N * T,)
            grads = torch.autograd.grad(ce.sum() / T, params, create_graph=create_graph)
            targets = [self.target.weight, self.target.bias]
            cos = [
                (g * G).flatten(1).sum(1) / (g.flatten(1).norm(dim=1) * G.norm())
                for g, G in zip(grads, targets, strict=False)
            ]  # one (N,) per head tensor
            loss = (1.0 - torch.stack(cos, dim=-1)).mean(-1)  # (N,)
        return loss if create_graph else loss.detach()


def x_update(objective, X, opt, Z, Lam, rho, steps: int, grad_clip: float) -> list[torch.Tensor]:
    """ADMM's X-update: ``steps`` Adam steps on f(X) + rho/2 ||X - Z + Lam/rho||^2 (per-example
    clipping), as solve_batch does. Returns X after each step."""
    trajectory = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        f = objective(X)  # (N,)
        penalty = 0.5 * rho.view(-1) * (X - Z + Lam / rho).square().sum((1, 2))
        # Gradient w.r.t. X only (the reference's head copy also requires grad).
        (X.grad,) = torch.autograd.grad((f + penalty).sum(), X)
        clip_per_example_(X.grad, grad_clip)
        opt.step()
        trajectory.append(X.detach().clone())
    return trajectory


def uncached_project(*args, **kwargs) -> torch.Tensor:
    """``core.projection.project`` re-running the whole prefix at every position (no KV cache)."""
    return project(*args, use_cache=False, **kwargs)


def reference_solve_batch(
    lm: CausalLM, layout: SequenceLayout, target: Target, *args, **kwargs
) -> list[SolveResult]:
    """solve_batch's algorithm with our double-backward reference loss and the un-cached
    projection (same arguments as solve_batch)."""
    reference = ReferenceObjective(lm, layout, target)
    return solve_batch(
        lm, layout, target, *args, objective=reference, projection=uncached_project, **kwargs
    )
