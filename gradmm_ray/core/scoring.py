"""Scores of texts under the LM that need no gradient: completion log-likelihoods through the
closed-form head (label check, log-perplexity) and mean-pooled hidden states (nearest-neighbour
audit, coreset baselines)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradmm_ray.core.headgrad import head_logits
from gradmm_ray.core.lm import CausalLM
from gradmm_ray.core.text import encode_prompt, format_prompt


@torch.inference_mode()
def completion_logprobs(
    lm: CausalLM, head: tuple[torch.Tensor, torch.Tensor | None], pairs: list[tuple[list[int], int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: the summed log-likelihood of its completion tokens and their count. ``head``:
    ``lm.head_params_fp32()``, made once by the caller (a V x d copy on a bf16 model)."""
    A, targets, mask = lm.completion_states(pairs)
    logits = head_logits(A, *head)
    tail = lm.logits_tail()
    logp = torch.log_softmax(tail(logits) if tail else logits, dim=-1)
    tok = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask  # (N, T)
    return tok.sum(1).cpu(), mask.sum(1).cpu()


def few_shot_context(
    demos: tuple[dict[str, str], ...], template: str, verbalizers: dict[str, str]
) -> str:
    return "".join(
        f"{format_prompt(template, d['text'])}{verbalizers[d['label']]}\n" for d in demos
    )


@torch.no_grad()
def mean_pooled_states(lm: CausalLM, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """(N, d) fp32 on CPU: the mean over each text's tokens (special tokens included, as the
    prompt of a training pair) of the hidden states fed to the head. Right padding, as
    ``lm.hidden_states`` expects, whatever the tokenizer's own padding side."""
    out = []
    for start in range(0, len(texts), batch_size):
        ids = [encode_prompt(lm.tokenizer, t) for t in texts[start : start + batch_size]]
        length = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), length), lm.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(ids), length), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            attention[i, : len(x)] = 1
        hidden = lm.hidden_states(
            input_ids=input_ids.to(lm.device), attention_mask=attention.to(lm.device)
        )  # (n, L, d)
        mask = attention.to(lm.device).unsqueeze(-1).float()  # (n, L, 1)
        out.append(((hidden.float() * mask).sum(1) / mask.sum(1)).cpu())
    return torch.cat(out) if out else torch.empty(0, lm.input_embeddings.shape[1])
