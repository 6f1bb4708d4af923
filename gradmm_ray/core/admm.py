"""ADMM for a batch of independent synthetic examples (GRADMM Sec. 4.2, Alg. 1).

Each example is a sequence [prompt prefix] X [prompt suffix] [completion]: X (n x d) are the free
embeddings of the text, everything else is the fixed template and the label's completion. With
f(X) the matching loss against the noisy target of the label, Z the projection of X into the
vocabulary and Λ the dual, each outer iteration does

    Z ← project(X + Λ/ρ)                        (top-k, LM-conditioned; projection.py)
    X ← K Adam steps on f(X) + ρ/2 ‖X − Z + Λ/ρ‖²
    Λ ← Λ + ρ (X − Z)

and the output is the projected iterate with the lowest matching loss. Examples never interact:
the batch loss is a sum of per-example losses, Adam is elementwise, gradient clipping is per
example, and all randomness of an example comes from (seed, synthetic_id).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gradmm_ray.config import AdmmConfig
from gradmm_ray.core.lm import CausalLM
from gradmm_ray.core.projection import project
from gradmm_ray.core.target_space import TargetSpace, target_space
from gradmm_ray.core.text import encode_continuation, encode_generation_prefix, encode_prompt


def example_seed(seed: int, synthetic_id: int) -> int:
    """A 63-bit seed from (run seed, synthetic id) only: independent of batching and workers."""
    digest = hashlib.sha256(f"{seed}:{synthetic_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class SequenceLayout:
    """The fixed parts of one label's synthetic sequence, as token ids."""

    prefix_ids: list[int]  # template text before {text}, with the tokenizer's special tokens
    suffix_ids: list[int]  # template text after {text}
    completion_ids: list[int]  # the label's verbalizer
    generation_ids: list[int]  # the label's generation prefix (projection only)
    # The whitespace that ends the template's text before {text} ("Review: " -> " "), moved into
    # the first synthetic token: a BPE tokenizer merges it into the word that follows, so the
    # training pair "Review: The movie" is [Review, :, " The", " movie"], not [Review, :, " ",
    # The, " movie"]. lead_token_ids: the tokens that start with it (position 0's candidates).
    lead: str = ""
    lead_token_ids: tuple[int, ...] = ()

    @classmethod
    def build(
        cls,
        tokenizer,
        template: str,
        completion: str,
        generation_prefix: str,
        generation_chat: bool | str = "auto",
    ) -> SequenceLayout:
        # The rule of core.text: what starts the sequence gets the tokenizer's special tokens,
        # what continues it none. The training pair (encode_pair) tokenises the filled prompt as
        # one string, while here X stands where {text} is and the template's two sides are
        # tokenised apart. The common boundary merge, a space before {text} joining the text's
        # first word, is kept by the lead; rarer merges across X can still differ.
        before, after = template.split("{text}", 1)
        stripped = before.rstrip()
        lead = before[len(stripped) :] if stripped else ""
        lead_ids = tokens_starting_with(tokenizer, lead) if lead else ()
        if not lead_ids:  # no token merges the whitespace with a word: keep it in the prefix
            stripped, lead = before, ""
        return cls(
            prefix_ids=encode_prompt(tokenizer, stripped),
            suffix_ids=encode_continuation(tokenizer, after) if after else [],
            completion_ids=encode_continuation(tokenizer, completion),
            generation_ids=encode_generation_prefix(tokenizer, generation_prefix, generation_chat),
            lead=lead,
            lead_token_ids=lead_ids,
        )

    def first_allowed(self, allowed: Tensor) -> Tensor | None:
        """Position 0's allowed tokens: ``allowed`` and starting with ``lead`` (None: no lead, or
        no allowed token starts with it)."""
        if not self.lead_token_ids:
            return None
        first = torch.zeros_like(allowed)
        first[[i for i in self.lead_token_ids if i < len(allowed)]] = True
        first &= allowed
        return first if bool(first.any()) else None


def tokens_starting_with(tokenizer, lead: str) -> tuple[int, ...]:
    """Ids of the tokens that decode to ``lead`` followed by a word (no more whitespace)."""
    words = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return tuple(
        i
        for i, w in enumerate(words)
        if w.startswith(lead) and w[len(lead) :][:1].strip() and i not in tokenizer.all_special_ids
    )


@dataclass
class Target:
    """The noisy target gradient of one label, on the solver's device, fp32, in the released
    target space (V rows for full_head, |S| for label_rows)."""

    weight: Tensor  # (V or |S|, d)
    bias: Tensor | None  # (V or |S|,)


