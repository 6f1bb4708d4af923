"""Performance benchmark of GRADMM's last-layer gradient matching against the reference approach.

`python jobs/benchmark.py --json outputs/benchmark.json [--suite NAME ...] [--quick]`; see
`--help` for the suites and every JSON field. One process (plus one fresh child process per
memory-measured method); CUDA when available, else CPU; all seeds fixed. Ray is imported only by
the `scaling` suite, so the other suites run where Ray is not installed.

The model for stage1 / stage2 / projection is a randomly initialised Llama-style causal LM with a
realistic head (V = 32000, d = 256, untied), fed random token ids: no download, no tokenizer.
"""

from __future__ import annotations

import os

# Before transformers is imported anywhere (here or in a child process).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Progress bars (model loading, run_solve) off; tqdm reads this when it is imported.
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import ctypes  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gradmm_ray.config import AdmmConfig  # noqa: E402
from gradmm_ray.core.admm import (  # noqa: E402
    MatchingObjective,
    SequenceLayout,
    Target,
    clip_per_example_,
    example_seed,
    initial_embeddings,
    solve_batch,
    typical_embedding_norm,
)
from gradmm_ray.core.headgrad import (  # noqa: E402
    clip_factors,
    clipped_head_grad_sum,
    head_grad_sq_norms,
    head_logits,
    logits_grad,
)
from gradmm_ray.core.lm import CausalLM  # noqa: E402
from gradmm_ray.core.projection import RULES, allowed_token_mask, project  # noqa: E402

SUITES = ("stage1", "stage2", "projection", "scaling", "gpu")

