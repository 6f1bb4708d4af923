"""GPU suite: the solver core alone (``core.admm.solve_batch``, no Ray) on a CUDA device, on a
randomly initialised model of Phi-1.5's shape in bf16 with the paper preset's ADMM settings."""

from __future__ import annotations

import time
from dataclasses import asdict, replace

import torch

from gradmm_ray.bench import harness
from gradmm_ray.bench.harness import CPU_MEMORY_METHOD, CUDA_MEMORY_METHOD, PeakMemory, sync
from gradmm_ray.bench.workload import Settings, make_layout, make_target, random_lm
from gradmm_ray.config import AdmmConfig
from gradmm_ray.core.admm import solve_batch
from gradmm_ray.core.lm import CausalLM
from gradmm_ray.core.projection import allowed_token_mask

# The gpu suite's model: microsoft/phi-1_5's shape (1.4B parameters), randomly initialised, bf16.
PHI_15_SHAPE = {
    "vocab_size": 51200,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "partial_rotary_factor": 0.5,
    "max_position_embeddings": 2048,
}
PHI_QUICK_SHAPE = {  # --quick: the same architecture, small enough for a CPU smoke test
    "vocab_size": 32000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "partial_rotary_factor": 0.5,
    "max_position_embeddings": 256,
}
HELP = """\
  gpu         The solver core alone (admm.solve_batch, no Ray) on a CUDA device, on a randomly
              initialised model of Phi-1.5's shape (V=51200, d=2048, 24 layers) in bf16, with
              the paper_sst2 preset's ADMM settings (20 tokens, 30 outer x 50 inner, 500
              init candidates, top-200 'reference' projection), one label, batch sizes 10 (the
              paper config's), 40 and 160.
              fields: by_batch {B: {seconds_per_example, peak_mem_bytes}}, and for the fastest:
                seconds_per_example, batch_size, peak_mem_bytes, paper_run_items (2 classes x
                candidates_per_class x rho values of the paper config) and paper_run_gpu_hours
                (one GPU; the paper's anchor: about 2 hours on one H100). No goal. Skipped
                without CUDA; --quick runs a tiny model of the same architecture, bf16, on
                whatever device there is (a smoke test of this suite, not a figure).
"""


def build_phi(shape: dict, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """A Phi model of ``shape``."""
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(
        **shape, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    return random_lm(PhiForCausalLM, config, device, dtype, "random-phi-1.5-shape")


def paper_run() -> tuple[AdmmConfig, int]:
    """The paper config's ADMM settings (word_like_only off: the stand-in tokenizer has no text)
    and its number of work items (classes x candidates_per_class x rho values)."""
    from gradmm_ray.config import build_config, load_yaml
    from gradmm_ray.presets import preset_path

    cfg = build_config(load_yaml(preset_path("paper_sst2.yaml")))
    items = len(cfg.data.label_names) * cfg.solve.candidates_per_class * len(cfg.admm.rho)
    return replace(cfg.admm, word_like_only=False, rho=(1.0,)), items


def suite(s: Settings, quick: bool, lm: CausalLM | None) -> dict:
    device = harness.device()
    if device.type != "cuda" and not quick:
        return {"skipped": "no CUDA device (--quick runs a CPU smoke test of this suite)"}
    shape = PHI_QUICK_SHAPE if quick else PHI_15_SHAPE
    admm, paper_items = paper_run()
    admm = s.gpu_admm or admm
    lm = build_phi(shape, device, torch.bfloat16)  # its own model, not the shared one
    layout = make_layout()
    target = make_target(lm, layout)
    allowed = allowed_token_mask(lm.tokenizer, lm.vocab_size, word_like_only=False)
    warm = replace(admm, outer_iters=1, inner_steps=1, init_candidates=2, num_tokens=4)
    solve_batch(lm, layout, target, [(0, 1.0)], warm, seed=0, allowed=allowed)  # kernels, caches
    by_batch = {}
    for batch in s.gpu_batches:
        items = [(i, 1.0) for i in range(batch)]
        with PeakMemory(device) as mem:
            sync(device)
            t0 = time.perf_counter()
            solve_batch(lm, layout, target, items, admm, seed=0, allowed=allowed)
            sync(device)
            seconds = time.perf_counter() - t0
        by_batch[str(batch)] = {"seconds_per_example": seconds / batch, "peak_mem_bytes": mem.peak}
    best = min(by_batch, key=lambda b: by_batch[b]["seconds_per_example"])
    per_example = by_batch[best]["seconds_per_example"]
    return {
        "by_batch": by_batch,
        "seconds_per_example": per_example,
        "batch_size": int(best),
        "peak_mem_bytes": by_batch[best]["peak_mem_bytes"],
        "paper_run_items": paper_items,
        "paper_run_gpu_hours": per_example * paper_items / 3600,
        "model": {
            **shape,
            "dtype": "bfloat16",
            "params": sum(p.numel() for p in lm.model.parameters()),
        },
        "memory_method": CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD,
        "settings": {"admm": asdict(admm), "batches": list(s.gpu_batches)},
    }
