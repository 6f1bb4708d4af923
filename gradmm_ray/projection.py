"""Top-k projection of free embeddings into the vocabulary, left to right, with the LM's KV cache.

For position j of each example, with u_j = (X + Λ/ρ)_j and the LM conditioned on the
generation prefix of the example's label plus the tokens chosen so far (GRADMM Sec. 4.3):

  * ``paper``:     candidates = the k most probable next tokens; pick the one whose embedding
                   is nearest to u_j in Euclidean distance.
  * ``reference``: candidates = the k tokens whose embeddings have the highest cosine to u_j;
                   pick the LM's most probable among them (the authors' code).

Special tokens are never candidates; ``word_like_only`` further keeps alphabetic tokens of at most
17 characters. With the cache each position costs one incremental LM step, not a re-run of the
prefix: O(n) instead of O(n²) over n positions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradmm_ray.lm import CausalLM

RULES = ("paper", "reference")
MAX_WORD_CHARS = 17


def allowed_token_mask(tokenizer, vocab_size: int, *, word_like_only: bool) -> Tensor:
    """(V,) bool: tokens that may be chosen. Special tokens never are."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    special = [i for i in tokenizer.all_special_ids if i is not None and i < vocab_size]
    allowed[special] = False
    if word_like_only:
        for i in range(vocab_size):
            if allowed[i]:
                word = tokenizer.decode([i]).strip()
                allowed[i] = word.isalpha() and len(word) <= MAX_WORD_CHARS
    return allowed


def choose_tokens(
    u: Tensor, logits: Tensor, E: Tensor, E_unit: Tensor, allowed: Tensor, *, rule: str, k: int
) -> Tensor:
    """One position for N examples: u (N, d), next-token logits (N, V) -> token ids (N,)."""
    k = min(k, int(allowed.sum()))
    neg_inf = torch.finfo(torch.float32).min
    if rule == "paper":
        scores = logits.float().masked_fill(~allowed, neg_inf)
        cand = scores.topk(k, dim=-1).indices  # (N, k)
        dist = (E[cand] - u.unsqueeze(1)).square().sum(-1)  # (N, k)
        pick = dist.argmin(dim=-1)
    elif rule == "reference":
        cos = (u / u.norm(dim=-1, keepdim=True).clamp(min=1e-12)) @ E_unit.T  # (N, V)
        cand = cos.masked_fill(~allowed, neg_inf).topk(k, dim=-1).indices  # (N, k)
        pick = logits.float().gather(1, cand).argmax(dim=-1)
    else:
        raise ValueError(f"admm.projection: got {rule!r}, expected one of {RULES}")
    return cand.gather(1, pick.unsqueeze(1)).squeeze(1)


def _left_pad(prefixes: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prefixes)
    ids = torch.full((len(prefixes), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prefixes), width), dtype=torch.long)
    for i, p in enumerate(prefixes):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def project(
    lm: CausalLM,
    U: Tensor,
    prefixes: list[list[int]],
    allowed: Tensor,
    *,
    rule: str,
    k: int,
    use_cache: bool = True,
) -> Tensor:
    """Project U (N, n, d) to token ids (N, n). ``prefixes``: generation-prefix ids per example."""
    dev = lm.device
    E = lm.input_embeddings.detach().float()  # (V, d)
    E_unit = E / E.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    allowed = allowed.to(dev)
    U = U.to(dev).float()
    ids, mask = _left_pad(prefixes, lm.tokenizer.pad_token_id)
    ids, mask = ids.to(dev), mask.to(dev)
    n = U.shape[1]
    chosen = torch.empty((U.shape[0], n), dtype=torch.long, device=dev)
    cache = None
    step_ids = ids
    for j in range(n):
        if use_cache:
            position = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
            out = lm.model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=position,
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
        else:
            position = (mask.cumsum(-1) - 1).clamp(min=0)
            out = lm.model(
                input_ids=ids, attention_mask=mask, position_ids=position, use_cache=False
            )
        logits = out.logits[:, -1]  # (N, V)
        tok = choose_tokens(U[:, j], logits, E, E_unit, allowed, rule=rule, k=k)
        chosen[:, j] = tok
        step_ids = tok.unsqueeze(1)
        ids = torch.cat([ids, step_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
    return chosen