# The benchmark model: Llama-style, realistic head, small body.
MODEL_SHAPE = {
    "vocab_size": 32000,
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "intermediate_size": 688,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
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
PAPER_CONFIG = Path(__file__).resolve().parent / "configs" / "paper_sst2.yaml"
EMBEDDING_NORM = 1.4  # token embeddings at a real LM's scale (as the tiny model; Phi-1.5 ~1.4)
PROMPT_TOKENS = 24  # mean prompt length of the stage-1 pairs (uniform in 20..28)
FIRST_ID = 3  # ids 0..2 are pad / bos / eos
CLIP_NORM = 1.0

HELP = """\
suites (default: all five; results are merged into an existing --json file by suite):

  stage1      Per-example clipped LM-head gradient sum over the same N random (prompt, 1-token
              completion) pairs, three ways:
                ours  lm.completion_states -> logits_grad -> head_grad_sq_norms -> clip_factors
                      -> clipped_head_grad_sum, in micro-batches (no V x d tensor per example);
                loop  the reference code: per example, a full forward, CE on the completion token,
                      backward into the head weight only (materialises the V x d gradient), clip,
                      add;
                vmap  torch.func vmap(grad(head-only CE)) over (A_i, y_i): materialises
                      (micro, V, d); A from the base model, counted in its time.
              fields: examples_per_s {ours, loop, vmap} (wall clock; ours best of 3 runs),
                speedup_vs_loop, speedup_vs_vmap, seconds {..}, cpu_seconds {..} and
                cpu_time_speedup {loop, vmap} (process CPU time: less sensitive to other load),
                peak_mem_bytes {..}, peak_mem_ratio_vs_loop (ours / loop, < 1 is better),
                rel_error {loop, vmap} and max_rel_error (||S_ours - S_ref|| / ||S_ref||),
                memory_method. Goals: >= 50x over loop, >= 5x over vmap, max_rel_error <= 1e-5.

  stage2      One ADMM solve of a batch of synthetic examples against a noisy V x d target:
                ours       gradmm_ray.core.admm.solve_batch (closed-form matching loss, one backward;
                           KV-cached projection);
                reference  the same ADMM loop with the paper code's loss: the per-example head
                           gradient materialised by autograd.grad(create_graph=True), then the
                           cosine, then a double backward; projection re-running the whole prefix
                           (project(use_cache=False)).
              Same init procedure, iteration counts, target and seeds.
              fields: seconds_per_example {ours, reference} (wall clock, one solve each),
                speedup_vs_reference, cpu_seconds {..}, cpu_time_speedup, peak_mem_bytes {..},
                peak_mem_ratio_vs_reference, objective_gap (and objective_gap_method),
                objective_gap_same_x, grad_rel_diff, same_init, same_tokens_fraction (the two
                solves returned the same tokens), scaling_2_actors (from the scaling suite).
                Goals: >= 5x, peak memory <= 1/3, objective_gap <= 1e-4.

  projection  project(..., use_cache=False) time / project(..., use_cache=True) time for n = 32
              positions, batch 8, k = 200, both rules. Uncached = the authors' way: the whole
              prefix through the full model at every position, logits at every position. Both
              variants find the 'reference' rule's cosine candidates for all positions in one
              matmul (the authors' code redoes it per position), so the ratio is conservative.
              fields: speedup_cached (the 'reference' rule's), speedup_cached_by_rule,
                seconds {rule: {cached, uncached}}, identical_tokens (both rules, both variants
                give the same ids). Goal: >= 4x.

  gpu         The solver core alone (admm.solve_batch, no Ray) on a CUDA device, on a randomly
              initialised model of Phi-1.5's shape (V=51200, d=2048, 24 layers) in bf16, with
              jobs/configs/paper_sst2.yaml's ADMM settings (20 tokens, 30 outer x 50 inner, 500
              init candidates, top-200 'reference' projection), one label, batch sizes 10 (the
              paper config's), 40 and 160.
              fields: by_batch {B: {seconds_per_example, peak_mem_bytes}}, and for the fastest:
                seconds_per_example, batch_size, peak_mem_bytes, paper_run_items (2 classes x
                candidates_per_class x rho values of the paper config) and paper_run_gpu_hours
                (one GPU; the paper's anchor: about 2 hours on one H100). No goal. Skipped
                without CUDA; --quick runs a tiny model of the same architecture, bf16, on
                whatever device there is (a smoke test of this suite, not a figure).

  scaling     Ray stage 2 (gradmm_ray.distributed.solve.run_solve, tiny model, CPU actors) with 1 and 2
              actors on a local ray.init(num_cpus=4), 96 work items; skipped when Ray is not
              importable.
              fields: examples_per_s {1, 2}: the stage's steady rate, items solved after the
                first result (less each actor's first batch) / time after the first result;
                stage2.scaling_2_actors = examples_per_s(2) / examples_per_s(1);
                first_result_seconds {1, 2} (actor start-up, model load, one batch) and seconds
                {1, 2} (whole run); end_to_end_examples_per_s and end_to_end_scaling_2_actors
                (start-up included). Goal: scaling_2_actors >= 1.7. Each actor takes one CPU,
                so the goal needs two idle cores besides the driver and Ray's own processes.

every suite also records: device, measured_at, quick, settings, suite_seconds,
  goals {field: {target, value, met}} and load_average [1-min load before, after]: other
  processes on the machine slow the timings down, and not all methods equally.
meta (of the latest run): torch / transformers / python versions, device, cpu_count,
  torch_threads, date, model shape, suites_run, quick, total_seconds.
--quick: small sizes (16 stage-1 examples, a 2-example 1-iteration solve, n = 16 projection,
  4 scaling items) and each suite's methods in one child: a smoke test, figures indicative only.
"""


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
# Model and inputs


@dataclass(frozen=True)
class StandInTokenizer:
    """All the package reads from a tokenizer on these paths: the pad id and the special ids."""

    pad_token_id: int = 0
    all_special_ids: tuple[int, ...] = (0, 1, 2)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def build_lm(device: torch.device) -> CausalLM:
    """The benchmark LM: Llama-style, MODEL_SHAPE, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **MODEL_SHAPE,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return random_lm(LlamaForCausalLM, config, device, torch.float32, "random-llama-32k")


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


RELEASE_SIZE = 4096  # the target's noise is that of a release over this many examples


def make_target(lm: CausalLM, layout: SequenceLayout, n: int = 16) -> Target:
    """A released-style target (V, d): the mean clipped gradient of n random prompts with the
    layout's completion, plus the noise of a release over RELEASE_SIZE examples (noise
    multiplier 1: N(0, C^2) on the sum, / RELEASE_SIZE). Signal and noise norms are comparable,
    so matching losses spread over a useful range (a smaller release drowns the signal)."""
    g = torch.Generator().manual_seed(4)
    pairs = [
        (random_ids(PROMPT_TOKENS, g) + layout.completion_ids, PROMPT_TOKENS) for _ in range(n)
    ]
    W, b = lm.head_params_fp32()
    with torch.no_grad():
        A, y, mask = lm.completion_states(pairs)  # (n, 1, d)
        B = logits_grad(head_logits(A, W, b), y, mask, lm.logits_tail())  # (n, 1, V)
        factors = clip_factors(head_grad_sq_norms(A, B, with_bias=b is not None), CLIP_NORM)
        s_w, s_b = clipped_head_grad_sum(A, B, factors)

    def noise(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(lm.device) * (CLIP_NORM / RELEASE_SIZE)

    bias = s_b / n + noise(b.shape) if b is not None else None
    return Target(s_w / n + noise(W.shape), bias)


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Peak memory


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc malloc_trim) so that RSS tracks live memory."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: RSS may over-count
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


CPU_MEMORY_METHOD = (
    "CPU: each method runs in a fresh child process that builds the model and inputs first; "
    "freed heap memory is returned to the OS (malloc_trim) before the baseline; "
    "peak = the kernel's peak RSS (VmHWM, reset through /proc/self/clear_refs: exact, no "
    "overhead) or, where that reset is not allowed, the max of the RSS sampled every 1 ms by a "
    "psutil thread; minus the RSS just before the method's warm-up; over warm-up and timed runs."
)
CUDA_MEMORY_METHOD = (
    "CUDA: each method in a fresh child process; torch.cuda.max_memory_allocated() minus "
    "memory_allocated() just before the method's warm-up, over warm-up and timed runs."
)


class PeakMemory:
    """Peak memory above the level at entry, bytes, over a ``with`` block (*_MEMORY_METHOD)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return self
        _release_free_memory()
        self.base = self._max = _rss()
        self._hwm_ok = _reset_hwm()
        self._thread = None
        if not self._hwm_ok:  # fallback: a sampler (it competes for the GIL and the cores)
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._max = max(self._max, _rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        top = max(self._max, _rss(), _hwm() if self._hwm_ok else 0)
        self.peak = max(0, top - self.base)


def measure(suite: str, methods: list[str], s: Settings, *, one_process_each: bool) -> dict:
    """{method: result} of ``RUNNERS[suite]``, each method in a fresh child process (or, for
    --quick, all of them one after another in a single child: peaks of later methods may then be
    understated)."""
    groups = [[m] for m in methods] if one_process_each else [methods]
    results = {}
    for group in groups:
        results.update(
            run_in_fresh_process({"suite": suite, "methods": group, "settings": asdict(s)})
        )
    return results


def run_in_fresh_process(task: dict) -> dict:
    """Run ``child_main(task)`` in a new interpreter (this script), return its result dict."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--_child",
            json.dumps(task),
            "--_out",
            out,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"child {task['methods']} failed:\n{proc.stderr[-4000:]}")
        return torch.load(out, weights_only=False)


def child_main(task: dict, out: str) -> None:
    s = settings_from_dict(task["settings"])
    device = pick_device()
    lm = build_lm(device)
    runner = RUNNERS[task["suite"]]
    torch.save({m: runner(lm, s, m) for m in task["methods"]}, out)


# ---------------------------------------------------------------------------------------------
# Stage 1: three ways to the same clipped sum


@torch.inference_mode()
def stage1_ours(lm: CausalLM, pairs: list, micro: int) -> torch.Tensor:
    """This implementation: closed-form B, Gram norms, one matmul per micro-batch. (V, d)."""
    W, b = lm.head_params_fp32()
    tail = lm.logits_tail()
    S = torch.zeros_like(W)  # (V, d)
    for chunk in chunks(pairs, micro):
        A, y, mask = lm.completion_states(chunk)  # (m, T, d)
        B = logits_grad(head_logits(A, W, b), y, mask, tail)  # (m, T, V)
        factors = clip_factors(head_grad_sq_norms(A, B, with_bias=b is not None), CLIP_NORM)
        s_w, _ = clipped_head_grad_sum(A, B, factors)
        S += s_w
    return S


def stage1_loop(lm: CausalLM, pairs: list, micro: int) -> torch.Tensor:
    """The reference code: per example forward + backward into the head weight only. (V, d)."""
    head = lm.head
    head.requires_grad_(True)
    S = torch.zeros_like(head.weight, dtype=torch.float32)  # (V, d)
    try:
        for ids, n_prompt in pairs:
            x = torch.tensor([ids], device=lm.device)  # (1, L)
            logits = lm.model(input_ids=x).logits.float()  # (1, L, V): every position, as HF does
            loss = F.cross_entropy(logits[0, n_prompt - 1 : -1], x[0, n_prompt:])
            head.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad.float() for p in head.parameters()]  # V x d (and V): materialised
            norm = torch.sqrt(sum(g.square().sum() for g in grads))
            S += grads[0] * (CLIP_NORM / norm).clamp(max=1.0)
    finally:
        head.requires_grad_(False)
        head.zero_grad(set_to_none=True)
    return S


def stage1_vmap(lm: CausalLM, pairs: list, micro: int) -> torch.Tensor:
    """torch.func per-sample gradients of a head-only loss: (m, V, d) per micro-batch. (V, d)."""
    from torch.func import functional_call, grad, vmap

    head = lm.head
    params = {k: v.detach() for k, v in head.named_parameters()}

    def head_loss(p: dict, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(head, p, (a,)).float()  # (T, V)
        return F.cross_entropy(logits, y)  # T = 1: no padding to mask

    per_sample = vmap(grad(head_loss), in_dims=(None, 0, 0))
    S = torch.zeros_like(params["weight"], dtype=torch.float32)  # (V, d)
    for chunk in chunks(pairs, micro):
        with torch.no_grad():
            A, y, _ = lm.completion_states(chunk)  # (m, 1, d)
        g = per_sample(params, A.to(head.weight.dtype), y)  # {"weight": (m, V, d), ...}
        sq = sum(t.float().flatten(1).square().sum(1) for t in g.values())  # (m,)
        factors = (CLIP_NORM / sq.sqrt()).clamp(max=1.0)
        S += torch.einsum("m,mvd->vd", factors, g["weight"].float())
    return S


STAGE1_METHODS = {"ours": stage1_ours, "loop": stage1_loop, "vmap": stage1_vmap}


def stage1_run(lm: CausalLM, s: Settings, method: str) -> dict:
    """Time (best of the repeats) and peak memory of one stage-1 method; its sum S (V, d)."""
    fn = STAGE1_METHODS[method]
    pairs = random_pairs(s.stage1_examples)
    repeats = s.stage1_repeats_ours if method == "ours" else 1
    times, S = [], None
    with PeakMemory(lm.device) as mem:
        fn(lm, pairs[: min(4, len(pairs))], s.stage1_micro)  # warm-up
        for _ in range(repeats):
            S = None  # not alive during the next run
            sync(lm.device)
            t0, c0 = time.perf_counter(), time.process_time()
            S = fn(lm, pairs, s.stage1_micro)
            sync(lm.device)
            times.append((time.perf_counter() - t0, time.process_time() - c0))
    wall, cpu = min(times)
    return {"seconds": wall, "cpu_seconds": cpu, "peak_bytes": mem.peak, "sum": S.cpu()}


def suite_stage1(s: Settings, quick: bool) -> dict:
    runs = measure("stage1", list(STAGE1_METHODS), s, one_process_each=not quick)
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


# ---------------------------------------------------------------------------------------------
# Stage 2: the reference solver (the paper code's way) next to solve_batch


class ReferenceObjective(MatchingObjective):
    """f(X) per example as the paper's code computes it: the head gradient g_W (V x d) per
    example by autograd.grad(create_graph=True), cosine to the target, and (when X requires grad)
    a double backward through g_W. Logits only at the loss positions: kinder to the reference
    than its code, which takes them at every position. The sequence layout, head and target are
    MatchingObjective's; only the loss differs."""

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        """X (N, n, d) -> matching loss (N,)."""
        N, T = X.shape[0], self.T
        create_graph = torch.is_grad_enabled() and X.requires_grad
        with torch.enable_grad():
            parts = [self.prefix, X.to(self.prefix.dtype), self.suffix, self.completion]
            embeds = torch.cat([p.expand(N, -1, -1) for p in parts], dim=1)  # (N, L, d)
            attention = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            hidden = self.lm.hidden_states(inputs_embeds=embeds, attention_mask=attention)
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


def reference_solve_batch(
    lm: CausalLM,
    layout: SequenceLayout,
    target: Target,
    items: list[tuple[int, float]],
    cfg: AdmmConfig,
    *,
    seed: int,
    allowed: torch.Tensor,
) -> list[dict]:
    """solve_batch's algorithm with the reference loss and the un-cached projection."""
    objective = ReferenceObjective(lm, layout, target)
    N, dev = len(items), lm.device
    rho = torch.tensor([r for _, r in items], device=dev).view(-1, 1, 1)  # (N, 1, 1)
    prefixes = [layout.generation_ids] * N
    emb = lm.model.get_input_embeddings()

    def proj(U: torch.Tensor) -> torch.Tensor:
        return project(
            lm, U, prefixes, allowed, rule=cfg.projection, k=cfg.topk, use_cache=False
        )  # (N, n)

    X0 = initial_embeddings(
        objective,
        [example_seed(seed, sid) for sid, _ in items],
        num_tokens=cfg.num_tokens,
        candidates=cfg.init_candidates,
        norm=typical_embedding_norm(lm),
    )  # (N, n, d)
    X = X0.clone().requires_grad_(True)
    Lam = torch.zeros_like(X0)
    opt = torch.optim.Adam([X], lr=cfg.lr)
    projections, fz = [], []
    best_x, best_fx = X0.clone(), torch.full((N,), float("inf"), device=dev)
    for _ in range(cfg.outer_iters):
        tokens = proj(X.detach() + Lam / rho)
        Z = emb(tokens).float()
        projections.append(tokens)
        fz.append(objective.of_tokens(tokens))
        x_update(objective, X, opt, Z, Lam, rho, cfg.inner_steps, cfg.grad_clip)
        with torch.no_grad():
            fx = objective(X)
            improved = fx < best_fx
            best_fx = torch.where(improved, fx, best_fx)
            best_x[improved] = X.detach()[improved]
            Lam += rho * (X.detach() - Z)
    projections.append(proj(best_x))
    fz.append(objective.of_tokens(projections[-1]))
    fz_all = torch.stack(fz)  # (outer_iters + 1, N)
    best_iter = fz_all.argmin(dim=0).tolist()
    return [
        {"token_ids": projections[t][i].tolist(), "match_loss": float(fz_all[t, i])}
        for i, t in enumerate(best_iter)
    ]


def ours_solve_batch(*args, **kwargs) -> list[dict]:
    """gradmm_ray.core.admm.solve_batch, results reduced to what is compared."""
    return [
        {"token_ids": r.token_ids, "match_loss": r.match_loss} for r in solve_batch(*args, **kwargs)
    ]


STAGE2_METHODS = {"ours": ours_solve_batch, "reference": reference_solve_batch}


def stage2_run(lm: CausalLM, s: Settings, method: str) -> dict:
    """Time and peak memory of one solve of a batch (after a one-item warm-up solve)."""
    solver = STAGE2_METHODS[method]
    layout = make_layout()
    target = make_target(lm, layout)
    allowed = allowed_token_mask(lm.tokenizer, lm.vocab_size, word_like_only=False)
    items = [(i, 1.0) for i in range(s.stage2_batch)]
    cfg = s.stage2_admm
    warm = replace(cfg, outer_iters=1, inner_steps=1, init_candidates=2, num_tokens=4)
    with PeakMemory(lm.device) as mem:
        solver(lm, layout, target, items[:1], warm, seed=0, allowed=allowed)
        sync(lm.device)
        t0, c0 = time.perf_counter(), time.process_time()
        res = solver(lm, layout, target, items, cfg, seed=0, allowed=allowed)
        sync(lm.device)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_bytes": mem.peak, "results": res}


OBJECTIVE_GAP_METHOD = (
    "From the same initial X0 (the init procedure run with each loss; same_init says whether "
    "they picked the same candidates), Z = the projection of X0 and Lambda = 0, run gap_steps "
    "Adam steps of the X-update (lr, per-example gradient clipping, penalty rho = 1) once with "
    "each loss; objective_gap = max over examples of |f_ours(X_K ours) - f_ref(X_K ref)|, each "
    "final X evaluated by its own loss (fp32 resolves losses near 1 to ~6e-8). "
    "objective_gap_same_x = max over the ours trajectory (every step, every example) of "
    "|f_ours(X_t) - f_ref(X_t)| at identical X; "
    "grad_rel_diff = ||grad f_ours - grad f_ref|| / ||grad f_ref|| at X0."
)


def objective_gap(lm: CausalLM, s: Settings) -> dict:
    """Both losses on the same Adam trajectory (see OBJECTIVE_GAP_METHOD)."""
    cfg = s.stage2_admm
    layout = make_layout()
    target = make_target(lm, layout)
    allowed = allowed_token_mask(lm.tokenizer, lm.vocab_size, word_like_only=False)
    ours, ref = MatchingObjective(lm, layout, target), ReferenceObjective(lm, layout, target)
    N = s.gap_batch
    seeds = [example_seed(0, i) for i in range(N)]
    init = {
        "num_tokens": cfg.num_tokens,
        "candidates": cfg.init_candidates,
        "norm": typical_embedding_norm(lm),
    }
    X0, X0_ref = initial_embeddings(ours, seeds, **init), initial_embeddings(ref, seeds, **init)
    tokens = project(lm, X0, [layout.generation_ids] * N, allowed, rule=cfg.projection, k=cfg.topk)
    Z = lm.model.get_input_embeddings()(tokens).float()  # (N, n, d)
    Lam, rho = torch.zeros_like(X0), torch.ones((N, 1, 1), device=lm.device)

    finals, trajectory = {}, []
    for name, objective in (("ours", ours), ("reference", ref)):
        X = X0.clone().requires_grad_(True)
        opt = torch.optim.Adam([X], lr=cfg.lr)
        steps = x_update(objective, X, opt, Z, Lam, rho, s.gap_steps, cfg.grad_clip)
        finals[name] = objective(X.detach()).detach()  # (N,)
        if name == "ours":
            trajectory = steps
    with torch.no_grad():
        same_x = max(float((ours(X) - ref(X)).abs().max()) for X in [X0, *trajectory])
    grads = {}
    for name, objective in (("ours", ours), ("reference", ref)):
        X = X0.clone().requires_grad_(True)
        (grads[name],) = torch.autograd.grad(objective(X).sum(), X)
    return {
        "objective_gap": float((finals["ours"] - finals["reference"]).abs().max()),
        "objective_gap_same_x": same_x,
        "grad_rel_diff": float(
            (grads["ours"] - grads["reference"]).norm() / grads["reference"].norm()
        ),
        "same_init": bool(torch.equal(X0, X0_ref)),
        "final_loss": {k: v.tolist() for k, v in finals.items()},
        "objective_gap_method": OBJECTIVE_GAP_METHOD,
    }


def suite_stage2(s: Settings, lm: CausalLM, quick: bool) -> dict:
    runs = measure("stage2", list(STAGE2_METHODS), s, one_process_each=not quick)
    N = s.stage2_batch
    spe = {m: r["seconds"] / N for m, r in runs.items()}
    peak = {m: r["peak_bytes"] for m, r in runs.items()}
    same = [
        a["token_ids"] == b["token_ids"]
        for a, b in zip(runs["ours"]["results"], runs["reference"]["results"], strict=True)
    ]
    out = {
        "seconds_per_example": spe,
        "speedup_vs_reference": spe["reference"] / spe["ours"],
        "cpu_seconds": {m: r["cpu_seconds"] for m, r in runs.items()},
        "cpu_time_speedup": runs["reference"]["cpu_seconds"] / runs["ours"]["cpu_seconds"],
        "peak_mem_bytes": peak,
        "peak_mem_ratio_vs_reference": peak["ours"] / max(peak["reference"], 1),
        **objective_gap(lm, s),
        "same_tokens_fraction": sum(same) / len(same),
        "final_match_loss": {m: [x["match_loss"] for x in r["results"]] for m, r in runs.items()},
        "memory_method": memory_method(quick),
        "settings": {
            "batch": N,
            "admm": asdict(s.stage2_admm),
            "gap_batch": s.gap_batch,
            "gap_steps": s.gap_steps,
            "target": "mean clipped head gradient of 16 random prompts "
            f"+ N(0, (1/{RELEASE_SIZE})^2) per entry",
            "layout": "[bos] X(num_tokens) [3 ids] [1 completion id]; generation prefix 7 ids",
        },
    }
    out["goals"] = {
        "speedup_vs_reference": goal(out["speedup_vs_reference"], ">=", 5),
        "peak_mem_ratio_vs_reference": goal(out["peak_mem_ratio_vs_reference"], "<=", 1 / 3),
        "objective_gap": goal(out["objective_gap"], "<=", 1e-4),
    }
    return out


# ---------------------------------------------------------------------------------------------
# Projection: KV cache versus re-running the prefix


def suite_projection(s: Settings, lm: CausalLM) -> dict:
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


# ---------------------------------------------------------------------------------------------
# Scaling: the Ray stage 2 with 1 and 2 actors


def suite_scaling(s: Settings) -> dict:
    try:
        import ray
        import ray.data
    except ImportError:
        return {"skipped": "ray is not importable in this environment"}
    from gradmm_ray.config import build_config
    from gradmm_ray.core.lm import load_causal_lm
    from gradmm_ray.distributed.solve import run_solve
    from gradmm_ray.io.storage import OutputDir

    tiny = load_causal_lm("tiny", dtype="float32", device="cpu")  # builds the cache entry once
    V, d = tiny.head.weight.shape
    g = torch.Generator().manual_seed(5)
    labels = ("negative", "positive")  # the default verbalizers' labels
    targets = {lab: {"weight": torch.randn((V, d), generator=g) * 1e-3} for lab in labels}
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ctx = ray.data.DataContext.get_current()  # no Ray Data progress bars or start banners
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    def solve_with(actors: int, per_class: int):
        """One run_solve into a fresh temporary output directory."""
        with tempfile.TemporaryDirectory() as tmp:
            cfg = build_config(
                {
                    "model": {"name": "tiny", "dtype": "float32", "device": "cpu"},
                    "admm": {**asdict(s.scaling_admm), "rho": [1.0]},
                    "solve": {
                        "candidates_per_class": per_class,
                        "batch_size": s.scaling_batch,
                        "min_actors": actors,
                        "max_actors": actors,
                        "num_gpus": 0,
                        "num_cpus": 1,
                    },
                    "output": tmp,
                }
            )
            return run_solve(targets, cfg, OutputDir(tmp), num_gpus=0.0)

    items = len(labels) * s.scaling_per_class
    runs = {}
    try:
        if s.scaling_warmup:  # Ray Data's first execution in a session pays one-off costs
            solve_with(1, 1)
        for actors in (1, 2):
            runs[str(actors)] = stats = solve_with(actors, s.scaling_per_class)
            assert stats.solved == items, (stats.solved, items)
    finally:
        if started:
            ray.shutdown()
    rate, end_to_end = {}, {}
    for actors, stats in runs.items():
        # After the first result: every actor is up and past its first batch.
        steady_items = items - int(actors) * s.scaling_batch
        rate[actors] = steady_items / (stats.seconds - stats.first_result_seconds)
        end_to_end[actors] = items / stats.seconds
    out = {
        "examples_per_s": rate,
        "scaling_2_actors": rate["2"] / rate["1"],
        "first_result_seconds": {a: st.first_result_seconds for a, st in runs.items()},
        "seconds": {a: st.seconds for a, st in runs.items()},
        "end_to_end_examples_per_s": end_to_end,
        "end_to_end_scaling_2_actors": end_to_end["2"] / end_to_end["1"],
        "items": items,
        "cores": os.cpu_count(),
        "settings": {
            "model": "tiny",
            "warmup_run": s.scaling_warmup,
            "batch_size": s.scaling_batch,
            "admm": asdict(s.scaling_admm),
        },
    }
    out["goals"] = {"scaling_2_actors": goal(out["scaling_2_actors"], ">=", 1.7)}
    return out


# ---------------------------------------------------------------------------------------------
# GPU: the solver core at Phi-1.5's shape


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

    cfg = build_config(load_yaml(PAPER_CONFIG))
    items = len(cfg.data.label_names) * cfg.solve.candidates_per_class * len(cfg.admm.rho)
    return replace(cfg.admm, word_like_only=False, rho=(1.0,)), items


def suite_gpu(s: Settings, quick: bool) -> dict:
    device = pick_device()
    if device.type != "cuda" and not quick:
        return {"skipped": "no CUDA device (--quick runs a CPU smoke test of this suite)"}
    shape = PHI_QUICK_SHAPE if quick else PHI_15_SHAPE
    admm, paper_items = paper_run()
    admm = s.gpu_admm or admm
    lm = build_phi(shape, device, torch.bfloat16)
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


# ---------------------------------------------------------------------------------------------
# Plumbing: tasks, goals, meta, output


RUNNERS = {"stage1": stage1_run, "stage2": stage2_run}


def goal(value: float, op: str, threshold: float) -> dict:
    met = value >= threshold if op == ">=" else value <= threshold
    return {"target": f"{op} {threshold:.4g}", "value": value, "met": bool(met)}


def memory_method(quick: bool) -> str:
    text = CUDA_MEMORY_METHOD if pick_device().type == "cuda" else CPU_MEMORY_METHOD
    if quick:
        text += " --quick: all methods of the suite in ONE child, in order; indicative only."
    return text


def meta() -> dict:
    import transformers

    device = pick_device()
    V, d = MODEL_SHAPE["vocab_size"], MODEL_SHAPE["hidden_size"]
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            **MODEL_SHAPE,
            "tie_word_embeddings": False,
            "head_params": V * d,
            "dtype": "float32",
            "init": "random (seed 0), Llama-style; token embeddings rescaled to norm ~1.4",
        },
    }


