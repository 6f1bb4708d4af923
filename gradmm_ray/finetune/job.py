"""Downstream fine-tuning and evaluation of a training set (synthetic or real): the torch core.

Protocol (paper Table 1; reference/authors-code-notes.md "Evaluation protocol"): full fine-tuning
for ``steps`` steps, global batch ``batch_size``, AdamW with a linear decay to 0, the learning rate
from a grid, an evaluation every ``eval_every`` steps. Unlike the reference code, the learning rate
and the checkpoint are chosen on a DEV split; the TEST split is only read at that choice.

Classification loss. For a text x with label options k = 1..K, completion c_k of T_k tokens
(``data.verbalizers``, tokenised by ``encode_pair``: prompt with special tokens + completion
without),

    s_k = (1/T_k) Σ_t log p(c_k,t | prompt(x), c_k,<t)      (length-normalised log-likelihood)
    loss = -log softmax(s)_y,      prediction = argmax_k s_k.

SFT loss (``loss: sft``): the mean over examples of the mean cross-entropy over the completion
tokens, i.e. -s_y: the loss GRADMM matches the gradient of.

Gradient error (paper Fig. 2a). At the current parameters θ, with G(D) the mean last-layer (LM
head) gradient of the completion cross-entropy over the rows of D (closed form, headgrad.py),

    error = ‖G(train set) - G(real)‖ / ‖G(real)‖      (weight and bias jointly),

where "real" is a fixed, seeded subsample of the real training pool.

Splits. TEST is the source's own test split when it has one (``splits.test_split``), else a seeded
slice of ``data.split``; DEV is a seeded, stratified slice of ``data.split``; the POOL (every real
baseline draws from it) is the rest. When the --train set was generated from ``data.split`` (its
manifest.json says so), the generation rows are kept out of DEV and TEST (out of DEV only when
enough other rows exist; the overlap is then recorded).

Nothing here imports Ray; ``train_ray.py`` runs :func:`run_one` on Ray Train workers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor

from gradmm_ray.config import Config, DataConfig, ModelConfig, build_typed, validate
from gradmm_ray.core.coreset import herding, kcenter_greedy
from gradmm_ray.core.headgrad import clipped_head_grad_sum, head_logits, logits_grad
from gradmm_ray.core.lm import CausalLM, pad_pairs
from gradmm_ray.core.text import check_verbalizers, encode_pair, format_prompt
from gradmm_ray.errors import ConfigError, DataError, OutputError
from gradmm_ray.io.real_data import (
    load_real_examples,
    looks_like_path,
    read_table,
    stratified_sample,
    validate_table,
)
from gradmm_ray.io.storage import OutputDir

LOSSES = ("classification", "sft")
BASELINES = ("zero-shot", "random", "herding", "kcenter", "full", "same-real")
STRATEGIES = ("accelerate", "deepspeed")
PRECISIONS = ("auto", "no", "bf16", "fp16")
DEEPSPEED_PRESETS = {"zero2": "deepspeed_zero2.json", "zero3": "deepspeed_zero3.json"}
SYNTHETIC = "synthetic"  # the run name of the --train set
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
RESULTS_FILE = "results.md"
DISPLAY_NAMES = {
    "zero-shot": "Zero-shot (no fine-tuning)",
    SYNTHETIC: "GRADMM synthetic (--train)",
    "random": "Random real",
    "herding": "Herding real",
    "kcenter": "K-center real",
    "full": "Full real train pool",
    "same-real": "Real rows used for generation",
}


class FinetuneError(ValueError):
    """A user-facing problem with the fine-tuning inputs (one line naming file, row, value)."""


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class ProtocolConfig:
    """The fine-tuning protocol; the defaults are the paper's (Phi-1.5, Table 1)."""

    steps: int = 200
    batch_size: int = 16  # global batch, split evenly over the workers
    lrs: tuple[float, ...] = (7e-6, 1e-5, 1.5e-5)
    eval_every: int = 50
    loss: str = "classification"  # classification | sft
    seeds: tuple[int, ...] = (0, 1, 2)
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # null: no clipping
    eval_batch_size: int = 32


@dataclass(frozen=True)
class SplitConfig:
    test_split: str | None = "test"  # the source's test split; null: carve TEST from data.split
    dev_size: int = 100  # rows of data.split held out for choosing lr and checkpoint
    test_size: int = 500  # rows carved from data.split when the source has no test split
    seed: int = 0  # the splits are the same for every method and training seed
    grad_error_rows: int = 512  # real pool rows (and at most this many set rows) per gradient


@dataclass(frozen=True)
class WorkersConfig:
    num_workers: int = 1
    gpus_per_worker: float | str = "auto"  # auto: 1 when the cluster has GPUs, else CPU workers
    cpus_per_worker: float = 1.0
    strategy: str = "accelerate"  # accelerate | deepspeed
    deepspeed_config: str = "zero2"  # zero2 | zero3 (jobs/configs/) | a JSON file
    mixed_precision: str = "auto"  # auto: bf16 on GPUs that support it, else no


