"""Presets shipped inside the package (package data, so an installed wheel has them too):

  demo.yaml              the distill demo's settings, spelled out (the defaults: SmolLM2-135M
                         on a CPU)
  paper_sst2.yaml        GRADMM as in the paper: Phi-1.5 on SST-2, on a GPU cluster
  tiny.yaml              the project's 2-layer model: the fastest settings, for tests
  deepspeed_zero2.json   DeepSpeed ZeRO-2 for finetune (``workers.deepspeed_config: zero2``)
  deepspeed_zero3.json   DeepSpeed ZeRO-3 (parameters partitioned too)

``--config`` of both CLIs takes a preset's name (``--config paper_sst2``) or a path; they are
found with importlib.resources, never through the project's folders.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from gradmm_ray.errors import ConfigError

DEEPSPEED_PRESETS = {"zero2": "deepspeed_zero2.json", "zero3": "deepspeed_zero3.json"}


def preset_names() -> list[str]:
    """The job config presets (YAML files shipped in the package), without their suffix."""
    return sorted(
        p.name.removesuffix(".yaml")
        for p in resources.files(__name__).iterdir()
        if p.name.endswith(".yaml")
    )


def preset_path(filename: str) -> Path:
    """The shipped file ``filename`` (a real file: the package is installed unzipped)."""
    path = Path(str(resources.files(__name__).joinpath(filename)))
    if not path.is_file():
        raise AssertionError(f"Internal error: preset {filename!r} is missing from {path.parent}")
    return path


def resolve_config_path(name_or_path: str) -> Path:
    """``--config``: an existing file, else the name of a preset (``paper_sst2``, with or
    without ``.yaml``). A name that is neither is refused with the presets listed."""
    path = Path(os.path.expanduser(name_or_path))
    if path.is_file():
        return path
    stem = name_or_path.removesuffix(".yaml")
    if os.sep not in name_or_path and stem in preset_names():
        return preset_path(f"{stem}.yaml")
    raise ConfigError(
        f"config file {str(path)!r} does not exist, and {name_or_path!r} is not a preset "
        f"(presets: {', '.join(preset_names())})"
    )


def deepspeed_config_path(setting: str) -> Path:
    """``workers.deepspeed_config``: ``zero2`` / ``zero3`` (the shipped JSON) or a file path."""
    if setting in DEEPSPEED_PRESETS:
        return preset_path(DEEPSPEED_PRESETS[setting])
    return Path(os.path.expanduser(setting))