def merge_write(path: Path, results: dict) -> dict:
    """Merge suites into an existing JSON file (a suite's keys replace that suite's old keys)."""
    existing = {}
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except json.JSONDecodeError:
            existing = {}
    for suite, values in results.items():
        existing[suite] = {**existing.get(suite, {}), **values}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(existing, indent=2) + "\n")
    return existing


def fmt(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    if isinstance(value, int) and value > 10_000_000:
        return f"{value / 2**20:.1f} MiB"
    return str(value)


def print_suite(name: str, result: dict) -> None:
    print(f"\n== {name} " + "=" * (76 - len(name)))
    if "skipped" in result:
        print(f"  skipped: {result['skipped']}")
        return
    for key, value in result.items():
        if key in ("goals", "settings", "note", "device", "measured_at", "quick"):
            continue
        if key.endswith("_method"):
            continue
        if isinstance(value, dict):
            inner = ", ".join(
                f"{k}={fmt(v)}" for k, v in value.items() if not isinstance(v, dict | list)
            )
            nested = ", ".join(
                f"{k}: " + " ".join(f"{kk}={fmt(vv)}" for kk, vv in v.items())
                for k, v in value.items()
                if isinstance(v, dict)
            )
            if inner or nested:
                print(f"  {key:<30} {inner or nested}")
        elif isinstance(value, list):
            print(f"  {key:<30} [{', '.join(fmt(v) for v in value[:8])}]")
        else:
            print(f"  {key:<30} {fmt(value)}")
    for key, g in result.get("goals", {}).items():
        status = "met" if g["met"] else "MISSED"
        print(f"  goal {key:<25} {fmt(g['value']):>12} (target {g['target']}): {status}")
    if not result.get("goals"):
        print("  (no goal for this suite)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="GRADMM performance benchmark: this implementation against the reference "
        "approach, on a random Llama-style LM with a 32000 x 256 head.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", type=Path, help="results file, required (merged by suite)")
    parser.add_argument(
        "--suite",
        action="append",
        choices=SUITES,
        help="run only this suite (repeatable); default: all",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes (a smoke test, well under 2 minutes)"
    )
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    parser.add_argument("--_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._child:
        child_main(json.loads(args._child), args._out)
        return 0
    if args.json is None:
        parser.error("the following argument is required: --json")

    s = QUICK if args.quick else FULL
    suites = list(dict.fromkeys(args.suite or SUITES))
    torch.manual_seed(0)
    info = {**meta(), "suites_run": suites, "quick": args.quick}
    print(
        f"GRADMM benchmark ({'quick' if args.quick else 'full'}): device {info['device']}, "
        f"{info['cpu_count']} CPUs, torch {info['torch']}, model V={MODEL_SHAPE['vocab_size']} "
        f"d={MODEL_SHAPE['hidden_size']} layers={MODEL_SHAPE['num_hidden_layers']}"
    )
    results: dict[str, dict] = {"meta": info}
    lm = build_lm(pick_device()) if {"stage2", "projection"} & set(suites) else None
    start = time.perf_counter()
    for suite in suites:
        t0, load_before = time.perf_counter(), os.getloadavg()[0]
        if suite == "stage1":
            out = suite_stage1(s, args.quick)
        elif suite == "stage2":
            out = suite_stage2(s, lm, args.quick)
        elif suite == "projection":
            out = suite_projection(s, lm)
        elif suite == "gpu":
            out = suite_gpu(s, args.quick)
        else:
            out = suite_scaling(s)
            if "scaling_2_actors" in out:
                results.setdefault("stage2", {})["scaling_2_actors"] = out["scaling_2_actors"]
        out.update(
            load_average=[load_before, os.getloadavg()[0]],
            device=info["device"],
            measured_at=info["date"],
            quick=args.quick,
            suite_seconds=time.perf_counter() - t0,
        )
        results[suite] = {**results.get(suite, {}), **out}
        print_suite(suite, results[suite])
    results["meta"]["total_seconds"] = time.perf_counter() - start
    merge_write(args.json, results)
    print(f"\nwrote {args.json} ({results['meta']['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