@dataclass(frozen=True)
class FinetuneConfig:
    train: str = ""  # Parquet with prompt/completion or text/label columns
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # the real (eval) data and templates
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    splits: SplitConfig = field(default_factory=SplitConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    baselines: tuple[str, ...] = ()
    output: str = "outputs/finetune"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def build_finetune_config(*layers: dict[str, Any]) -> FinetuneConfig:
    """Merge raw layers (later wins) onto the defaults, coerce types, validate everything: the
    same typed builder, coercion and "did you mean" messages as distill.py."""
    return build_typed(FinetuneConfig, layers, validate_finetune)


def validate_finetune(cfg: FinetuneConfig) -> list[str]:
    # The data and model sections have distill's rules: reuse them on an otherwise default Config.
    errors = [
        e
        for e in validate(Config(data=cfg.data, model=cfg.model))
        if e.startswith(("data.", "model."))
    ]

    def need(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    p, s, w = cfg.protocol, cfg.splits, cfg.workers
    need(bool(cfg.train), "train: must not be empty (give --train FILE.parquet)")
    need(p.steps >= 1, f"protocol.steps: got {p.steps}, expected >= 1")
    need(p.batch_size >= 1, f"protocol.batch_size: got {p.batch_size}, expected >= 1")
    need(
        len(p.lrs) >= 1 and all(lr > 0 for lr in p.lrs),
        f"protocol.lrs: got {list(p.lrs)}, expected one or more values > 0",
    )
    need(
        1 <= p.eval_every <= p.steps,
        f"protocol.eval_every: got {p.eval_every}, expected 1..protocol.steps ({p.steps})",
    )
    need(p.loss in LOSSES, f"protocol.loss: got {p.loss!r}, expected one of {LOSSES}")
    need(
        len(p.seeds) >= 1 and all(x >= 0 for x in p.seeds),
        f"protocol.seeds: got {list(p.seeds)}, expected one or more integers >= 0",
    )
    need(
        len(set(p.seeds)) == len(p.seeds),
        f"protocol.seeds: got {list(p.seeds)}, expected distinct seeds",
    )
    need(p.weight_decay >= 0, f"protocol.weight_decay: got {p.weight_decay}, expected >= 0")
    need(
        p.max_grad_norm is None or p.max_grad_norm > 0,
        f"protocol.max_grad_norm: got {p.max_grad_norm}, expected > 0 or null",
    )
    need(
        p.eval_batch_size >= 1, f"protocol.eval_batch_size: got {p.eval_batch_size}, expected >= 1"
    )
    need(s.dev_size >= 2, f"splits.dev_size: got {s.dev_size}, expected >= 2")
    need(s.test_size >= 2, f"splits.test_size: got {s.test_size}, expected >= 2")
    need(s.grad_error_rows >= 1, f"splits.grad_error_rows: got {s.grad_error_rows}, expected >= 1")
    need(w.num_workers >= 1, f"workers.num_workers: got {w.num_workers}, expected >= 1")
    need(
        w.num_workers < 1 or p.batch_size % w.num_workers == 0,
        f"protocol.batch_size: got {p.batch_size}, expected a multiple of workers.num_workers "
        f"({w.num_workers}): every worker takes an equal share of each batch",
    )
    need(
        w.gpus_per_worker == "auto"
        or (isinstance(w.gpus_per_worker, float | int) and w.gpus_per_worker >= 0),
        f"workers.gpus_per_worker: got {w.gpus_per_worker!r}, expected auto or a number >= 0",
    )
    need(w.cpus_per_worker > 0, f"workers.cpus_per_worker: got {w.cpus_per_worker}, expected > 0")
    need(
        w.strategy in STRATEGIES,
        f"workers.strategy: got {w.strategy!r}, expected one of {STRATEGIES}",
    )
    need(
        w.mixed_precision in PRECISIONS,
        f"workers.mixed_precision: got {w.mixed_precision!r}, expected one of {PRECISIONS}",
    )
    for name in cfg.baselines:
        need(
            name in BASELINES,
            f"baselines: unknown baseline {name!r}, expected some of {', '.join(BASELINES)}",
        )
    need(
        len(set(cfg.baselines)) == len(cfg.baselines),
        f"baselines: got {list(cfg.baselines)}, expected each at most once",
    )
    need(bool(cfg.output), "output: must not be empty")
    return errors


def deepspeed_config_path(setting: str) -> Path:
    """``zero2`` / ``zero3``: the configs shipped in jobs/configs/; else a JSON file."""
    if setting in DEEPSPEED_PRESETS:
        return (
            Path(__file__).resolve().parent.parent / "jobs" / "configs" / DEEPSPEED_PRESETS[setting]
        )
    return Path(os.path.expanduser(setting))


def load_deepspeed_config(setting: str) -> dict[str, Any]:
    """The DeepSpeed JSON, checked. Batch sizes, clipping and precision are set by the job from
    the protocol, so the file must not bring its own optimizer or scheduler."""
    path = deepspeed_config_path(setting)
    if not path.is_file():
        hint = (
            " (the presets live in jobs/configs/ of the project)"
            if setting in DEEPSPEED_PRESETS
            else ""
        )
        raise FinetuneError(
            f"workers.deepspeed_config {setting!r}: file {str(path)!r} does not exist{hint}"
        )
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FinetuneError(
            f"workers.deepspeed_config {str(path)!r}: not valid JSON ({e})"
        ) from None
    if not isinstance(ds, dict):
        raise FinetuneError(f"workers.deepspeed_config {str(path)!r}: expected a JSON object")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise FinetuneError(f"{str(path)!r}: zero_optimization.stage {stage!r}, expected 0..3")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise FinetuneError(
                f"{str(path)!r}: remove the {key!r} section: the job passes AdamW with a linear "
                "schedule from the protocol"
            )
    return ds


# ---------------------------------------------------------------------------------------------
# Examples: the --train file and the real splits


@dataclass(frozen=True)
class Example:
    """One training or evaluation pair. ``origin`` says where it came from: "train:17" is row 17
    of the real data.split, "test:3" of the test split, "train-file:5" of the --train file."""

    prompt: str
    completion: str
    label: str | None  # None only in an sft set whose completions are not label words
    origin: str


def read_train_file(path: str) -> tuple[pa.Table, str]:
    """The raw --train table (Parquet, local or s3:// / gs://)."""
    if "://" not in path and not os.path.exists(os.path.expanduser(path)):
        raise FinetuneError(f"--train {path!r}: file does not exist")
    try:
        table, _ = read_table(DataConfig(source=path))
    except DataError as e:
        raise FinetuneError(f"--train: {e}") from None
    return table, path


def _label_name(value: Any, data: DataConfig, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and data.label_names and 0 <= value < len(data.label_names):
        return data.label_names[value]
    raise FinetuneError(f"{where}: label {value!r} is not a label name (set data.label_names)")


def training_examples(table: pa.Table, data: DataConfig, *, loss: str, shown: str) -> list[Example]:
    """The --train rows as pairs: ``prompt``/``completion`` (optional ``label``) used as they are,
    or ``text``/``label`` put through data.prompt_template and data.verbalizers."""
    columns = table.column_names
    if table.num_rows == 0:
        raise FinetuneError(f"{shown}: the training set is empty (0 rows)")
    if {"prompt", "completion"} <= set(columns):
        return _pair_examples(table, data, loss=loss, shown=shown)
    if {"text", "label"} <= set(columns):
        rows = validate_table(
            table, dataclasses.replace(data, text_column="text", label_column="label"), shown
        )
        return [
            Example(
                format_prompt(data.prompt_template, t),
                data.verbalizers[lab],
                lab,
                f"train-file:{r}",
            )
            for r, t, lab in zip(
                *(rows.column(c).to_pylist() for c in ("row", "text", "label")), strict=True
            )
        ]
    raise FinetuneError(
        f"{shown}: expected columns prompt and completion, or text and label "
        f"(columns: {', '.join(columns)})"
    )


def _pair_examples(table: pa.Table, data: DataConfig, *, loss: str, shown: str) -> list[Example]:
    label_of_completion = {c: lab for lab, c in data.verbalizers.items()}
    prompts = table.column("prompt").to_pylist()
    completions = table.column("completion").to_pylist()
    has_label = "label" in table.column_names
    labels = table.column("label").to_pylist() if has_label else [None] * table.num_rows
    out = []
    for i, (prompt, completion, raw_label) in enumerate(
        zip(prompts, completions, labels, strict=True)
    ):
        where = f"{shown} row {i}"
        for col, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str) or not value.strip():
                raise FinetuneError(f"{where}: column {col!r} is empty or not text ({value!r})")
        label = _label_name(raw_label, data, where) if has_label else None
        if label is None:
            label = label_of_completion.get(completion)
        if loss == "classification":
            if label is None:
                raise FinetuneError(
                    f"{where}: completion {completion!r} is none of data.verbalizers "
                    f"({data.verbalizers}) and there is no label: the classification loss needs "
                    "one (or use --loss sft)"
                )
            if label not in data.verbalizers:
                raise FinetuneError(
                    f"{where}: label {label!r} has no entry in data.verbalizers (known: {', '.join(data.verbalizers)})"
                )
            if completion != data.verbalizers[label]:
                raise FinetuneError(
                    f"{where}: completion {completion!r} is not data.verbalizers[{label!r}] "
                    f"({data.verbalizers[label]!r}); set data.verbalizers to the ones the set was made with"
                )
        out.append(Example(prompt, completion, label, f"train-file:{i}"))
    return out


def has_named_splits(source: str) -> bool:
    """Whether ``splits.test_split`` names a split of the source: the bundled sample, a hub id or a
    DatasetDict folder. A plain file or folder of files is one split: TEST is carved from it."""
    if source == "sample" or not looks_like_path(source):
        return True
    local = os.path.expanduser(source)
    return "://" not in source and os.path.isfile(os.path.join(local, "dataset_dict.json"))


def read_split(data: DataConfig, split: str) -> tuple[list[Example], list[str]]:
    """Validated real rows of one split as examples (origin ``"{split}:{row}"``) and their texts."""
    raw, shown = read_table(dataclasses.replace(data, split=split))
    rows = validate_table(raw, data, shown)
    texts = rows.column("text").to_pylist()
    examples = [
        Example(format_prompt(data.prompt_template, t), data.verbalizers[lab], lab, f"{split}:{r}")
        for r, t, lab in zip(
            *(rows.column(c).to_pylist() for c in ("row", "text", "label")), strict=True
        )
    ]
    return examples, texts


@dataclass(frozen=True)
class SplitRows:
    """Row indices into data.split: disjoint by construction."""

    pool: np.ndarray  # what any real baseline may train on
    dev: np.ndarray  # for choosing the learning rate and the checkpoint
    test: np.ndarray  # carved TEST rows; empty when TEST is the source's own test split
    dev_generation_overlap: int  # dev rows that generation used (only when unavoidable)


def split_rows(
    labels: Sequence[str],
    *,
    dev_size: int,
    test_size: int | None,
    seed: int,
    generation_rows: Collection[int] = (),
) -> SplitRows:
    """Seeded, stratified DEV (and TEST when ``test_size``) slices of a split; the POOL is the
    rest. Generation rows never go to TEST; they go to DEV only when the other rows run out."""
    n = len(labels)
    label_arr = np.asarray(labels, dtype=object)
    used = np.zeros(n, dtype=bool)
    used[np.asarray(list(generation_rows), dtype=np.int64)] = True
    eligible = np.flatnonzero(~used)

    def draw(candidates: np.ndarray, size: int, draw_seed: int) -> np.ndarray:
        if size <= 0 or len(candidates) == 0:
            return np.array([], dtype=np.int64)
        if size >= len(candidates):
            return candidates
        picked = stratified_sample(
            label_arr[candidates].tolist(), per_class=None, max_examples=size, seed=draw_seed
        )
        return candidates[picked]

    test = np.array([], dtype=np.int64)
    if test_size:
        if len(eligible) <= test_size:
            raise FinetuneError(
                f"data.split has {len(eligible)} rows not used for generation, too few for a "
                f"test slice of splits.test_size={test_size} rows plus dev and pool rows; give a "
                "source with a test split or lower splits.test_size"
            )
        test = draw(eligible, test_size, seed)
        eligible = np.setdiff1d(eligible, test)
    dev = draw(eligible, dev_size, seed + 1)
    overlap = 0
    if len(dev) < dev_size:  # generation used (nearly) every row: top up from its rows
        extra = draw(np.setdiff1d(np.flatnonzero(used), test), dev_size - len(dev), seed + 2)
        dev = np.sort(np.concatenate([dev, extra]))
        overlap = len(extra)
    pool = np.setdiff1d(np.arange(n), np.concatenate([dev, test]))
    if len(pool) == 0:
        raise FinetuneError(
            f"data.split has {n} rows: nothing is left to train on after dev ({len(dev)}) and "
            f"test ({len(test)}); lower splits.dev_size"
        )
    return SplitRows(
        pool=pool, dev=np.sort(dev), test=np.sort(test), dev_generation_overlap=overlap
    )


def normalised_text(text: str) -> str:
    return " ".join(text.lower().split())


def drop_held_out_duplicates(
    pool: Sequence[Example], pool_texts: Sequence[str], held_out_texts: Collection[str]
) -> tuple[list[Example], int]:
    """Pool rows whose (normalised) text also appears in DEV or TEST are dropped: a duplicate
    across splits would let a real baseline train on a test example."""
    held = {normalised_text(t) for t in held_out_texts}
    kept = [ex for ex, t in zip(pool, pool_texts, strict=True) if normalised_text(t) not in held]
    return kept, len(pool) - len(kept)


# ---------------------------------------------------------------------------------------------
# Real baselines of the same size as the training set


Budget = dict[str | None, int]  # label -> rows; {None: n} when the set has unlabelled rows


def class_budget(examples: Sequence[Example]) -> Budget:
    labels = [ex.label for ex in examples]
    if any(lab is None for lab in labels):
        return {None: len(labels)}
    return dict(sorted(Counter(labels).items()))


def _groups(labels: Sequence[str | None], budget: Budget) -> dict[str | None, np.ndarray]:
    arr = np.asarray(labels, dtype=object)
    if None in budget:
        return {None: np.arange(len(labels))}
    return {lab: np.flatnonzero(arr == lab) for lab in budget}


def check_budget(labels: Sequence[str | None], budget: Budget, what: str) -> None:
    for lab, idx in _groups(labels, budget).items():
        if len(idx) < budget[lab]:
            which = f"{lab!r} rows" if lab is not None else "rows"
            raise FinetuneError(
                f"{what}: needs {budget[lab]} {which} of the real pool to match the training set, "
                f"the pool has {len(idx)}"
            )


def random_subset(labels: Sequence[str | None], budget: Budget, seed: int) -> np.ndarray:
    """Seeded random rows with the budget's per-class counts (sorted indices)."""
    rng = np.random.default_rng(seed)
    picked = [
        rng.choice(idx, size=budget[lab], replace=False)
        for lab, idx in _groups(labels, budget).items()
    ]
    return np.sort(np.concatenate(picked)) if picked else np.array([], dtype=np.int64)


def coreset_subset(
    labels: Sequence[str | None], embeddings: Tensor, budget: Budget, method: str
) -> np.ndarray:
    """Herding or greedy k-center within each class, on the rows' embeddings (sorted indices)."""
    choose = {"herding": herding, "kcenter": kcenter_greedy}[method]
    picked = []
    for lab, idx in _groups(labels, budget).items():
        chosen = choose(embeddings[torch.as_tensor(idx)], budget[lab])
        picked.append(idx[np.asarray(chosen, dtype=np.int64)])
    return np.sort(np.concatenate(picked)) if picked else np.array([], dtype=np.int64)


@torch.no_grad()
def mean_pooled_states(lm: CausalLM, prompts: Sequence[str], batch_size: int = 32) -> Tensor:
    """Mean over the prompt's tokens of the hidden states fed to the head, (n, d) fp32 on CPU."""
    out = []
    for start in range(0, len(prompts), batch_size):
        ids = [
            list(lm.tokenizer(p, add_special_tokens=True)["input_ids"])
            for p in prompts[start : start + batch_size]
        ]
        length = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), length), lm.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(ids), length), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            attention[i, : len(x)] = 1
        hidden = lm.hidden_states(
            input_ids=input_ids.to(lm.device), attention_mask=attention.to(lm.device)
        )
        mask = attention.to(lm.device).unsqueeze(-1).float()
        out.append(((hidden.float() * mask).sum(1) / mask.sum(1)).cpu())
    return torch.cat(out) if out else torch.zeros((0, 0))


