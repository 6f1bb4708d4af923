"""The ONE tokenisation rule for a training pair, used by the targets, the solver, the label
check and fine-tuning alike: the prompt (``data.prompt_template`` filled with the text) is
tokenised with the special tokens the tokenizer adds (BOS for most causal LMs; none for
SmolLM2 or Phi-1.5), the completion (the label's verbalizer) without any, and the two id lists
are concatenated. The loss is the mean cross-entropy over the completion tokens only.
"""

from __future__ import annotations

import re

from gradmm_ray.errors import DataError


def format_prompt(template: str, text: str) -> str:
    return template.format(text=text)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Ids of text that starts a sequence: with the special tokens the tokenizer adds."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_continuation(tokenizer, text: str) -> list[int]:
    """Ids of text that continues a sequence (a completion, a template's tail): none added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_generation_prefix(tokenizer, prefix: str, chat: bool | str) -> list[int]:
    """Ids of a label's generation prefix (it conditions the LM during projection only).

    ``chat`` true, or "auto" with a tokenizer that has a chat template: the prefix is an
    instruction in a user turn of that template, followed by the assistant's turn, so an
    instruction-tuned model answers it (SmolLM2-Instruct writes on-topic, on-label sentences;
    given the bare prefix it drifts). Otherwise the prefix is plain text that starts a sequence."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is True and not has_template:
        raise DataError(
            "data.generation_chat: true, but the model's tokenizer has no chat template "
            "(set it to auto or false)"
        )
    if chat is False or (chat == "auto" and not has_template):
        return encode_prompt(tokenizer, prefix)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prefix}], tokenize=False, add_generation_prompt=True
    )
    return encode_continuation(tokenizer, text)  # the template writes its own special tokens


def encode_pair(
    tokenizer,
    prompt: str,
    completion: str,
    *,
    template: str = "{text}",
    max_tokens: int | None = None,
) -> tuple[list[int], int]:
    """Token ids of prompt + completion under the project's rule, and the prompt's length.

    The prompt is ``template.format(text=prompt)``. With ``max_tokens``, a longer pair is cut at
    the end of ``prompt`` (the text), so the template's other parts and the completion stay."""
    completion_ids = encode_continuation(tokenizer, completion)

    def encode(text: str) -> list[int]:
        return encode_prompt(tokenizer, format_prompt(template, text))

    prompt_ids = encode(prompt)
    if max_tokens is None or len(prompt_ids) + len(completion_ids) <= max_tokens:
        return prompt_ids + completion_ids, len(prompt_ids)
    # Keep the text's first tokens, cut at a token boundary of the text alone, then encode the
    # whole prompt again (merges at the cut may differ): shrink until it fits.
    text = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
    keep = len(text["input_ids"])
    while len(prompt_ids) + len(completion_ids) > max_tokens:
        keep -= len(prompt_ids) + len(completion_ids) - max_tokens
        if keep < 1:
            raise DataError(
                f"data.max_tokens: got {max_tokens}, but data.prompt_template and the completion "
                f"{completion!r} leave no room for the text"
            )
        if tokenizer.is_fast:  # the original characters up to the end of token `keep`
            head = prompt[: text["offset_mapping"][keep - 1][1]]
        else:  # slow tokenizers give no offsets
            head = tokenizer.decode(text["input_ids"][:keep])
        prompt_ids = encode(head)
    return prompt_ids + completion_ids, len(prompt_ids)


def check_verbalizers(tokenizer, verbalizers: dict[str, str]) -> dict[str, list[int]]:
    """Completion ids per label; each must be non-empty and distinct from the others."""
    ids = {lab: encode_continuation(tokenizer, c) for lab, c in verbalizers.items()}
    for lab, toks in ids.items():
        if not toks:
            raise DataError(f"data.verbalizers.{lab}: {verbalizers[lab]!r} tokenises to no tokens")
    seen: dict[tuple[int, ...], str] = {}
    for lab, toks in ids.items():
        if tuple(toks) in seen:
            raise DataError(
                f"data.verbalizers: {lab!r} and {seen[tuple(toks)]!r} tokenise to the same ids {toks}"
            )
        seen[tuple(toks)] = lab
    return ids


def normalise_text(text: str) -> str:
    """Lower case, runs of whitespace as one space: the key for de-duplicating texts."""
    return re.sub(r"\s+", " ", text).strip().lower()
