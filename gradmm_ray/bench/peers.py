"""Peers suite (issue 14): our fast paths against OUTSIDE code and against the limit, in this
process, on the benchmark model and on SmolLM2 (timings only; no peak memory).

Stage 1: ours (``TargetSpace.clipped_sum_of_pairs`` per micro-batch, full head) vs Opacus ghost
clipping on the head (the only parameter requiring grad; same rows, same clip norm; Opacus's clipped SUM compared
with ours) vs a forward-only pass of the same model on the same rows (the floor).

Stage 2: ours (``solve_batch``) vs a re-creation, written here from the description in issue 14
(not the authors' code), of the authors' approach (BigML-CS-UCLA/GRADMM): ONE joint gradient per
batch (mean CE over the batch, one V x d gradient by autograd with create_graph=True), logits at
every position plus a zero-weighted perplexity forward, projection with
``model.generate(max_new_tokens=1)`` per position; vs its lean joint variant (logits at the loss
positions only, no perplexity forward, inside our ADMM loop with our cached projection); vs the
floor: plain PyTorch forward + backward of the same model on the same shape for the same number of inner
steps. Also one X-update step of each objective (the objective-level comparison).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F

from gradmm_ray.bench.harness import goal, sync
from gradmm_ray.bench.workload import (
    CLIP_NORM,
    Settings,
    build_lm,
    chunks,
    make_layout,
    make_target,
    random_pairs,
)
from gradmm_ray.config import AdmmConfig
from gradmm_ray.core.admm import (
    MatchingObjective,
    solve_batch,
    typical_embedding_norm,
)
from gradmm_ray.core.lm import CausalLM
from gradmm_ray.core.projection import allowed_token_mask
from gradmm_ray.core.target_space import target_space

HELP = """\
  peers       Against outside code and the limit, in one process (wall clock, best of repeats),
              on the benchmark model and then on SmolLM2 (real vocabulary, tied head; fewer rows,
              batch 4, 8 tokens, 2 x 10 iterations; under "smollm2", skipped with --quick);
              fp32 on a CPU, bf16 on a CUDA device (settings.device, settings.dtype):
              stage 1 (same rows, micro-batches, clip norm; head only):
                ours          core.target_space full_head, clipped_sum_of_pairs per micro-batch;
                opacus_ghost  Opacus GradSampleModuleFastGradientClipping (ghost clipping) on
                              the head, body forward frozen, DPTensorFastGradientClipping's two
                              backwards; its clipped sum (head.weight.grad) compared with ours;
                forward_floor the same model's forward on the same rows to the logits at the
                              completion positions (inference mode): what no method can beat.
              fields: peers.stage1_seconds {ours, opacus_ghost, forward_floor},
                stage1_ours_over_floor, stage1_floor_fraction (floor / ours),
                stage1_opacus_over_ours, stage1_rel_error_opacus
                (||S_ours - S_opacus|| / ||S_opacus||; Opacus clips by C / (norm + 1e-6)).
              stage 2 (one solve of a batch, the stage2 suite's sizes):
                ours          core.admm.solve_batch (full_head target, as the authors');
                authors       our re-creation of the authors' approach from issue 14's
                              description (not their code): one joint gradient per batch (mean
                              CE, V x d, create_graph=True), logits at every position, a
                              zero-weighted perplexity forward, projection by
                              model.generate(max_new_tokens=1) per position (top-k logits, then
                              the nearest embedding), in solve_batch's loop (same init, Adam,
                              clipping, dual update);
                authors_lean  the lean joint objective (logits at the loss positions only, no
                              perplexity forward) in solve_batch's loop with our projection;
                fwd_bwd_floor plain PyTorch forward + backward (CE at the completion, gradient to
                              X) of the same model on the same shape, outer_iters x inner_steps
                              times: no init, no projection, no dual update.
              fields: peers.stage2_seconds {..}, stage2_authors_over_ours,
                stage2_authors_lean_over_ours, stage2_floor_over_ours, stage2_step_seconds
                {ours, authors, authors_lean, fwd_bwd_floor} (one X-update step: objective +
                penalty, gradient to X; mean of repeats), stage2_step_*_over_ours.
              Also written as the issue names them: stage1.speedup_vs_opacus_ghost,
                stage1.fraction_of_forward_only, stage2.speedup_vs_authors,
                stage2.fraction_of_fwd_bwd (the benchmark model's figures).
              Goals (issue 14): stage1 speedup_vs_opacus_ghost >= 1.7, fraction_of_forward_only
                >= 0.85; stage2 speedup_vs_authors >= 8, fraction_of_fwd_bwd >= 0.6;
                rel_error_opacus <= 1e-4.
"""


def _timed(fn, repeats: int, warm: bool = True) -> tuple[float, object]:
    """Best wall-clock time of ``repeats`` calls after one warm-up call; the last result."""
    if warm:
        fn()
    best, out = float("inf"), None
    for _ in range(repeats):
        out = None
        t0 = time.perf_counter()
        out = fn()
        sync(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        best = min(best, time.perf_counter() - t0)
    return best, out


# ---------------------------------------------------------------------------------------------
# Stage 1


def stage1_ours(lm: CausalLM, micro: int):
    space = target_space("full_head", lm, {})

    @torch.inference_mode()
    def run(pairs: list) -> torch.Tensor:
        S = torch.zeros_like(space.W)
        for chunk in chunks(pairs, micro):
            S += space.clipped_sum_of_pairs(lm, chunk, CLIP_NORM)[0]
        return S

    return run


def stage1_opacus_ghost(lm: CausalLM, micro: int):
    """Opacus ghost clipping on a private fp32 copy of the head (the only parameter requiring
    grad); the frozen body gives the completion states, as for ours."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    head = copy.deepcopy(lm.head).float().requires_grad_(True).train()  # hooks need train()
    gsm = GradSampleModuleFastGradientClipping(
        head, batch_first=True, loss_reduction="sum", max_grad_norm=CLIP_NORM
    )
    opt = torch.optim.SGD(head.parameters(), lr=0.0)  # only its zero_grad is used

    def run(pairs: list) -> torch.Tensor:
        S = torch.zeros_like(head.weight)
        for chunk in chunks(pairs, micro):
            with torch.no_grad():
                A, y, mask = lm.completion_states(chunk)  # (m, T, d); T = 1 here, no padding
            logits = gsm(A)  # (m, T, V)
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
            loss = (ce.view(y.shape) * mask).sum(1) / mask.sum(1)  # (m,) mean over T
            DPTensorFastGradientClipping(gsm, opt, loss, "sum").backward()
            S += head.weight.grad
        return S.detach()

    return run


def stage1_forward_floor(lm: CausalLM, micro: int):
    W, b = lm.head_params_fp32()

    @torch.inference_mode()
    def run(pairs: list) -> torch.Tensor:
        out = None
        for chunk in chunks(pairs, micro):
            A, _, _ = lm.completion_states(chunk)
            out = A @ W.T if b is None else A @ W.T + b
        return out

    return run


def stage1(lm: CausalLM, s: Settings, repeats: int, warm: bool = True) -> dict:
    pairs = random_pairs(s.stage1_examples)
    makers = {
        "ours": stage1_ours,
        "opacus_ghost": stage1_opacus_ghost,
        "forward_floor": stage1_forward_floor,
    }
    seconds, sums = {}, {}
    for name, make in makers.items():
        fn = make(lm, s.stage1_micro)
        seconds[name], sums[name] = _timed(lambda fn=fn: fn(pairs), repeats, warm)
    ours, opacus = sums["ours"].double(), sums["opacus_ghost"].double()
    return {
        "stage1_seconds": seconds,
        "stage1_ours_over_floor": seconds["ours"] / seconds["forward_floor"],
        "stage1_floor_fraction": seconds["forward_floor"] / seconds["ours"],
        "stage1_opacus_over_ours": seconds["opacus_ghost"] / seconds["ours"],
        "stage1_rel_error_opacus": float((ours - opacus).norm() / opacus.norm()),
    }


# ---------------------------------------------------------------------------------------------
# Stage 2: the authors' approach, re-created from issue 14's description


class JointObjective(MatchingObjective):
    """ONE joint head gradient per batch: mean CE over the batch's completion positions, its
    V x d gradient by autograd (create_graph=True), 1 - cos to the target; returned as (N,)
    equal shares (loss / N) so that their sum is the joint loss. ``lean=False``: logits at every
    position and a zero-weighted perplexity forward of the model; ``lean=True``: logits at the
    loss positions only. The head weight only (the benchmark model has no bias, no tail)."""

    def __init__(self, lm: CausalLM, layout, target, *, lean: bool):
        super().__init__(lm, layout, target)
        self.lean = lean
        emb = lm.model.get_input_embeddings()
        # Known next tokens after the synthetic part (suffix + completion): the perplexity labels.
        self.known_ids = torch.tensor(
            [*layout.suffix_ids, *layout.completion_ids], device=lm.device
        )
        self._emb = emb

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        N, n, _ = X.shape
        T = self.T
        create_graph = torch.is_grad_enabled() and X.requires_grad
        with torch.enable_grad():
            parts = [self.prefix, X.to(self.prefix.dtype), self.suffix, self.completion]
            embeds = torch.cat([p.expand(N, -1, -1) for p in parts], dim=1)  # (N, L, d)
            attention = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            hidden = self.lm.hidden_states(inputs_embeds=embeds, attention_mask=attention)
            W = self.W.detach().requires_grad_(True)
            start = self.n_fixed_before + n + self.n_after - 1
            if self.lean:
                logits = hidden[:, start : start + T].float().contiguous() @ W.T  # (N, T, V)
            else:
                logits = (hidden.float() @ W.T)[:, start : start + T]  # every position, then cut
            ce = F.cross_entropy(logits.reshape(N * T, -1), self.targets[0].repeat(N))  # mean
            (g,) = torch.autograd.grad(ce, W, create_graph=create_graph)  # (V, d): joint
            G = self.target.weight
            loss = 1.0 - (g * G).sum() / (g.norm() * G.norm())
            if not self.lean:  # the zero-weighted perplexity forward (a second full forward)
                out = self.lm.model(inputs_embeds=embeds, attention_mask=attention).logits
                k = len(self.known_ids)
                ppl = F.cross_entropy(
                    out[:, -k - 1 : -1].float().reshape(N * k, -1), self.known_ids.repeat(N)
                )
                loss = loss + 0.0 * ppl
            shares = (loss / N).expand(N)
        return shares if create_graph else shares.detach()


@torch.no_grad()
def generate_projection(
    lm: CausalLM, U: torch.Tensor, prefixes: list[list[int]], allowed, *, k: int, **_
) -> torch.Tensor:
    """Called as ``core.projection.project`` (the paper's rule; the authors' code has no other
    rule and no first-position constraint, so those arguments are ignored). Per position:
    model.generate(max_new_tokens=1) on the prefix so far, the top-k next-token logits (allowed
    ids), then the candidate whose embedding is nearest to U_j. (N, n) ids. The prefixes of one
    label are equal, so no padding."""
    N, n, _ = U.shape
    E = lm.input_embeddings.detach().float()
    block = (~allowed.to(lm.device)).float() * torch.finfo(torch.float32).min
    ids = torch.tensor(prefixes, device=lm.device)
    for j in range(n):
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=1,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
        cand = (out.logits[0].float() + block).topk(k, dim=-1).indices  # (N, k)
        pick = (E[cand] - U[:, j].unsqueeze(1)).square().sum(-1).argmin(-1)  # (N,)
        ids = torch.cat([ids, cand.gather(1, pick.unsqueeze(1))], dim=1)
    return ids[:, -n:]


def authors_solve(lm, layout, target, items, cfg, *, seed, allowed) -> list:
    """solve_batch's ADMM loop (init, Adam, per-example clipping, dual update) around the joint
    objective and the generate() projection."""
    objective = JointObjective(lm, layout, target, lean=False)
    return solve_batch(
        lm,
        layout,
        target,
        items,
        cfg,
        seed=seed,
        allowed=allowed,
        objective=objective,
        projection=generate_projection,
    )


def fwd_bwd_floor(lm, layout, target, N: int, cfg, steps: int) -> None:
    """Plain forward + backward of the same model on the same shape, ``steps`` times."""
    obj = MatchingObjective(lm, layout, target)  # its layout tensors only
    W = obj.W
    X = torch.randn(
        N, cfg.num_tokens, W.shape[1], device=lm.device, dtype=obj.prefix.dtype, requires_grad=True
    )
    start = obj.n_fixed_before + cfg.num_tokens + obj.n_after - 1
    for _ in range(steps):
        parts = [obj.prefix, X, obj.suffix, obj.completion]
        embeds = torch.cat([p.expand(N, -1, -1) for p in parts], dim=1)
        attention = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        hidden = lm.hidden_states(inputs_embeds=embeds, attention_mask=attention)
        # contiguous, as ours: a strided slice would make the head matmul a slow bmm
        logits = hidden[:, start : start + obj.T].float().contiguous() @ W.T
        ce = F.cross_entropy(logits.reshape(N * obj.T, -1), obj.targets[0].repeat(N))
        torch.autograd.grad(ce, X)


def step_seconds(objective, X0: torch.Tensor, repeats: int) -> float:
    """Mean seconds of one X-update step's gradient: objective + penalty, gradient to X."""

    def one() -> None:
        X = X0.clone().requires_grad_(True)
        penalty = 0.5 * (X - X0.detach()).square().sum((1, 2))
        torch.autograd.grad((objective(X) + penalty).sum(), X)

    one()
    t0 = time.perf_counter()
    for _ in range(repeats):
        one()
    return (time.perf_counter() - t0) / repeats


def stage2(lm: CausalLM, s: Settings, repeats: int, warm: bool = True) -> dict:
    layout = make_layout()
    target = make_target(lm, layout)
    allowed = allowed_token_mask(lm.tokenizer, lm.vocab_size, word_like_only=False)
    items = [(i, 1.0) for i in range(s.stage2_batch)]
    cfg = s.stage2_admm
    warmup = replace(cfg, outer_iters=1, inner_steps=1, init_candidates=2, num_tokens=4)
    N, steps = len(items), cfg.outer_iters * cfg.inner_steps
    lean = JointObjective(lm, layout, target, lean=True)
    solvers = {
        "ours": lambda c, it: solve_batch(lm, layout, target, it, c, seed=0, allowed=allowed),
        "authors": lambda c, it: authors_solve(lm, layout, target, it, c, seed=0, allowed=allowed),
        "authors_lean": lambda c, it: solve_batch(
            lm, layout, target, it, c, seed=0, allowed=allowed, objective=lean
        ),
    }
    seconds = {}
    for name, solver in solvers.items():
        if warm:
            solver(warmup, items[:1])
        seconds[name] = min(_once(solver, cfg, items) for _ in range(repeats))
    seconds["fwd_bwd_floor"] = min(
        _once(lambda c, it: fwd_bwd_floor(lm, layout, target, N, c, steps), cfg, items)
        for _ in range(repeats)
    )
    # One X-update step of each objective on the same X.
    g = torch.Generator().manual_seed(5)
    X0 = torch.randn((N, cfg.num_tokens, lm.input_embeddings.shape[1]), generator=g)
    X0 = (X0 * (typical_embedding_norm(lm) / X0.norm(dim=-1, keepdim=True))).to(lm.device)
    reps = 3 * repeats if warm else 1
    step = {
        "ours": step_seconds(MatchingObjective(lm, layout, target), X0, reps),
        "authors": step_seconds(JointObjective(lm, layout, target, lean=False), X0, reps),
        "authors_lean": step_seconds(lean, X0, reps),
    }
    t0 = time.perf_counter()
    for _ in range(reps):
        fwd_bwd_floor(lm, layout, target, N, cfg, 1)
    step["fwd_bwd_floor"] = (time.perf_counter() - t0) / reps
    return {
        "stage2_seconds": seconds,
        "stage2_authors_over_ours": seconds["authors"] / seconds["ours"],
        "stage2_authors_lean_over_ours": seconds["authors_lean"] / seconds["ours"],
        "stage2_floor_over_ours": seconds["fwd_bwd_floor"] / seconds["ours"],
        "stage2_step_seconds": step,
        "stage2_step_authors_over_ours": step["authors"] / step["ours"],
        "stage2_step_authors_lean_over_ours": step["authors_lean"] / step["ours"],
        "stage2_step_floor_over_ours": step["fwd_bwd_floor"] / step["ours"],
    }


def _once(solver, cfg, items) -> float:
    t0 = time.perf_counter()
    solver(cfg, items)
    return time.perf_counter() - t0


# SmolLM2 (30 layers, d 576, V 49,152, tied head) costs ~20x the benchmark model per step on
# this CPU: fewer rows, a smaller batch and fewer steps keep its part to ~2 minutes.
SMOLLM2_SIZES = {
    "stage1_examples": 32,
    "stage1_micro": 32,
    "stage2_batch": 4,
    "stage2_admm": AdmmConfig(
        num_tokens=8, outer_iters=2, inner_steps=10, init_candidates=4, topk=200
    ),
}


def measure(lm: CausalLM, s: Settings, quick: bool) -> dict:
    """Both stages' comparisons on one model, with its sizes."""
    repeats = 1 if quick else 3  # --quick: one run each, no warm-up (a smoke test)
    out = {**stage1(lm, s, repeats, not quick), **stage2(lm, s, 1 if quick else 2, not quick)}
    out["settings"] = {
        "model": lm.name,
        "device": lm.device.type,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "stage1_examples": s.stage1_examples,
        "stage1_micro_batch": s.stage1_micro,
        "clip_norm": CLIP_NORM,
        "stage2_batch": s.stage2_batch,
        "stage2_admm": asdict(s.stage2_admm),
        "repeats": repeats,
        "timing": "one process, shared model; best of repeats after a warm-up (--quick: one "
        "run, no warm-up)",
    }
    return out


def _smollm2(like: CausalLM) -> CausalLM | None:
    """SmolLM2 as ``model.name: smollm2-135m`` resolves it (the cache ``make install`` fills, or
    the package registry) on ``like``'s device and dtype, or None where it is not reachable."""
    from gradmm_ray.core.lm import load_causal_lm
    from gradmm_ray.errors import UserError

    dtype = str(like.dtype).removeprefix("torch.")
    try:
        return load_causal_lm("smollm2-135m", dtype=dtype, device=like.device.type, progress=False)
    except UserError:
        return None


def suite(s: Settings, quick: bool, lm: CausalLM | None) -> dict:
    if lm.device.type == "cuda":  # issue 14: the GPU figures in bf16
        lm = build_lm(lm.device, torch.bfloat16)
    out = measure(lm, s, quick)
    if not quick:  # SmolLM2: a real vocabulary and a tied head, the comparison on a real body
        smol = _smollm2(lm)
        out["smollm2"] = (
            measure(smol, replace(s, **SMOLLM2_SIZES), quick)
            if smol is not None
            else {"skipped": "SmolLM2 is not in the cache (make install converts it)"}
        )
    # The issue's names, in the stage suites' results (the benchmark model's figures).
    headline = {
        "stage1": {
            "speedup_vs_opacus_ghost": out["stage1_opacus_over_ours"],
            "fraction_of_forward_only": out["stage1_floor_fraction"],
        },
        "stage2": {
            "speedup_vs_authors": out["stage2_authors_over_ours"],
            "fraction_of_fwd_bwd": out["stage2_floor_over_ours"],
        },
    }
    out["_into"] = headline
    out["goals"] = {
        "stage1.speedup_vs_opacus_ghost": goal(out["stage1_opacus_over_ours"], ">=", 1.7),
        "stage1.fraction_of_forward_only": goal(out["stage1_floor_fraction"], ">=", 0.85),
        "stage1_rel_error_opacus": goal(out["stage1_rel_error_opacus"], "<=", 1e-4),
        "stage2.speedup_vs_authors": goal(out["stage2_authors_over_ours"], ">=", 8),
        "stage2.fraction_of_fwd_bwd": goal(out["stage2_floor_over_ours"], ">=", 0.6),
    }
    return out