# ---------------------------------------------------------------------------------------------
# Losses and evaluation


def completion_logprobs(
    model: torch.nn.Module, pairs: list[tuple[list[int], int]], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Per pair: Σ log p(completion tokens) under ``model`` (any wrapper returning ``.logits``)
    and the completion length; differentiable when grad is enabled."""
    input_ids, attention, positions, targets, mask = (
        t.to(device) for t in pad_pairs(pairs, pad_id)
    )
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)  # as lm.hidden_states: right padding
    logits = model(
        input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=False
    ).logits  # (N, L, V): the model's own output, soft-capping and scaling included
    picked = logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # (N, T, V)
    logp = torch.log_softmax(picked.float(), dim=-1)
    token = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask  # (N, T)
    return token.sum(1), mask.sum(1).float()


def option_scores(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    verbalizers: dict[str, str],
    device: torch.device,
) -> Tensor:
    """s (N, K): length-normalised completion log-likelihood of every label option, options in
    sorted label order."""
    options = sorted(verbalizers)
    pairs = [encode_pair(tokenizer, ex.prompt, verbalizers[o]) for ex in examples for o in options]
    total, count = completion_logprobs(model, pairs, tokenizer.pad_token_id, device)
    return (total / count).view(len(examples), len(options))


def label_targets(examples: Sequence[Example], verbalizers: dict[str, str], device) -> Tensor:
    options = sorted(verbalizers)
    return torch.tensor(
        [options.index(ex.label) for ex in examples], dtype=torch.long, device=device
    )


def classification_loss(scores: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -log softmax(s)_y: cross-entropy over the options' scores."""
    return F.cross_entropy(scores, targets)


def sft_loss(model: torch.nn.Module, tokenizer, examples: Sequence[Example], device) -> Tensor:
    """Mean over rows of the mean completion cross-entropy (each row's own completion)."""
    pairs = [encode_pair(tokenizer, ex.prompt, ex.completion) for ex in examples]
    total, count = completion_logprobs(model, pairs, tokenizer.pad_token_id, device)
    return -(total / count).mean()


def training_loss(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    loss: str,
    verbalizers: dict[str, str],
    device: torch.device,
) -> Tensor:
    if loss == "sft":
        return sft_loss(model, tokenizer, examples, device)
    scores = option_scores(model, tokenizer, examples, verbalizers, device)
    return classification_loss(scores, label_targets(examples, verbalizers, device))


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    loss: float  # classification cross-entropy over the label options
    completion_loss: float  # mean completion cross-entropy of the true label (-s_y)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    verbalizers: dict[str, str],
    *,
    batch_size: int,
    device: torch.device,
) -> EvalResult:
    correct, loss, completion = 0.0, 0.0, 0.0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        scores = option_scores(model, tokenizer, chunk, verbalizers, device).float()
        y = label_targets(chunk, verbalizers, device)
        correct += float((scores.argmax(1) == y).sum())
        loss += float(F.cross_entropy(scores, y, reduction="sum"))
        completion += float(-scores.gather(1, y.unsqueeze(1)).sum())
    n = max(len(examples), 1)
    return EvalResult(correct / n, loss / n, completion / n)


