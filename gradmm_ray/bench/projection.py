"""Projection suite: the KV-cached projection of free embeddings onto tokens
(``core.projection.project``) against re-running the whole prefix at every position (the
authors' way), for both rules."""

from __future__ import annotations

import time

import torch

from gradmm_ray.bench.harness import goal, sync
from gradmm_ray.bench.workload import EMBEDDING_NORM, MODEL_SHAPE, Settings, make_layout
from gradmm_ray.core.lm import CausalLM
from gradmm_ray.core.projection import RULES, allowed_token_mask, project

HELP = """\
  projection  project(..., use_cache=False) time / project(..., use_cache=True) time for n = 32
              positions, batch 8, k = 200, both rules. Uncached = the authors' way: the whole
              prefix through the full model at every position, logits at every position. Both
              variants find the 'reference' rule's cosine candidates for all positions in one
              matmul (the authors' code redoes it per position), so the ratio is conservative.
              fields: speedup_cached (the 'reference' rule's), speedup_cached_by_rule,
                seconds {rule: {cached, uncached}}, identical_tokens (both rules, both variants
                give the same ids). Goal: >= 4x.
"""


def suite(s: Settings, quick: bool, lm: CausalLM | None) -> dict:
    g = torch.Generator().manual_seed(3)
    d = MODEL_SHAPE["hidden_size"]
    U = torch.randn((s.projection_batch, s.projection_positions, d), generator=g)  # (N, n, d)
    U = (U * (EMBEDDING_NORM / U.norm(dim=-1, keepdim=True))).to(lm.device)
    prefixes = [make_layout().generation_ids] * s.projection_batch
    allowed = allowed_token_mask(lm.tokenizer, lm.vocab_size, word_like_only=False)

    def run(rule: str, use_cache: bool) -> tuple[float, torch.Tensor]:
        sync(lm.device)
        t0 = time.perf_counter()
        ids = project(lm, U, prefixes, allowed, rule=rule, k=s.projection_k, use_cache=use_cache)
        sync(lm.device)
        return time.perf_counter() - t0, ids  # ids (N, n)

    seconds, speedup, identical = {}, {}, {}
    for rule in RULES:
        for use_cache in (True, False):  # warm-up
            project(
                lm, U[:, :2], prefixes, allowed, rule=rule, k=s.projection_k, use_cache=use_cache
            )
        best = {True: float("inf"), False: float("inf")}
        ids = {}
        for _ in range(s.projection_repeats):  # interleaved, best of: robust to a loaded machine
            for use_cache in (True, False):
                t, ids[use_cache] = run(rule, use_cache)
                best[use_cache] = min(best[use_cache], t)
        seconds[rule] = {"cached": best[True], "uncached": best[False]}
        speedup[rule] = best[False] / best[True]
        identical[rule] = bool(torch.equal(ids[True], ids[False]))
    out = {
        "speedup_cached": speedup["reference"],
        "speedup_cached_by_rule": speedup,
        "seconds": seconds,
        "identical_tokens": all(identical.values()),
        "identical_tokens_by_rule": identical,
        "settings": {
            "positions": s.projection_positions,
            "batch": s.projection_batch,
            "k": s.projection_k,
            "generation_prefix_tokens": len(prefixes[0]),
            "repeats": s.projection_repeats,
        },
    }
    out["goals"] = {"speedup_cached": goal(out["speedup_cached"], ">=", 4)}
    return out
