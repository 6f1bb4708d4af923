"""Resolving ``model.name`` to a folder or hub id that ``from_pretrained`` loads.

``tiny`` is built here (``models.tiny``), ``smollm2-135m`` converted once (``models.smollm2``),
an ``s3://`` / ``gs://`` folder copied once, all into the user cache (``GRADMM_CACHE``, else
``$XDG_CACHE_HOME/gradmm_ray``); a local folder or a Hugging Face Hub id is returned as it is.
Every cache entry is built in a temporary folder and renamed into place (``.complete`` marks it
finished), so concurrent actors never see half a model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from gradmm_ray.errors import ModelError


def cache_dir() -> Path:
    base = os.environ.get("GRADMM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gradmm_ray"
    )
    return Path(base)


def announce_cache_build(what: str, dest: Path) -> None:
    """One line on stderr before a cache entry is built: the only slow, silent step of a first
    run that is not a stage (a download, a conversion, the tiny model's training)."""
    print(
        f"gradmm-ray: {what} into {dest} (once; later runs reuse it)", file=sys.stderr, flush=True
    )


def resolve_model_source(name: str) -> str:
    """A local folder or a hub id that ``from_pretrained`` can load; builds/copies as needed."""
    from gradmm_ray.models import smollm2, tiny

    if name == tiny.TINY:
        return str(tiny.ensure_tiny_model())
    if name == smollm2.SMOLLM2:
        return str(smollm2.ensure_smollm2())
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
        announce_cache_build(f"copying the model folder {uri}", dest)
        tmp = Path(tempfile.mkdtemp(dir=ensure_dir(dest.parent)))
        pafs.copy_files(
            path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
    except OSError as e:
        raise ModelError(f"model.name {uri!r}: cannot copy ({str(e).splitlines()[0]})") from None
    (tmp / ".complete").touch()
    atomic_replace_dir(tmp, dest)
    return dest


def ensure_dir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def atomic_replace_dir(tmp: Path, dest: Path) -> None:
    """Rename the finished ``tmp`` to ``dest``; when another process got there first, keep
    theirs and drop ours."""
    try:
        os.replace(tmp, dest)
    except OSError:  # another process won the race: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