# ---------------------------------------------------------------------------------------------
# Gradient error (paper Fig. 2a)


HeadGrad = tuple[Tensor, Tensor | None]  # (G_W (V, d), G_b (V,) or None)


@torch.no_grad()
def head_gradient_sums(
    lm: CausalLM, examples: Sequence[Example], batch_size: int = 32
) -> dict[str | None, tuple[HeadGrad, int]]:
    """Per label: (Σ over its rows of the closed-form head gradient of the completion CE, rows)."""
    W, b = lm.head_params_fp32()
    tail = lm.logits_tail()
    sums: dict[str | None, tuple[HeadGrad, int]] = {}
    for label in sorted({ex.label for ex in examples}, key=str):
        rows = [ex for ex in examples if ex.label == label]
        sum_w = torch.zeros_like(W)
        sum_b = torch.zeros_like(b) if b is not None else None
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            pairs = [encode_pair(lm.tokenizer, ex.prompt, ex.completion) for ex in chunk]
            A, targets, mask = lm.completion_states(pairs)
            B = logits_grad(head_logits(A, W, b), targets, mask, tail)
            gw, gb = clipped_head_grad_sum(A, B, torch.ones(len(chunk), device=A.device))
            sum_w += gw
            if sum_b is not None:
                sum_b += gb
        sums[label] = ((sum_w, sum_b), len(rows))
    return sums


