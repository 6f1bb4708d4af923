"""Top-k projection of free embeddings into the vocabulary, left to right, with the LM's KV cache.

For position j of each example, with u_j = (X + Λ/ρ)_j and the LM conditioned on the
generation prefix of the example's label plus the tokens chosen so far (GRADMM Sec. 4.3):

  * ``paper``:     candidates = the k most probable next tokens; pick the one whose embedding
                   is nearest to u_j in Euclidean distance.
  * ``reference``: candidates = the k tokens whose embeddings have the highest cosine to u_j;
                   pick the LM's most probable among them (the authors' code).

Special tokens are never candidates; ``word_like_only`` further keeps alphabetic tokens of at most
17 characters. Its default, ``"auto"``, turns it on for real vocabularies (over
``AUTO_WORD_LIKE_MIN_VOCAB`` tokens): a byte-level BPE vocabulary such as SmolLM2's holds hundreds
of byte fragments that decode alone to U+FFFD, and a synthetic text made of them shows ``\ufffd``.
An alphabetic token always decodes to whole characters, so no chosen text can contain one.

Cost. With the cache each position costs one incremental LM step, not a re-run of the prefix:
O(n) instead of O(n²) over n positions. The ``reference`` candidates do not depend on the LM, so
they are found for all n positions in one matmul up front, and each step then scores only those k
tokens from the last hidden state instead of applying the whole V-wide head.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradmm_ray.config import PROJECTION_RULES as RULES  # defined once, with the config
from gradmm_ray.core.headgrad import times_transposed
from gradmm_ray.core.lm import CausalLM

MAX_WORD_CHARS = 17
# word_like_only "auto": on above this many tokens. The tiny model's 1,024 stay all allowed (its
# pinned results); real byte-level BPE vocabularies (GPT-2 50,257, SmolLM2 49,152) are far above.
AUTO_WORD_LIKE_MIN_VOCAB = 8192
_COSINE_CHUNK = 1 << 26  # elements of one (rows, V) cosine block: 256 MiB in fp32


def resolve_word_like_only(word_like_only: bool | str, vocab_size: int) -> bool:
    """``admm.word_like_only`` as a bool: ``"auto"`` is on for vocabularies over
    ``AUTO_WORD_LIKE_MIN_VOCAB`` tokens."""
    if isinstance(word_like_only, bool):
        return word_like_only
    if word_like_only != "auto":
        raise ValueError(f"admm.word_like_only: got {word_like_only!r}, expected true/false/auto")
    return vocab_size > AUTO_WORD_LIKE_MIN_VOCAB


def allowed_token_mask(tokenizer, vocab_size: int, *, word_like_only: bool | str) -> Tensor:
    """(V,) bool: tokens that may be chosen. Special tokens never are."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    special = [i for i in tokenizer.all_special_ids if i is not None and i < vocab_size]
    allowed[special] = False
    if resolve_word_like_only(word_like_only, vocab_size):
        words = tokenizer.batch_decode([[i] for i in range(vocab_size)])  # one call: ~0.3 s at 49k
        for i, word in enumerate(words):
            if allowed[i]:
                word = word.strip()
                allowed[i] = word.isalpha() and len(word) <= MAX_WORD_CHARS
    return allowed


