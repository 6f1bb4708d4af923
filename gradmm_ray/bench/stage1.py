"""Stage-1 suite: the clipped per-example LM-head gradient sum over the same N random
(prompt, 1-token completion) pairs, three ways: ours (``TargetSpace.clipped_sum_of_pairs``, full head, per
micro-batch) against our per-example autograd loop and our vmap reference (``references``)."""

from __future__ import annotations

import time
from functools import partial

import torch

from gradmm_ray.bench.harness import PeakMemory, goal, measure, memory_method, sync
from gradmm_ray.bench.references import stage1_loop, stage1_vmap
from gradmm_ray.bench.workload import CLIP_NORM, PROMPT_TOKENS, Settings, chunks, random_pairs
from gradmm_ray.core.lm import CausalLM
from gradmm_ray.core.target_space import target_space

HELP = """\
  stage1      Per-example clipped LM-head gradient sum over the same N random (prompt, 1-token
              completion) pairs, three ways:
                ours  TargetSpace.clipped_sum_of_pairs, full head (completion states -> logits_grad ->
                      Gram norms -> clip factors -> one matmul) in micro-batches (no V x d
                      tensor per example);
                loop  our per-example autograd reference: per example, a full forward, CE on the
                      completion token, autograd into the head only (materialises the V x d
                      gradient), clip, add;
                vmap  our torch.func reference, vmap(grad(head-only CE)) over (A_i, y_i):
                      materialises (micro, V, d); A from the base model, counted in its time.
              fields: examples_per_s {ours, loop, vmap} (wall clock; ours best of 3 runs),
                speedup_vs_loop, speedup_vs_vmap, seconds {..}, cpu_seconds {..} and
                cpu_time_speedup {loop, vmap} (process CPU time: less sensitive to other load),
                peak_mem_bytes {..}, peak_mem_ratio_vs_loop (ours / loop, < 1 is better),
                rel_error {loop, vmap} and max_rel_error (||S_ours - S_ref|| / ||S_ref||),
                memory_method. Goals: >= 50x over loop, >= 5x over vmap, max_rel_error <= 1e-5.
"""


@torch.inference_mode()
def stage1_ours(lm: CausalLM, pairs: list, *, micro: int, clip_norm: float) -> torch.Tensor:
    """This implementation: the ONE stage-1 function, once per micro-batch. (V, d)."""
    space = target_space("full_head", lm, {})
    S = torch.zeros_like(space.W)  # (V, d)
    for chunk in chunks(pairs, micro):
        s_w, _ = space.clipped_sum_of_pairs(lm, chunk, clip_norm)
        S += s_w
    return S


METHODS = {"ours": stage1_ours, "loop": stage1_loop, "vmap": stage1_vmap}


def run_method(lm: CausalLM, s: Settings, method: str) -> dict:
    """Time (best of the repeats) and peak memory of one stage-1 method; its sum S (V, d)."""
    fn = partial(METHODS[method], micro=s.stage1_micro, clip_norm=CLIP_NORM)
    pairs = random_pairs(s.stage1_examples)
    repeats = s.stage1_repeats_ours if method == "ours" else 1
    times, S = [], None
    with PeakMemory(lm.device) as mem:
        fn(lm, pairs[: min(4, len(pairs))])  # warm-up
        for _ in range(repeats):
            S = None  # not alive during the next run
            sync(lm.device)
            t0, c0 = time.perf_counter(), time.process_time()
            S = fn(lm, pairs)
            sync(lm.device)
            times.append((time.perf_counter() - t0, time.process_time() - c0))
    wall, cpu = min(times)
    return {"seconds": wall, "cpu_seconds": cpu, "peak_bytes": mem.peak, "sum": S.cpu()}


def suite(s: Settings, quick: bool, lm: CausalLM | None = None) -> dict:
    runs = measure(f"{__name__}:run_method", list(METHODS), s, one_process_each=not quick)
    n = s.stage1_examples
    eps = {m: n / r["seconds"] for m, r in runs.items()}
    ours = runs["ours"]["sum"].double()
    rel = {
        m: float((ours - runs[m]["sum"].double()).norm() / runs[m]["sum"].double().norm())
        for m in ("loop", "vmap")
    }
    peak = {m: r["peak_bytes"] for m, r in runs.items()}
    out = {
        "examples_per_s": eps,
        "speedup_vs_loop": eps["ours"] / eps["loop"],
        "speedup_vs_vmap": eps["ours"] / eps["vmap"],
        "peak_mem_bytes": peak,
        "peak_mem_ratio_vs_loop": peak["ours"] / max(peak["loop"], 1),
        "peak_mem_ratio_vs_vmap": peak["ours"] / max(peak["vmap"], 1),
        "rel_error": rel,
        "max_rel_error": max(rel.values()),
        "seconds": {m: r["seconds"] for m, r in runs.items()},
        "cpu_seconds": {m: r["cpu_seconds"] for m, r in runs.items()},
        "cpu_time_speedup": {
            m: runs[m]["cpu_seconds"] / runs["ours"]["cpu_seconds"] for m in ("loop", "vmap")
        },
        "memory_method": memory_method(quick),
        "settings": {
            "examples": n,
            "micro_batch": s.stage1_micro,
            "repeats_ours": s.stage1_repeats_ours,
            "prompt_tokens": f"{PROMPT_TOKENS - 4}..{PROMPT_TOKENS + 4}",
            "completion_tokens": 1,
            "clip_norm": CLIP_NORM,
        },
    }
    out["goals"] = {
        "speedup_vs_loop": goal(out["speedup_vs_loop"], ">=", 50),
        "speedup_vs_vmap": goal(out["speedup_vs_vmap"], ">=", 5),
        "max_rel_error": goal(out["max_rel_error"], "<=", 1e-5),
    }
    return out