def _mean(parts: Sequence[tuple[HeadGrad, int]]) -> HeadGrad:
    n = max(sum(k for _, k in parts), 1)
    weight = sum(g[0] for g, _ in parts) / n
    bias = sum(g[1] for g, _ in parts) / n if parts[0][0][1] is not None else None
    return weight, bias


def relative_error(grad: HeadGrad, reference: HeadGrad) -> tuple[float, float]:
    """(‖g - r‖ / ‖r‖, cos(g, r)) over the head's weight and bias jointly."""
    g = torch.cat([t.flatten() for t in grad if t is not None]).double()
    r = torch.cat([t.flatten() for t in reference if t is not None]).double()
    r_norm = r.norm().clamp(min=1e-30)
    return float((g - r).norm() / r_norm), float(g @ r / (g.norm().clamp(min=1e-30) * r_norm))


def gradient_errors(
    set_sums: dict[str | None, tuple[HeadGrad, int]],
    real_sums: dict[str | None, tuple[HeadGrad, int]],
) -> dict[str, float]:
    """``grad_error`` and ``grad_cosine`` of the set's mean gradient against the real one (what
    drives the fine-tuning trajectory); ``grad_error_classwise``: the mean over the labels both
    have of the per-label error (what GRADMM matches: one target per class)."""
    error, cosine = relative_error(_mean(list(set_sums.values())), _mean(list(real_sums.values())))
    out = {"grad_error": error, "grad_cosine": cosine}
    shared = [lab for lab in set_sums if lab is not None and lab in real_sums]
    if shared:
        out["grad_error_classwise"] = statistics.fmean(
            relative_error(_mean([set_sums[lab]]), _mean([real_sums[lab]]))[0] for lab in shared
        )
    return out


def capped(examples: Sequence[Example], limit: int, seed: int) -> list[Example]:
    """At most ``limit`` rows: a seeded subsample (the whole set when it fits)."""
    if len(examples) <= limit:
        return list(examples)
    idx = np.sort(np.random.default_rng(seed).choice(len(examples), size=limit, replace=False))
    return [examples[i] for i in idx]


# ---------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run: a training set, a seed and a learning rate (steps 0: evaluate the
    pretrained model only, the zero-shot baseline)."""

    name: str  # the method as reported: synthetic, random, herding, ...
    set_key: str  # key into the training sets ("" for zero-shot)
    seed: int
    lr: float
    steps: int


@dataclass(frozen=True)
class EvalSets:
    dev: list[Example]
    test: list[Example]
    grad_reference: list[Example]  # the real rows whose gradient the sets are compared with


class Backend(Protocol):
    """How one worker trains: Accelerate or DeepSpeed (train_ray.py), plain torch in tests."""

    model: torch.nn.Module  # call this for forwards (it may be a wrapper)

    def unwrapped(self) -> torch.nn.Module: ...

    def step(self, loss: Tensor) -> None:
        """backward, gradient clipping, optimizer and schedule step, zero the gradients."""
        ...

    def full_head(self) -> AbstractContextManager:
        """The head's parameters whole on every worker (ZeRO-3 gathers them)."""
        ...


def batch_schedule(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch_size) row indices: seeded epochs (permutations) laid end to end, so a set
    smaller than a batch repeats rows and every row is seen equally often."""
    if n == 0 or steps == 0:
        return np.zeros((steps, batch_size), dtype=np.int64)
    rng = np.random.default_rng(seed)
    epochs = math.ceil(steps * batch_size / n)
    order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    return order[: steps * batch_size].reshape(steps, batch_size)


def make_optimizer(
    params, lr: float, protocol: ProtocolConfig, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and a linear decay lr_t = lr (1 - t / steps), stepped once per global step."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=protocol.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: max(0.0, 1.0 - t / steps))
    return optimizer, schedule


class PlainBackend:
    """No wrapper, no distribution: evaluation of the pretrained model, and tests."""

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float = 0.0,
        protocol: ProtocolConfig | None = None,
        steps: int = 0,
    ):
        self.model = model
        self.protocol = protocol or ProtocolConfig()
        self.optimizer = self.schedule = None
        if steps > 0:
            self.optimizer, self.schedule = make_optimizer(
                model.parameters(), lr, self.protocol, steps
            )

    def unwrapped(self) -> torch.nn.Module:
        return self.model

    def step(self, loss: Tensor) -> None:
        loss.backward()
        if self.protocol.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.protocol.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)

    def full_head(self) -> AbstractContextManager:
        return nullcontext()


def mean_over_workers(value: float, world_size: int, device: torch.device) -> float:
    """The mean of a per-worker number over the workers (each saw an equal share of a batch)."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return float(total) / world_size


def run_one(
    spec: RunSpec,
    backend: Backend,
    tokenizer,
    train_set: Sequence[Example],
    evals: EvalSets,
    *,
    data: DataConfig,
    protocol: ProtocolConfig,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    grad_error_rows: int = 512,
    report: Callable[[dict[str, Any]], None] = lambda record: None,
) -> list[dict[str, Any]]:
    """Fine-tune for ``spec.steps`` steps and evaluate every ``protocol.eval_every`` steps (and at
    the last). Each worker takes its equal share of every global batch. Every worker evaluates the
    whole DEV/TEST sets and the gradients (ZeRO-3 forwards are collective); records are equal."""
    torch.manual_seed(spec.seed)  # dropout
    schedule = batch_schedule(len(train_set), protocol.batch_size, spec.steps, spec.seed)
    set_rows = capped(train_set, grad_error_rows, seed=spec.seed)
    records: list[dict[str, Any]] = []

    def checkpoint(step: int, train_loss: float | None) -> None:
        backend.model.eval()
        record: dict[str, Any] = {"step": step, "train_loss": train_loss}
        if spec.steps == 0 or step > 0:
            for split, rows in (("dev", evals.dev), ("test", evals.test)):
                r = evaluate(
                    backend.model, tokenizer, rows, data.verbalizers,
                    batch_size=protocol.eval_batch_size, device=device,
                )  # fmt: skip
                record[f"{split}_accuracy"] = r.accuracy
                record[f"{split}_loss"] = r.loss
                record[f"{split}_completion_loss"] = r.completion_loss
        if set_rows and evals.grad_reference:
            lm = CausalLM(backend.unwrapped(), tokenizer, "", None, device, torch.float32)
            with backend.full_head():
                record.update(
                    gradient_errors(
                        head_gradient_sums(lm, set_rows, protocol.eval_batch_size),
                        head_gradient_sums(lm, evals.grad_reference, protocol.eval_batch_size),
                    )
                )
        backend.model.train()
        records.append(record)
        report(record)

    checkpoint(0, None)
    losses: list[float] = []
    for step in range(1, spec.steps + 1):
        mine = np.array_split(schedule[step - 1], world_size)[rank]
        loss = training_loss(
            backend.model, tokenizer, [train_set[i] for i in mine],
            loss=protocol.loss, verbalizers=data.verbalizers, device=device,
        )  # fmt: skip
        backend.step(loss)
        losses.append(float(loss.detach()))
        if step % protocol.eval_every == 0 or step == spec.steps:
            checkpoint(step, mean_over_workers(float(np.mean(losses)), world_size, device))
            losses = []
    return records


