"""The tiny offline model: a 2-layer Llama-style LM with a BPE tokenizer trained on the bundled
reviews, briefly pre-trained on a public, generated review corpus so that its top-k choices read
like (simple) English. Deterministic for a given machine and torch build; built once into the
cache (``tiny-v{TINY_RECIPE_VERSION}``) the first time ``model.name: tiny`` is resolved.

The tokenizer's BPE is trained on the bundled sample data (public, shipped with the package),
found through ``gradmm_ray.sample_data`` (file locations only, not the real-data reader).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import tempfile
from pathlib import Path

import torch

from gradmm_ray.models.sources import (
    announce_cache_build,
    atomic_replace_dir,
    cache_dir,
    ensure_dir,
)

TINY = "tiny"
TINY_RECIPE_VERSION = "4"  # bump when the recipe below changes: a new cache entry is built
TINY_EMBEDDING_NORM = 1.4

_SUBJECTS = [
    "the acting",
    "the script",
    "the plot",
    "the score",
    "the ending",
    "the cast",
    "the pacing",
    "the dialogue",
    "the camera work",
    "this film",
    "this movie",
    "the story",
    "the lead",
    "the humor",
    "the editing",
    "the music",
    "the effects",
    "the sequel",
    "the finale",
    "the characters",
]
_POSITIVE = [
    "wonderful",
    "brilliant",
    "moving",
    "delightful",
    "superb",
    "charming",
    "gripping",
    "beautiful",
    "clever",
    "funny",
    "warm",
    "stunning",
    "fresh",
    "tender",
    "sharp",
    "great",
]
_NEGATIVE = [
    "dull",
    "awful",
    "boring",
    "clumsy",
    "tedious",
    "weak",
    "messy",
    "lifeless",
    "silly",
    "flat",
    "bland",
    "painful",
    "stale",
    "cheap",
    "lazy",
    "bad",
]
_ADVERBS = ["truly", "really", "simply", "quite", "utterly", "very", "so", "rather"]
_NOUNS = [
    "film",
    "movie",
    "story",
    "ride",
    "mess",
    "picture",
    "debut",
    "comedy",
    "drama",
    "thriller",
]
_SHAPES = [
    "{s} was {a} {j}.",
    "{s} is {j} and {j2}.",
    "i found {s} {a} {j}.",
    "what a {j} {n}.",
    "{s} felt {j}, and {s2} was {j2}.",
    "a {j} {n} with {j2} moments.",
    "{s} is {a} {j} from start to finish.",
    "overall a {a} {j} {n}.",
]


def tiny_corpus(n: int = 3000, seed: int = 0) -> list[tuple[str, str]]:
    """(sentence, sentiment) pairs from a small grammar: public text, not the real data."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = _POSITIVE if label == "positive" else _NEGATIVE
        s, s2 = rng.sample(_SUBJECTS, 2)
        j, j2 = rng.sample(words, 2)
        text = rng.choice(_SHAPES).format(
            s=s, s2=s2, a=rng.choice(_ADVERBS), j=j, j2=j2, n=rng.choice(_NOUNS)
        )
        out.append((text[0].upper() + text[1:], label))
    return out


def _tiny_training_lines() -> list[str]:
    # The default template and verbalizers, and the generation prefix, on public sentences.
    verbal = {"positive": " great", "negative": " bad"}
    lines = []
    for text, label in tiny_corpus():
        lines.append(f"{text} It was{verbal[label]}")
        lines.append(f"A {label} movie review: {text}")
    return lines


def ensure_tiny_model() -> Path:
    """Build the tiny model once into the cache (atomically) and return its folder."""
    dest = cache_dir() / f"tiny-v{TINY_RECIPE_VERSION}"
    if (dest / ".complete").exists():
        return dest
    announce_cache_build("training the tiny test model (~15 s on 2 CPU cores)", dest)
    tmp = Path(tempfile.mkdtemp(dir=ensure_dir(dest.parent), prefix=".tiny-"))
    build_tiny_model(tmp)
    (tmp / ".complete").touch()
    atomic_replace_dir(tmp, dest)
    return dest


def build_tiny_model(dest: Path, *, vocab_size: int = 1024, pretrain_steps: int = 300) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from gradmm_ray.sample_data import SAMPLE_SPLITS, sample_data_path

    texts = []
    for split in SAMPLE_SPLITS:
        with open(sample_data_path(split)) as f:
            texts += [json.loads(line)["text"] for line in f if line.strip()]
    lines = _tiny_training_lines()

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts + lines, trainer=trainer)
    from tokenizers import processors

    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tok.save_pretrained(dest)

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with _seeded(0):
        model = LlamaForCausalLM(config)
        # Token embeddings at a real LM's scale (norm ~1.4, as Phi-1.5), not the init's 0.16:
        # the reference ADMM settings (Adam lr 0.008 on these vectors) assume it.
        model.get_input_embeddings().weight.data.normal_(
            0.0, TINY_EMBEDDING_NORM / math.sqrt(config.hidden_size)
        )
        _pretrain(model, tok, lines, steps=pretrain_steps)
    model.save_pretrained(dest)


@contextlib.contextmanager
def _seeded(seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _pretrain(
    model, tok, lines: list[str], *, steps: int, batch: int = 32, lr: float = 3e-3
) -> None:
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    for _ in range(steps):
        enc = tok(rng.sample(lines, batch), padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    model.eval()