@dataclass
class SolveResult:
    synthetic_id: int
    rho: float
    token_ids: list[int]
    match_loss: float  # of the returned (projected) tokens
    initial_match_loss: float  # of the first projection
    best_iter: int  # outer iteration of the returned tokens (outer_iters = final projection)
    loss_curve: list[float] = field(default_factory=list)  # f(X) after each X-update
    projected_loss_curve: list[float] = field(default_factory=list)  # f(Z) for each Z
    residual_curve: list[float] = field(default_factory=list)  # ‖X − Z‖ after each X-update
    seconds: float = 0.0


class MatchingObjective:
    """f(X) per example for one label's layout and target: one forward, one backward. ``space``
    is the target's (core.target_space; None = full_head)."""

    def __init__(
        self,
        lm: CausalLM,
        layout: SequenceLayout,
        target: Target,
        space: TargetSpace | None = None,
    ):
        self.lm = lm
        emb = lm.model.get_input_embeddings()
        dev = lm.device

        def ids(token_ids: list[int]) -> Tensor:  # long even when empty (no BOS, "{text}...")
            return torch.tensor(token_ids, dtype=torch.long, device=dev)

        with torch.no_grad():
            self.prefix = emb(ids(layout.prefix_ids))  # (p, d)
            self.suffix = emb(ids(layout.suffix_ids))  # (s, d)
            self.completion = emb(ids(layout.completion_ids))  # (T, d)
        T = len(layout.completion_ids)
        self.n_fixed_before = len(layout.prefix_ids)
        self.n_after = len(layout.suffix_ids)
        self.targets = ids(layout.completion_ids).unsqueeze(0)  # (1, T)
        self.mask = torch.ones((1, T), dtype=torch.bool, device=dev)
        self.T = T
        self.space = space or target_space("full_head", lm, {})
        # The matched head parameters (W: (V or |S|, d)) and the logits tail.
        self.W, self.b, self.tail = self.space.W, self.space.b, self.space.tail
        self.target = target

    def sequence_states(self, X: Tensor) -> Tensor:
        """Hidden states fed to the head for prefix + X + suffix + completion, (N, L, d)."""
        N = X.shape[0]
        parts = [self.prefix, X.to(self.prefix.dtype), self.suffix, self.completion]
        embeds = torch.cat([p.expand(N, -1, -1) for p in parts], dim=1)  # (N, L, d)
        attention = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return self.lm.hidden_states(inputs_embeds=embeds, attention_mask=attention)

    def __call__(self, X: Tensor) -> Tensor:
        """X (N, n, d) -> matching loss (N,)."""
        N, n, _ = X.shape
        hidden = self.sequence_states(X)
        start = self.n_fixed_before + n + self.n_after - 1  # predicts the first completion token
        # contiguous: the head matmuls below then run as one GEMM, not as a batched bmm over a
        # strided view (2x faster objective, issue 14).
        A = hidden[:, start : start + self.T].float().contiguous()  # (N, T, d)
        return self.space.match_loss(
            A,
            self.targets.expand(N, -1),
            self.mask.expand(N, -1),
            self.target.weight,
            self.target.bias,
        )

    @torch.no_grad()
    def of_tokens(self, token_ids: Tensor, chunk: int = 64) -> Tensor:
        """Matching loss of token sequences (N, n), (N,)."""
        emb = self.lm.model.get_input_embeddings()
        return torch.cat(
            [self(emb(token_ids[i : i + chunk]).float()) for i in range(0, len(token_ids), chunk)]
        )


def typical_embedding_norm(lm: CausalLM) -> float:
    return float(lm.input_embeddings.detach().float().norm(dim=-1).median())


@torch.no_grad()
def initial_embeddings(
    objective: MatchingObjective,
    seeds: list[int],
    *,
    num_tokens: int,
    candidates: int,
    norm: float,
    chunk: int = 64,
) -> Tensor:
    """Per example: `candidates` random-normal draws rescaled to the typical token norm; keep the
    one with the lowest matching loss. (N, n, d). Each example draws from its own seed; the
    losses of all examples' draws are taken together, ``chunk`` rows a forward (a forward reads
    the whole V x d head and target once, whatever its batch)."""
    d = objective.W.shape[1]
    draws = []
    for s in seeds:
        g = torch.Generator(device="cpu").manual_seed(s)
        draws.append(torch.randn((candidates, num_tokens, d), generator=g))
    cand = torch.cat(draws)
    cand = (cand * (norm / cand.norm(dim=-1, keepdim=True))).to(objective.lm.device)
    losses = torch.cat([objective(cand[i : i + chunk]) for i in range(0, len(cand), chunk)])
    best = losses.view(len(seeds), candidates).argmin(dim=1)  # (N,)
    return cand.view(len(seeds), candidates, num_tokens, d)[range(len(seeds)), best]


