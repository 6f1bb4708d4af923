"""What the benchmark measures on: its sizes (``Settings``: full and ``--quick``), the randomly
initialised models (no download, no tokenizer) and the random inputs and target.

The model for stage1 / stage2 / projection is a Llama-style causal LM with a realistic head
(V = 32000, d = 256, untied), fed random token ids; the gpu suite's has Phi-1.5's shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from gradmm_ray.config import AdmmConfig
from gradmm_ray.core.admm import SequenceLayout, Target
from gradmm_ray.core.lm import CausalLM
from gradmm_ray.core.target_space import target_space

# The benchmark model: Llama-style, realistic head, small body.
MODEL_SHAPE = {
    "vocab_size": 32000,
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "intermediate_size": 688,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
EMBEDDING_NORM = 1.4  # token embeddings at a real LM's scale (as the tiny model; Phi-1.5 ~1.4)
PROMPT_TOKENS = 24  # mean prompt length of the stage-1 pairs (uniform in 20..28)
FIRST_ID = 3  # ids 0..2 are pad / bos / eos
CLIP_NORM = 1.0
RELEASE_SIZE = 4096  # the target's noise is that of a release over this many examples


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    stage1_examples: int = 128
    stage1_micro: int = 64
    stage1_repeats_ours: int = 3  # ours is fast: best of a few runs
    stage2_batch: int = 8
    stage2_admm: AdmmConfig = field(
        default_factory=lambda: AdmmConfig(
            num_tokens=16, outer_iters=4, inner_steps=10, init_candidates=8, topk=200
        )
    )
    gap_batch: int = 4
    gap_steps: int = 5
    projection_positions: int = 32
    projection_batch: int = 8
    projection_k: int = 200
    projection_repeats: int = 3
    scaling_per_class: int = 48  # two labels: 2x this many work items
    scaling_batch: int = 2
    scaling_admm: AdmmConfig = field(
        default_factory=lambda: AdmmConfig(
            num_tokens=8, outer_iters=4, inner_steps=20, init_candidates=8, topk=50
        )
    )
    scaling_warmup: bool = True  # one small discarded run first
    gpu_batches: tuple[int, ...] = (10, 40, 160)
    gpu_admm: AdmmConfig | None = None  # None: the paper config's admm section


FULL = Settings()
QUICK = Settings(
    stage1_examples=16,
    stage1_micro=8,
    stage1_repeats_ours=1,
    stage2_batch=2,
    stage2_admm=AdmmConfig(num_tokens=4, outer_iters=1, inner_steps=2, init_candidates=2, topk=200),
    gap_batch=2,
    gap_steps=2,
    projection_positions=16,
    projection_repeats=2,
    scaling_per_class=2,
    scaling_batch=1,
    scaling_admm=AdmmConfig(num_tokens=4, outer_iters=1, inner_steps=2, init_candidates=2, topk=50),
    scaling_warmup=False,
    gpu_batches=(2,),
    gpu_admm=AdmmConfig(num_tokens=4, outer_iters=1, inner_steps=2, init_candidates=2, topk=50),
)


def settings_from_dict(d: dict) -> Settings:
    """The inverse of ``dataclasses.asdict(settings)`` (how a child process receives them)."""
    d = dict(d)
    d["gpu_batches"] = tuple(d["gpu_batches"])
    for key in ("stage2_admm", "scaling_admm", "gpu_admm"):
        if d[key] is None:
            continue
        adm = dict(d[key])
        adm["rho"] = tuple(adm["rho"])
        d[key] = AdmmConfig(**adm)
    return Settings(**d)


# ---------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class StandInTokenizer:
    """All the package reads from a tokenizer on these paths: the pad id and the special ids."""

    pad_token_id: int = 0
    all_special_ids: tuple[int, ...] = (0, 1, 2)


def random_lm(
    model_class: type, config, device: torch.device, dtype: torch.dtype, name: str
) -> CausalLM:
    """A randomly initialised causal LM (seed 0), built on ``device``, token embeddings at
    EMBEDDING_NORM, frozen."""
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(config)
    model.get_input_embeddings().weight.data.normal_(
        0.0, EMBEDDING_NORM / math.sqrt(config.hidden_size)
    )
    model.to(dtype).eval().requires_grad_(False)
    return CausalLM(model, StandInTokenizer(), name, None, device, dtype)


def build_lm(device: torch.device, dtype: torch.dtype = torch.float32) -> CausalLM:
    """The benchmark LM: Llama-style, MODEL_SHAPE (fp32 unless told)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **MODEL_SHAPE,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return random_lm(LlamaForCausalLM, config, device, dtype, "random-llama-32k")


# ---------------------------------------------------------------------------------------------
# Inputs


def random_ids(n: int, g: torch.Generator) -> list[int]:
    return torch.randint(FIRST_ID, MODEL_SHAPE["vocab_size"], (n,), generator=g).tolist()


def random_pairs(n: int, seed: int = 1) -> list[tuple[list[int], int]]:
    """n (ids, prompt length) pairs: prompt of 20..28 random ids, one random completion id."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(PROMPT_TOKENS - 4, PROMPT_TOKENS + 5, (n,), generator=g).tolist()
    return [(random_ids(length + 1, g), length) for length in lengths]


def make_layout() -> SequenceLayout:
    """One label's sequence by hand: [bos] X [3 suffix ids] [1 completion id]."""
    g = torch.Generator().manual_seed(2)
    return SequenceLayout(
        prefix_ids=[1],
        suffix_ids=random_ids(3, g),
        completion_ids=random_ids(1, g),
        generation_ids=[1, *random_ids(6, g)],
    )


def make_target(lm: CausalLM, layout: SequenceLayout, n: int = 16) -> Target:
    """A released-style target (V, d): the mean clipped gradient of n random prompts with the
    layout's completion, plus the noise of a release over RELEASE_SIZE examples (noise
    multiplier 1: N(0, C^2) on the sum, / RELEASE_SIZE). Signal and noise norms are comparable,
    so matching losses spread over a useful range (a smaller release drowns the signal)."""
    g = torch.Generator().manual_seed(4)
    pairs = [
        (random_ids(PROMPT_TOKENS, g) + layout.completion_ids, PROMPT_TOKENS) for _ in range(n)
    ]
    W, b = head = lm.head_params_fp32()
    with torch.no_grad():
        s_w, s_b = target_space("full_head", lm, {}, head=head).clipped_sum_of_pairs(
            lm, pairs, CLIP_NORM
        )  # (V, d), (V,)

    def noise(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(lm.device) * (CLIP_NORM / RELEASE_SIZE)

    bias = s_b / n + noise(b.shape) if b is not None else None
    return Target(s_w / n + noise(W.shape), bias)


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
