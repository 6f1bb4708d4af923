"""Protocol (a) of the quality benchmark: fine-tune the LM's last layer only, on hidden states
computed once.

Every example is the pair ``template(text)`` + verbalizer, as in stage 1. With single-token
verbalizers S (one per label, sorted by label) and h the hidden state fed to the head at the
prompt's last position, the label options' scores are the logits z_S = W_S h (+ b_S), the model's
logits tail applied. The classification loss of the fine-tuning job (cross-entropy over the
options' log-likelihoods) is then exactly the two-way softmax cross-entropy over z_S: the
vocabulary's normaliser is common to all options and cancels. So training the last layer for this
task is training W_S (|S| x d) from its pretrained value on the features h: the rows GRADMM's
``label_rows`` target matches, and the only head parameters the decision depends on.

Cheap enough for many seeds and a learning-rate grid: full-batch Adam on at most a few hundred
rows, evaluated every ``eval_every`` steps on DEV and TEST.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gradmm_ray.core.lm import CausalLM
from gradmm_ray.core.target_space import single_token_ids
from gradmm_ray.core.text import encode_pair


@dataclass(frozen=True)
class Features:
    """Hidden states at the label position, (N, d) fp32 on CPU, and label indices (N,) into the
    sorted labels."""

    h: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, rows: Sequence[int]) -> Features:
        index = torch.as_tensor(list(rows), dtype=torch.long)
        return Features(self.h[index], self.y[index])


@torch.no_grad()
def label_position_states(
    lm: CausalLM,
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    template: str,
    verbalizers: dict[str, str],
    max_tokens: int,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> Features:
    """The head's input at the first completion position of each example's training pair
    (exactly the pair stage 1 builds). Texts are batched by length to waste little on padding."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    sorted_labels = sorted(verbalizers)
    first = verbalizers[sorted_labels[0]]  # causal: the state does not depend on the completion
    h = torch.empty((len(texts), lm.input_embeddings.shape[1]), dtype=torch.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        pairs = [
            encode_pair(lm.tokenizer, texts[i], first, template=template, max_tokens=max_tokens)
            for i in rows
        ]
        A, _, _ = lm.completion_states(pairs)
        h[torch.tensor(rows)] = A[:, 0].float().cpu()
        if progress:
            progress(len(rows))
    y = torch.tensor([sorted_labels.index(label) for label in labels], dtype=torch.long)
    return Features(h, y)


@dataclass(frozen=True)
class LabelHead:
    """The pretrained head's rows of the label tokens: the starting point of every run."""

    W: Tensor  # (K, d) fp32, rows ordered by sorted label
    b: Tensor | None  # (K,)
    tail: Callable[[Tensor], Tensor] | None

    @classmethod
    def of(cls, lm: CausalLM, verbalizers: dict[str, str]) -> LabelHead:
        rows = torch.tensor(single_token_ids(lm.tokenizer, verbalizers))
        W, b = lm.head_params_fp32()
        return cls(
            W[rows].cpu().clone(),
            None if b is None else b[rows].cpu().clone(),
            lm.logits_tail(),
        )


def option_logits(W: Tensor, b: Tensor | None, tail, h: Tensor) -> Tensor:
    z = h @ W.T
    if b is not None:
        z = z + b
    return tail(z) if tail is not None else z


def accuracy(W: Tensor, b: Tensor | None, tail, data: Features) -> float:
    with torch.no_grad():
        return float((option_logits(W, b, tail, data.h).argmax(-1) == data.y).float().mean())


def mean_gradient(W: Tensor, b: Tensor | None, tail, data: Features) -> Tensor:
    """∇_W of the mean two-way cross-entropy over ``data`` at W (bias held fixed), (K, d)."""
    W = W.detach().clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(option_logits(W, b, tail, data.h), data.y)
    (g,) = torch.autograd.grad(loss, W)
    return g


def gradient_error(g: Tensor, reference: Tensor) -> dict[str, float]:
    """‖g − G‖/‖G‖ (the paper's normalised gradient error) and 1 − cos(g, G) (what GRADMM
    matches: scale-free)."""
    rel = float((g - reference).norm() / reference.norm().clamp(min=1e-12))
    cos = float(
        torch.nn.functional.cosine_similarity(g.flatten(), reference.flatten(), dim=0).clamp(-1, 1)
    )
    return {"relative": rel, "cosine_distance": 1.0 - cos}


@dataclass
class Trajectory:
    """One training run: accuracies and gradient errors at steps 0, every, ..., steps."""

    lr: float
    steps: list[int] = field(default_factory=list)
    dev: list[float] = field(default_factory=list)
    test: list[float] = field(default_factory=list)
    grad_error: list[dict[str, float]] = field(default_factory=list)


def train(
    head: LabelHead,
    train_set: Features,
    *,
    lr: float,
    steps: int,
    eval_every: int,
    dev: Features,
    test: Features,
    reference: Features | None = None,
) -> Trajectory:
    """Full-batch Adam on W_S (the bias, where the model has one, trains too) from the pretrained
    head. ``reference``: the real rows whose gradient the set's gradient is compared with, at the
    same weights, at every evaluation."""
    W = head.W.clone().requires_grad_(True)
    b = None if head.b is None else head.b.clone().requires_grad_(True)
    opt = torch.optim.Adam([p for p in (W, b) if p is not None], lr=lr)
    run = Trajectory(lr=lr)

    def record(step: int) -> None:
        run.steps.append(step)
        run.dev.append(accuracy(W, b, head.tail, dev))
        run.test.append(accuracy(W, b, head.tail, test))
        if reference is not None:
            run.grad_error.append(
                gradient_error(
                    mean_gradient(W, b, head.tail, train_set),
                    mean_gradient(W, b, head.tail, reference),
                )
            )

    record(0)
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        logits = option_logits(W, b, head.tail, train_set.h)
        torch.nn.functional.cross_entropy(logits, train_set.y).backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            record(step)
    return run


def best_on_dev(runs: Sequence[Sequence[Trajectory]]) -> tuple[int, int]:
    """Choose (learning rate index, evaluation index) with the best mean DEV accuracy over seeds.
    ``runs[lr_index][seed]``. Ties go to the smaller learning rate, then the earlier step."""
    best, choice = -1.0, (0, 0)
    for i, seeds in enumerate(runs):
        for j in range(len(seeds[0].dev)):
            score = sum(run.dev[j] for run in seeds) / len(seeds)
            if score > best + 1e-12:
                best, choice = score, (i, j)
    return choice