def clip_per_example_(grad: Tensor, max_norm: float) -> None:
    """Scale each example's gradient (N, ...) in place to L2 norm at most ``max_norm``."""
    norms = grad.flatten(1).norm(dim=1).clamp(min=1e-12)  # (N,)
    grad.mul_((max_norm / norms).clamp(max=1.0).view(-1, 1, 1))


def solve_batch(
    lm: CausalLM,
    layout: SequenceLayout,
    target: Target,
    items: list[tuple[int, float]],
    cfg: AdmmConfig,
    *,
    seed: int,
    allowed: Tensor,
    objective: MatchingObjective | None = None,
    projection: Callable[..., Tensor] = project,
    space: TargetSpace | None = None,
) -> list[SolveResult]:
    """Solve ADMM for examples of ONE label side by side. items: (synthetic_id, rho).

    ``objective`` and ``projection`` (called as ``core.projection.project``) exist for the
    benchmark: its reference (another loss of the same value, a projection re-running each
    prefix: same trajectory) and its re-creation of the authors' approach run this same loop.
    ``space``: the target's space (None = full_head), for the default objective."""
    start = time.perf_counter()
    objective = objective or MatchingObjective(lm, layout, target, space)
    N = len(items)
    dev = lm.device
    rho = torch.tensor([r for _, r in items], device=dev).view(-1, 1, 1)  # (N, 1, 1)
    prefixes = [layout.generation_ids] * N
    emb = lm.model.get_input_embeddings()
    first_allowed = layout.first_allowed(allowed.to(dev))

    X0 = initial_embeddings(
        objective,
        [example_seed(seed, sid) for sid, _ in items],
        num_tokens=cfg.num_tokens,
        candidates=cfg.init_candidates,
        norm=typical_embedding_norm(lm),
    )
    X = X0.clone().requires_grad_(True)
    Lam = torch.zeros_like(X0)
    opt = torch.optim.Adam([X], lr=cfg.lr)

    curves: dict[str, list[list[float]]] = {"f": [], "fz": [], "res": []}
    projections: list[Tensor] = []
    best_x = X0.clone()
    best_fx = torch.full((N,), float("inf"), device=dev)
    for _ in range(cfg.outer_iters):
        with torch.no_grad():
            tokens = projection(
                lm,
                X.detach() + Lam / rho,
                prefixes,
                allowed,
                rule=cfg.projection,
                k=cfg.topk,
                first_allowed=first_allowed,
            )
            Z = emb(tokens).float()  # (N, n, d)
        projections.append(tokens)
        curves["fz"].append(objective.of_tokens(tokens).tolist())
        for _ in range(cfg.inner_steps):
            opt.zero_grad(set_to_none=True)
            f = objective(X)
            penalty = 0.5 * rho.view(-1) * (X - Z + Lam / rho).square().sum((1, 2))
            # The gradient w.r.t. X only (a reference objective may hold other leaves).
            (X.grad,) = torch.autograd.grad((f + penalty).sum(), X)
            clip_per_example_(X.grad, cfg.grad_clip)
            opt.step()
        with torch.no_grad():
            fx = objective(X)
            improved = fx < best_fx
            best_fx = torch.where(improved, fx, best_fx)
            best_x[improved] = X.detach()[improved]
            Lam += rho * (X.detach() - Z)
            curves["f"].append(fx.tolist())
            curves["res"].append((X.detach() - Z).flatten(1).norm(dim=1).tolist())

    with torch.no_grad():
        final = projection(
            lm,
            best_x,
            prefixes,
            allowed,
            rule=cfg.projection,
            k=cfg.topk,
            first_allowed=first_allowed,
        )
    projections.append(final)
    curves["fz"].append(objective.of_tokens(final).tolist())

    fz = torch.tensor(curves["fz"])  # (outer_iters + 1, N)
    best_iter = fz.argmin(dim=0)  # first minimum: earliest iterate on ties
    seconds = (time.perf_counter() - start) / N
    results = []
    for i, (sid, r) in enumerate(items):
        t = int(best_iter[i])
        results.append(
            SolveResult(
                synthetic_id=sid,
                rho=r,
                token_ids=projections[t][i].tolist(),
                match_loss=float(fz[t, i]),
                initial_match_loss=float(fz[0, i]),
                best_iter=t,
                loss_curve=[c[i] for c in curves["f"]],
                projected_loss_curve=[c[i] for c in curves["fz"]],
                residual_curve=[c[i] for c in curves["res"]],
                seconds=seconds,
            )
        )
    return results