# ---------------------------------------------------------------------------------------------
# Preparing a job: every user-input check before Ray starts


@dataclass(frozen=True)
class PreparedJob:
    cfg: FinetuneConfig
    train_set: list[Example]
    pool: list[Example]
    dev: list[Example]
    test: list[Example]
    generation: list[Example] | None  # pool rows the --train set was generated from (if known)
    split_info: dict[str, Any]
    deepspeed: dict[str, Any] | None


def read_manifest(train_path: str) -> dict[str, Any] | None:
    """manifest.json beside the --train file (written by distill.py), when there is one."""
    parent = train_path.rstrip("/").rsplit("/", 1)[0] if "/" in train_path else "."
    try:
        out = OutputDir(parent)
        return out.read_json("manifest.json") if out.exists("manifest.json") else None
    except (OSError, ValueError):
        return None


def manifest_defaults(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """A lowest-precedence config layer from the generation run: the same templates, label words
    and model, so that the evaluation scores the label words the set was generated with."""
    if not manifest or "config" not in manifest:
        return {}
    data = manifest["config"].get("data", {})
    keys = ("text_column", "label_column", "label_names", "prompt_template", "verbalizers")
    layer: dict[str, Any] = {"data": {k: data[k] for k in keys if k in data}}
    if "name" in manifest["config"].get("model", {}):
        layer["model"] = {"name": manifest["config"]["model"]["name"]}
    return layer


def generation_rows(manifest: dict[str, Any] | None, data: DataConfig) -> list[int] | None:
    """Rows of data.split the --train set was generated from: the generation run's own seeded
    sample, reproduced; None when it used another source or split (or there is no manifest)."""
    if not manifest or "config" not in manifest:
        return None
    gen = manifest["config"].get("data", {})

    def same(a: str, b: str) -> bool:
        return a == b or (
            looks_like_path(a) and looks_like_path(b) and os.path.abspath(a) == os.path.abspath(b)
        )

    if not same(str(gen.get("source")), data.source) or gen.get("split") != data.split:
        return None
    try:
        gen_cfg = build_typed(DataConfig, [gen], lambda _: [])
    except ConfigError:
        return None
    real = load_real_examples(gen_cfg, int(manifest["config"].get("seed", 0)))
    return real.table.column("row").to_pylist()


def prepare_job(cfg: FinetuneConfig, *, overwrite: bool) -> PreparedJob:
    """Read and check the inputs, make the splits. Writes nothing; raises a user-facing error."""
    from gradmm_ray.core.lm import load_tokenizer, resolve_model_source

    out = OutputDir(cfg.output)
    if out.exists(METRICS_FILE) and not overwrite:
        raise OutputError(
            f"output {out.uri!r} already holds {METRICS_FILE}; pass --overwrite to replace it"
        )
    table, shown = read_train_file(cfg.train)
    train_set = training_examples(table, cfg.data, loss=cfg.protocol.loss, shown=shown)
    tokenizer = load_tokenizer(
        resolve_model_source(cfg.model.name), cfg.model.revision, cfg.model.trust_remote_code
    )
    check_verbalizers(tokenizer, cfg.data.verbalizers)
    ds = (
        load_deepspeed_config(cfg.workers.deepspeed_config)
        if cfg.workers.strategy == "deepspeed"
        else None
    )

    manifest = read_manifest(cfg.train)
    gen_rows = generation_rows(manifest, cfg.data)
    train_rows, train_texts = read_split(cfg.data, cfg.data.split)
    labels = [ex.label for ex in train_rows]
    named = has_named_splits(cfg.data.source) and cfg.splits.test_split is not None
    if named and cfg.splits.test_split == cfg.data.split:
        raise FinetuneError(
            f"splits.test_split {cfg.splits.test_split!r} is data.split: TEST must be another split"
        )
    rows = split_rows(
        labels,
        dev_size=cfg.splits.dev_size,
        test_size=None if named else cfg.splits.test_size,
        seed=cfg.splits.seed,
        generation_rows=gen_rows or (),
    )
    if named:
        test, test_texts = read_split(cfg.data, cfg.splits.test_split)
    else:
        test = [train_rows[i] for i in rows.test]
        test_texts = [train_texts[i] for i in rows.test]
    dev = [train_rows[i] for i in rows.dev]
    pool, dropped = drop_held_out_duplicates(
        [train_rows[i] for i in rows.pool],
        [train_texts[i] for i in rows.pool],
        [*test_texts, *(train_texts[i] for i in rows.dev)],
    )
    generation = None
    if gen_rows is not None:
        in_pool = {f"{cfg.data.split}:{r}" for r in gen_rows}
        generation = [ex for ex in pool if ex.origin in in_pool]
    split_info = {
        "source": cfg.data.source,
        "train_split": cfg.data.split,
        "test_split": cfg.splits.test_split
        if named
        else f"{cfg.splits.test_size} rows carved from {cfg.data.split}",
        "pool": len(pool),
        "dev": len(dev),
        "test": len(test),
        "pool_rows_dropped_as_duplicates_of_held_out_text": dropped,
        "generation_rows_known": gen_rows is not None,
        "generation_rows": len(gen_rows) if gen_rows is not None else None,
        "dev_rows_used_by_generation": rows.dev_generation_overlap,
        "split_seed": cfg.splits.seed,
    }

    budget = class_budget(train_set)
    pool_labels = [ex.label for ex in pool]
    for name in cfg.baselines:
        if name in ("random", "herding", "kcenter"):
            check_budget(pool_labels, budget, f"baseline {name!r}")
        if name == "same-real" and not generation:
            raise FinetuneError(
                "baseline 'same-real': the real rows the --train set was generated from are unknown "
                "(needs manifest.json beside --train naming the same data.source and data.split)"
            )
    if cfg.protocol.loss == "classification" and len(dev) == 0:
        raise FinetuneError("the dev split is empty")
    return PreparedJob(cfg, train_set, pool, dev, test, generation, split_info, ds)


# ---------------------------------------------------------------------------------------------
# Planning the runs


def plan_runs(
    prep: PreparedJob, embeddings: Tensor | None
) -> tuple[dict[str, list[Example]], list[RunSpec]]:
    """The training sets (random differs per seed) and one run per (method, seed, lr); zero-shot
    is one evaluation (it has no randomness)."""
    cfg, p = prep.cfg, prep.cfg.protocol
    budget = class_budget(prep.train_set)
    labels = [ex.label for ex in prep.pool]
    sets: dict[str, list[Example]] = {SYNTHETIC: list(prep.train_set)}
    set_of: dict[str, dict[int, str]] = {SYNTHETIC: dict.fromkeys(p.seeds, SYNTHETIC)}
    for name in cfg.baselines:
        if name == "random":
            set_of[name] = {}
            for seed in p.seeds:
                idx = random_subset(labels, budget, seed)
                sets[f"random@{seed}"] = [prep.pool[i] for i in idx]
                set_of[name][seed] = f"random@{seed}"
        elif name in ("herding", "kcenter"):
            if embeddings is None:
                raise AssertionError("Internal error: herding/kcenter need pool embeddings")
            idx = coreset_subset(labels, embeddings, budget, name)
            sets[name] = [prep.pool[i] for i in idx]
            set_of[name] = dict.fromkeys(p.seeds, name)
        elif name == "full":
            sets[name] = list(prep.pool)
            set_of[name] = dict.fromkeys(p.seeds, name)
        elif name == "same-real":
            sets[name] = list(prep.generation or [])
            set_of[name] = dict.fromkeys(p.seeds, name)
    runs = []
    if "zero-shot" in cfg.baselines:
        runs.append(RunSpec("zero-shot", "", p.seeds[0], 0.0, 0))
    order = [SYNTHETIC, *(b for b in cfg.baselines if b != "zero-shot")]
    for name in order:
        for seed in p.seeds:
            for lr in p.lrs:
                runs.append(RunSpec(name, set_of[name][seed], seed, lr, p.steps))
    return sets, runs


# ---------------------------------------------------------------------------------------------
# Choosing on DEV, summarising over seeds


def choose_on_dev(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The record with the best DEV accuracy (then lower DEV loss, then the earlier one) among the
    evaluated ones; TEST is read only here, at the chosen record."""
    evaluated = [r for r in records if "dev_accuracy" in r]
    if not evaluated:
        raise AssertionError("Internal error: a run has no evaluated record")
    return max(evaluated, key=lambda r: (r["dev_accuracy"], -r["dev_loss"]))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    vals = [float(v) for v in values]
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(
    histories: Sequence[dict[str, Any]], n_train: dict[str, int], seeds: Sequence[int]
) -> list[dict[str, Any]]:
    """One entry per method: per seed the (lr, step) chosen on DEV across the lr grid, its TEST
    accuracy/loss, mean and standard deviation over seeds, and the gradient-error curve of the
    chosen learning rates."""
    names: list[str] = []
    for h in histories:
        if h["spec"]["name"] not in names:
            names.append(h["spec"]["name"])
    out = []
    for name in names:
        mine = [h for h in histories if h["spec"]["name"] == name]
        per_seed, curves = [], []
        for seed in sorted({h["spec"]["seed"] for h in mine}):
            candidates = [
                {**r, "lr": h["spec"]["lr"], "_history": h}
                for h in mine
                if h["spec"]["seed"] == seed
                for r in h["records"]
            ]
            best = choose_on_dev(candidates)
            per_seed.append(
                {
                    "seed": seed,
                    "accuracy": best["test_accuracy"],
                    "loss": best["test_loss"],
                    "completion_loss": best["test_completion_loss"],
                    "lr": best["lr"],
                    "step": best["step"],
                    "dev_accuracy": best["dev_accuracy"],
                    "dev_loss": best["dev_loss"],
                }
            )
            curves.append({r["step"]: r for r in best["_history"]["records"] if "grad_error" in r})
        if name == "zero-shot":  # deterministic: one evaluation stands for every seed
            per_seed = [{**per_seed[0], "seed": s} for s in seeds]
        acc_mean, acc_std = mean_std([s["accuracy"] for s in per_seed])
        loss_mean, loss_std = mean_std([s["loss"] for s in per_seed])
        steps = sorted({s for c in curves for s in c})
        curve = []
        for step in steps:
            at = [c[step] for c in curves if step in c]
            point = {"step": step}
            point["mean"], point["std"] = mean_std([r["grad_error"] for r in at])
            classwise = [r["grad_error_classwise"] for r in at if "grad_error_classwise" in r]
            if classwise:
                point["classwise_mean"], point["classwise_std"] = mean_std(classwise)
            curve.append(point)
        out.append(
            {
                "name": name,
                "n_train": n_train.get(name, 0),
                "accuracy_mean": acc_mean,
                "accuracy_std": acc_std,
                "loss_mean": loss_mean,
                "loss_std": loss_std,
                "seeds": per_seed,
                "grad_error": curve,
            }
        )
    return out


def n_train_of(sets: dict[str, list[Example]], runs: Sequence[RunSpec]) -> dict[str, int]:
    return {r.name: len(sets.get(r.set_key, [])) for r in runs}


# ---------------------------------------------------------------------------------------------
# Reports: metrics.json, results.md, plots


def _png(fig) -> bytes:
    from gradmm_ray.distill.report import _png as png

    return png(fig)


def plot_accuracy(runs: Sequence[dict[str, Any]], title: str = "test accuracy (chosen on dev)"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(runs) + 1.4))
    y = np.arange(len(runs))
    acc = [100 * r["accuracy_mean"] for r in runs]
    err = [100 * r["accuracy_std"] for r in runs]
    ax.barh(y, acc, xerr=err, color="tab:blue", alpha=0.8, capsize=3)
    ax.set_yticks(y, [f"{r['name']} (n={r['n_train']})" for r in runs])
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (%), mean ± std over seeds")
    lo = max(0.0, min(acc) - max(err + [0]) - 10)
    ax.set_xlim(lo, 100)
    ax.set_title(title)
    for yi, a, e in zip(y, acc, err, strict=True):
        ax.text(a + e + 0.8, yi, f"{a:.1f}", va="center", fontsize=8)
    return fig


def plot_grad_error(runs: Sequence[dict[str, Any]], title: str = "last-layer gradient error"):
    """Left: the error of the set's mean gradient; right: the mean per-class error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    panels = (
        ("mean", "std", "all rows"),
        ("classwise_mean", "classwise_std", "per class, averaged"),
    )
    for ax, (key, spread, what) in zip(axes, panels, strict=True):
        for r in runs:
            points = [c for c in r["grad_error"] if key in c]
            if not points:
                continue
            steps = [c["step"] for c in points]
            mean = np.array([c[key] for c in points])
            std = np.array([c[spread] for c in points])
            ax.plot(steps, mean, marker="o", ms=3, label=f"{r['name']} (n={r['n_train']})")
            ax.fill_between(steps, np.maximum(mean - std, 0.0), mean + std, alpha=0.15)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("‖G(set) − G(real)‖ / ‖G(real)‖")
        ax.set_yscale("symlog", linthresh=0.01)  # spans 0 (full) to >10 (step 0)
        ax.set_title(f"{title}: {what}", fontsize=10)
    axes[0].legend(fontsize=7)
    return fig


def results_table(runs: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| method | # train | test accuracy (%) | test loss | chosen lr (per seed) | chosen step (per seed) | final gradient error (per class) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lrs = ", ".join(f"{s['lr']:g}" for s in r["seeds"]) if r["name"] != "zero-shot" else "-"
        steps = ", ".join(str(s["step"]) for s in r["seeds"]) if r["name"] != "zero-shot" else "-"
        last = r["grad_error"][-1] if r["grad_error"] else None
        final = f"{last['mean']:.3f}" if last else "-"
        if last and "classwise_mean" in last:
            final += f" ({last['classwise_mean']:.3f})"
        lines.append(
            f"| {DISPLAY_NAMES.get(r['name'], r['name'])} | {r['n_train']} | "
            f"{100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f} | "
            f"{r['loss_mean']:.3f} ± {r['loss_std']:.3f} | {lrs} | {steps} | {final} |"
        )
    return lines


def _listed(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def results_markdown(metrics: dict[str, Any]) -> str:
    p, s = metrics["protocol"], metrics["splits"]
    lines = [
        "# Fine-tuning results",
        "",
        f"Model `{metrics['model']}`, trained on `{metrics['train']}`; real data `{s['source']}`.",
        "",
        *results_table(metrics["runs"]),
        "",
        "Accuracy and loss are on the TEST split, at the learning rate and checkpoint with the best "
        "DEV accuracy for each seed (TEST never takes part in the choice); ± is the sample standard "
        f"deviation over seeds {_listed(p['seeds'])}. Zero-shot is one deterministic evaluation. The "
        "gradient error is ‖G(set) − G(real)‖ / ‖G(real)‖ of the LM head's completion cross-entropy "
        "gradient at the current parameters, at the chosen learning rates, at the last step; in "
        "brackets the mean over classes of the per-class error (GRADMM matches one gradient per "
        "class, so a set whose class balance differs from the real data's has a large overall "
        "error even when each class matches). `full` is the gradient reference itself (error 0) "
        "when the pool fits `splits.grad_error_rows`.",
        "",
        "![accuracy](accuracy.png)",
        "",
        "![gradient error](grad_error.png)",
        "",
        "## Protocol",
        "",
        f"* {p['steps']} steps, global batch {p['batch_size']}, AdamW (weight decay "
        f"{p['weight_decay']}), linear decay to 0, learning rates {_listed(p['lrs'])}, evaluation every "
        f"{p['eval_every']} steps, gradient clipping {p['max_grad_norm']}, loss `{p['loss']}`.",
        f"* Workers: {metrics['workers']['num_workers']} x ({metrics['workers']['strategy']}"
        + (
            f", DeepSpeed `{metrics['workers']['deepspeed_config']}`"
            if metrics["workers"]["strategy"] == "deepspeed"
            else ""
        )
        + ").",
        f"* Splits: TEST = {s['test_split']} ({s['test']} rows); DEV = {s['dev']} seeded rows of "
        f"`{s['train_split']}`; real baselines draw from the remaining {s['pool']} rows "
        f"({s['pool_rows_dropped_as_duplicates_of_held_out_text']} dropped as duplicates of a "
        "DEV/TEST text). Random, herding and k-center match the training set's per-class counts; "
        "herding and k-center run on mean-pooled hidden states of the pretrained model.",
    ]
    if s.get("generation_rows_known"):
        overlap = s["dev_rows_used_by_generation"]
        lines.append(
            f"* The --train set was generated from {s['generation_rows']} rows of "
            f"`{s['train_split']}`: none is in TEST"
            + (
                f"; {overlap} are in DEV, since generation used (nearly) every row (DEV only "
                "chooses lr and checkpoint)."
                if overlap
                else " or DEV."
            )
        )
    else:
        lines.append(
            "* Which real rows the --train set was generated from is unknown (no manifest.json "
            "beside it naming this source and split): make sure TEST was not among them."
        )
    for note in metrics.get("notes", []):
        lines.append(f"* {note}")
    return "\n".join(lines) + "\n"


def metrics_document(
    runs: list[dict[str, Any]],
    *,
    cfg: FinetuneConfig,
    split_info: dict[str, Any],
    seconds: float,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    from gradmm_ray.distill.report import package_versions

    return {
        "runs": runs,
        "model": cfg.model.name,
        "train": cfg.train,
        "protocol": dataclasses.asdict(cfg.protocol),
        "splits": split_info,
        "workers": dataclasses.asdict(cfg.workers),
        "config": cfg.to_dict(),
        "versions": package_versions(),
        "seconds": round(seconds, 1),
        "notes": list(notes),
    }


def write_outputs(
    out: OutputDir, metrics: dict[str, Any], histories: Sequence[dict[str, Any]]
) -> list[str]:
    out.write_json(METRICS_FILE, metrics)
    out.write_json(HISTORY_FILE, {"runs": list(histories)})
    out.write_bytes("accuracy.png", _png(plot_accuracy(metrics["runs"])))
    out.write_bytes("grad_error.png", _png(plot_grad_error(metrics["runs"])))
    out.write_text(RESULTS_FILE, results_markdown(metrics))
    return [METRICS_FILE, HISTORY_FILE, RESULTS_FILE, "accuracy.png", "grad_error.png"]
