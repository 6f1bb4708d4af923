"""Causal LMs: load model + tokenizer, reach the LM head and the completion states.

``model.name`` (``tiny``, ``smollm2-135m``, a local or ``s3://`` / ``gs://`` folder, a Hugging
Face Hub id) is first resolved to a folder or hub id by ``gradmm_ray.models.sources``, which
builds or copies model files into the cache; everything then goes through the same
``from_pretrained`` code path here.

"Last layer" is the LM head: weight W (V x d) and bias b when it has one. With tied input/output
embeddings the head's use of the shared matrix is what is matched: its gradient is taken through
the head alone, never through the input embedding lookup.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gradmm_ray.config import ModelConfig
from gradmm_ray.errors import ModelError

DEFAULT_MAX_TOKENS = 512  # data.max_tokens: null (see DataConfig for why 512)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


@dataclass
class CausalLM:
    """A loaded model with the pieces GRADMM needs. Frozen: no parameter requires grad."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    revision: str | None
    device: torch.device
    dtype: torch.dtype

    @property
    def head(self) -> torch.nn.Linear:
        return self.model.get_output_embeddings()

    @property
    def input_embeddings(self) -> Tensor:
        return self.model.get_input_embeddings().weight  # (V, d)

    @property
    def has_head_bias(self) -> bool:
        return self.head.bias is not None

    @property
    def vocab_size(self) -> int:
        return self.head.weight.shape[0]

    def head_params_fp32(self) -> tuple[Tensor, Tensor | None]:
        """(W, b) of the head in fp32 on the model's device: the matched parameters."""
        w = self.head.weight.detach().float()
        b = self.head.bias.detach().float() if self.has_head_bias else None
        return w, b

    def hidden_states(
        self,
        *,
        attention_mask: Tensor,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """The hidden states fed to the LM head, (N, L, d): the base model's last hidden state
        (it includes the final norm in every Hugging Face causal LM)."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model.base_model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return out.last_hidden_state

    def completion_states(
        self, pairs: list[tuple[list[int], int]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Head inputs at the loss positions of token pairs (ids, prompt length).

        Returns A (N, T, d) in fp32, the completion targets (N, T) and a mask (N, T), T the longest
        completion; position t of a completion is predicted from hidden state n_prompt - 1 + t."""
        ids, attention, positions, targets, mask = pad_pairs(pairs, self.tokenizer.pad_token_id)
        # No position reads the last column's state (a completion's last token predicts nothing),
        # and causal states never depend on later columns: leave it out of the forward pass.
        hidden = self.hidden_states(
            input_ids=ids[:, :-1].to(self.device), attention_mask=attention[:, :-1].to(self.device)
        )
        positions = positions.to(self.device)
        A = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (N, T, d)
        mask = mask.to(self.device)
        return A.float() * mask.unsqueeze(-1), targets.to(self.device), mask

    def token_limit(self, max_tokens: int | None) -> int:
        """``data.max_tokens`` for this model: null = its max positions, at most
        DEFAULT_MAX_TOKENS; any value at most its max positions (learned position tables end
        there)."""
        conf = self.model.config
        positions = getattr(conf, "max_position_embeddings", None) or getattr(
            conf, "n_positions", None
        )
        limit = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        return min(limit, positions) if positions else limit

    def logits_tail(self) -> Callable[[Tensor], Tensor] | None:
        """What the model does to ``head(h)`` before the loss, or None when nothing."""
        return logits_tail_for(self.model.config)


def pad_pairs(pairs: list[tuple[list[int], int]], pad_id: int) -> tuple[Tensor, ...]:
    """Right-padded ids and attention (N, L); loss positions, targets and mask (N, T)."""
    n = len(pairs)
    length = max(len(ids) for ids, _ in pairs)
    T = max(len(ids) - n_prompt for ids, n_prompt in pairs)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    positions = torch.zeros((n, T), dtype=torch.long)
    targets = torch.full((n, T), -100, dtype=torch.long)
    mask = torch.zeros((n, T), dtype=torch.bool)
    for i, (ids, n_prompt) in enumerate(pairs):
        t = len(ids) - n_prompt
        if n_prompt < 1 or t < 1:
            raise AssertionError(
                f"Internal error: pair {i} has prompt length {n_prompt}, completion length {t}"
            )
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        positions[i, :t] = torch.arange(n_prompt - 1, len(ids) - 1)
        targets[i, :t] = torch.tensor(ids[n_prompt:])
        mask[i, :t] = True
    return input_ids, attention, positions, targets, mask


def logits_tail_for(config) -> Callable[[Tensor], Tensor] | None:
    # Known post-processing of raw head outputs in Hugging Face causal LMs.
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)  # Cohere: logits * scale
    divide = getattr(config, "logits_scaling", None)  # Granite: logits / scaling
    steps: list[Callable[[Tensor], Tensor]] = []
    if scale not in (None, 1, 1.0):
        steps.append(lambda z: z * scale)
    if divide not in (None, 1, 1.0):
        steps.append(lambda z: z / divide)
    if cap:
        steps.append(lambda z: torch.tanh(z / cap) * cap)
    if not steps:
        return None

    def tail(z: Tensor) -> Tensor:
        for step in steps:
            z = step(z)
        return z

    return tail


def load_tokenizer(source: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        source, revision=revision, trust_remote_code=trust_remote_code
    )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_causal_lm(
    name: str,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    progress: bool = True,
) -> CausalLM:
    """``progress=False``: no download or weight-loading bars (stage actors: one bar per actor
    would interleave with the driver's stage bars)."""
    from transformers import AutoModelForCausalLM

    from gradmm_ray.models.sources import resolve_model_source

    source = resolve_model_source(name)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    try:
        with contextlib.nullcontext() if progress else _hf_progress_bars_off():
            tokenizer = load_tokenizer(source, revision, trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                source, revision=revision, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
    except OSError as e:
        raise ModelError(f"model.name {name!r}: cannot load ({str(e).splitlines()[0]})") from None
    model.to(dev).eval().requires_grad_(False)
    if model.get_output_embeddings() is None:
        raise ModelError(
            f"model.name {name!r}: the model has no LM head (get_output_embeddings() is None)"
        )
    return CausalLM(model, tokenizer, name, _revision_of(model, revision), dev, torch_dtype)


def load_model(cfg: ModelConfig, *, progress: bool = True) -> CausalLM:
    """``load_causal_lm`` with every setting of the ``model`` config section."""
    return load_causal_lm(
        cfg.name,
        revision=cfg.revision,
        dtype=cfg.dtype,
        device=cfg.device,
        trust_remote_code=cfg.trust_remote_code,
        progress=progress,
    )


@contextlib.contextmanager
def _hf_progress_bars_off():
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' bars and huggingface_hub's downloads
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _revision_of(model, revision: str | None) -> str | None:
    return revision or getattr(model.config, "_commit_hash", None)
