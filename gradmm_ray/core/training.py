"""Fine-tuning a causal LM on labelled pairs, in pure torch: the losses, evaluation and the loop
of one run (no Ray, no file I/O; ``distributed/train.py`` runs :func:`run_one` on Ray Train
workers, tests run it in one process with :class:`PlainBackend`).

Classification loss. For a text x with label options k = 1..K, completion c_k of T_k tokens
(``data.verbalizers``, tokenised by ``encode_pair``: prompt with special tokens + completion
without),

    s_k = (1/T_k) Σ_t log p(c_k,t | prompt(x), c_k,<t)      (length-normalised log-likelihood)
    loss = -log softmax(s)_y,      prediction = argmax_k s_k.

SFT loss (``loss: sft``): the mean over examples of the mean cross-entropy over the completion
tokens, i.e. -s_y: the loss GRADMM matches the gradient of.

Protocol (paper Table 1, and the authors' evaluation code): ``steps`` steps
of global batch ``batch_size``, AdamW with a linear decay to 0, an evaluation every
``eval_every`` steps (and at the last), each recording DEV/TEST accuracy and loss and the
gradient error of ``core/gradient_error.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gradmm_ray.config import DataConfig
from gradmm_ray.core.gradient_error import capped, gradient_errors, head_gradient_sums
from gradmm_ray.core.lm import CausalLM, pad_pairs
from gradmm_ray.core.text import encode_pair


@dataclass(frozen=True)
class Example:
    """One training or evaluation pair. ``origin`` says where it came from: "train:17" is row 17
    of the real data.split, "test:3" of the test split, "train-file:5" of the --train file."""

    prompt: str
    completion: str
    label: str | None  # None only in an sft set whose completions are not label words
    origin: str


class TrainingProtocol(Protocol):
    """What the loop reads of the protocol: ``finetune.config.ProtocolConfig`` (where the
    paper's defaults and their validation live)."""

    batch_size: int  # global batch, split evenly over the workers
    eval_every: int
    loss: str  # classification | sft
    weight_decay: float
    max_grad_norm: float | None  # None: no clipping
    eval_batch_size: int


# ---------------------------------------------------------------------------------------------
# Losses and evaluation


def model_completion_logprobs(
    model: torch.nn.Module, pairs: list[tuple[list[int], int]], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Per pair: Σ log p(completion tokens) under ``model`` (any wrapper returning ``.logits``)
    and the completion length; differentiable when grad is enabled. Unlike
    ``core.scoring.completion_logprobs`` (no gradient, the closed-form head of a ``CausalLM``),
    this runs the whole (possibly wrapped, sharded) model forward, as training needs."""
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
    total, count = model_completion_logprobs(model, pairs, tokenizer.pad_token_id, device)
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
    total, count = model_completion_logprobs(model, pairs, tokenizer.pad_token_id, device)
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
# One run: a training set, a seed, a learning rate


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
    """How one worker trains: Accelerate or DeepSpeed (distributed/train.py), plain torch in tests."""

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
    params, lr: float, protocol: TrainingProtocol, steps: int
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
        protocol: TrainingProtocol | None = None,
        steps: int = 0,
    ):
        self.model = model
        self.protocol = protocol
        self.optimizer = self.schedule = None
        if steps > 0:
            if protocol is None:
                raise AssertionError("Internal error: training steps need a protocol")
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
    protocol: TrainingProtocol,
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