def cosine_candidates(u: Tensor, E: Tensor, allowed: Tensor, k: int) -> Tensor:
    """(..., d) -> (..., k): the k allowed tokens whose embeddings have the highest cosine to u,
    best first. Row blocks bound the (rows, V) score matrix."""
    E = E.float()
    E_unit = E / E.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    flat = u.reshape(-1, u.shape[-1]).float()
    flat = flat / flat.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    block = (~allowed).float() * torch.finfo(torch.float32).min  # (V,): 0 or "minus infinity"
    rows = max(1, _COSINE_CHUNK // E.shape[0])
    cand = [(chunk @ E_unit.T + block).topk(k, dim=-1).indices for chunk in flat.split(rows)]
    return torch.cat(cand).reshape(*u.shape[:-1], k)


class NextTokenLogits:
    """Next-token logits of N left-padded prefixes that grow by one chosen token per step.

    ``use_cache=True`` feeds only the new token through the base model with the KV cache and
    applies the head to the last hidden state, only at the rows asked for. ``use_cache=False`` is
    the reference implementation's way: the whole sequence through the full model at every step
    (logits at every position), then the last position's row."""

    def __init__(self, lm: CausalLM, prefixes: list[list[int]], *, use_cache: bool):
        self.lm, self.use_cache = lm, use_cache
        self.tail = lm.logits_tail()
        ids, mask = _left_pad(prefixes, lm.tokenizer.pad_token_id)
        self.ids, self.mask = ids.to(lm.device), mask.to(lm.device)
        self.cache = None
        self._forward(self.ids)

    def append(self, tokens: Tensor) -> None:
        """Extend every sequence by its chosen token, (N,)."""
        step = tokens.unsqueeze(1)
        self.ids = torch.cat([self.ids, step], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(step)], dim=1)
        self._forward(step if self.use_cache else self.ids)

    def __call__(self, rows: Tensor | None = None) -> Tensor:
        """Logits in fp32: all (N, V) when ``rows`` is None, else at token ids ``rows`` (N, k)."""
        if not self.use_cache:
            return self.logits if rows is None else self.logits.gather(1, rows)
        head = self.lm.head
        if rows is None:
            z = times_transposed(self.hidden, head.weight)
            return self._tail(z if head.bias is None else z + head.bias).float()
        w = _rows(head.weight, rows).float()  # (N, k, d)
        z = torch.bmm(w, self.hidden.float().unsqueeze(-1)).squeeze(-1)
        if head.bias is not None:
            z = z + _rows(head.bias, rows).float()
        return self._tail(z)

    def _forward(self, new_ids: Tensor) -> None:
        position = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -new_ids.shape[1] :]
        if self.use_cache:
            out = self.lm.model.base_model(
                input_ids=new_ids,
                attention_mask=self.mask,
                position_ids=position,
                past_key_values=self.cache,
                use_cache=True,
            )
            self.cache = out.past_key_values
            self.hidden = out.last_hidden_state[:, -1]  # (N, d)
        else:
            out = self.lm.model(
                input_ids=new_ids, attention_mask=self.mask, position_ids=position, use_cache=False
            )
            self.logits = out.logits[:, -1].float()  # (N, V)

    def _tail(self, z: Tensor) -> Tensor:
        return z if self.tail is None else self.tail(z)


def _rows(table: Tensor, ids: Tensor) -> Tensor:
    # table[ids] through index_select: several times faster than advanced indexing on CPU.
    return table.index_select(0, ids.reshape(-1)).view(*ids.shape, *table.shape[1:])


def _left_pad(prefixes: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prefixes)
    ids = torch.full((len(prefixes), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prefixes), width), dtype=torch.long)
    for i, p in enumerate(prefixes):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
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
    first_allowed: Tensor | None = None,
) -> Tensor:
    """Project U (N, n, d) to token ids (N, n). ``prefixes``: generation-prefix ids per example.
    ``first_allowed``: position 0's allowed tokens when they differ (SequenceLayout.lead)."""
    if rule not in RULES:
        raise ValueError(f"admm.projection: got {rule!r}, expected one of {RULES}")
    dev = lm.device
    E = lm.input_embeddings.detach()  # (V, d)
    allowed = allowed.to(dev)
    U = U.to(dev).float()
    k = min(k, int(allowed.sum()))
    first = allowed if first_allowed is None else first_allowed.to(dev)
    k_first = min(k, int(first.sum()))
    by_cosine = cosine_candidates(U, E, allowed, k) if rule == "reference" else None  # (N, n, k)
    if by_cosine is not None and first_allowed is not None:
        by_cosine[:, 0, :k_first] = cosine_candidates(U[:, 0], E, first, k_first)
        by_cosine[:, 0, k_first:] = by_cosine[:, 0, :1]  # repeats of the best: same argmax
    block = (~allowed).float() * torch.finfo(torch.float32).min
    block_first = (~first).float() * torch.finfo(torch.float32).min
    logits = NextTokenLogits(lm, prefixes, use_cache=use_cache)
    chosen = torch.empty(U.shape[:2], dtype=torch.long, device=dev)
    for j in range(U.shape[1]):
        if rule == "paper":
            mask, kj = (block_first, k_first) if j == 0 else (block, k)
            cand = (logits() + mask).topk(kj, dim=-1).indices  # (N, k)
            pick = (_rows(E, cand).float() - U[:, j].unsqueeze(1)).square().sum(-1).argmin(dim=-1)
        else:
            cand = by_cosine[:, j]
            pick = logits(cand).argmax(dim=-1)
        chosen[:, j] = cand.gather(1, pick.unsqueeze(1)).squeeze(1)
        if j + 1 < U.shape[1]:
            logits.append(chosen[:, j])
    return chosen
