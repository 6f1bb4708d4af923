"""What a run read: the identity of its data and model, recorded in run.json beside the config.

A resumed run must read the same inputs as the run that started the output directory, or its
solves would match targets released from other data (or another model).

Data files are identified by their path and modification time ONLY. Their size or a hash of
their content would let anyone who sees run.json and knows all rows but one tell whether that
row is in the data (the file's size or hash differs with and without it): the very thing the
DP release protects. Any rewrite of a file (or object) updates its modification time.
Model files are public: each is identified by its size and a SHA-256 of its first and last MiB
(the whole file when at most 2 MiB; for larger ones the modification time stands in for the
unhashed middle). A hub dataset is named by id and split only; a hub model by its resolved
commit.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from gradmm_ray.config import DataConfig, ModelConfig
from gradmm_ray.io.real_data import FILE_FORMATS, looks_like_path
from gradmm_ray.sample_data import sample_data_path

EDGE_BYTES = 1 << 20  # hashed from each end of a file
_LOCAL = pafs.LocalFileSystem()


def file_identity(fs: pafs.FileSystem, path: str, *, content: bool) -> dict[str, Any]:
    """One file: its mtime only (``content`` False: private data), or its size and edge hash
    (plus mtime when its middle is not hashed)."""
    try:
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            return {"missing": True}
        if not content:
            return {"mtime_ns": info.mtime_ns}
        h = hashlib.sha256()
        with fs.open_input_file(path) as f:
            size = f.size()
            if size <= 2 * EDGE_BYTES:
                h.update(f.read())
            else:
                h.update(f.read_at(EDGE_BYTES, 0))
                h.update(f.read_at(EDGE_BYTES, size - EDGE_BYTES))
    except (OSError, pa.ArrowException):
        return {"missing": True}
    ident: dict[str, Any] = {"size": size, "sha256": h.hexdigest()}
    if size > 2 * EDGE_BYTES:
        ident["mtime_ns"] = info.mtime_ns
    return ident


def _folder_files(fs: pafs.FileSystem, root: str, suffixes: tuple[str, ...] | None) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and not i.base_name.startswith(".")
        and (suffixes is None or Path(i.path).suffix.lower() in suffixes)
    )


def data_identity(cfg: DataConfig) -> dict[str, Any]:
    """Never raises for a bad source: reading the data reports that with a better message."""
    if cfg.source == "sample":
        path = str(sample_data_path(cfg.split))
        return {
            "sample": cfg.split,
            "files": {Path(path).name: file_identity(_LOCAL, path, content=False)},
        }
    if not looks_like_path(cfg.source):
        return {"hub": cfg.source, "split": cfg.split}
    try:
        if "://" in cfg.source:
            fs, root = pafs.FileSystem.from_uri(cfg.source)
        else:
            fs, root = _LOCAL, os.path.abspath(os.path.expanduser(cfg.source))
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            return {
                "source": cfg.source,
                "files": {cfg.source: file_identity(fs, root, content=False)},
            }
        # A save_to_disk folder is read whole; a plain folder only through its data files.
        hf = fs.get_file_info(f"{root}/dataset_info.json").type == pafs.FileType.File or (
            fs.get_file_info(f"{root}/dataset_dict.json").type == pafs.FileType.File
        )
        paths = _folder_files(fs, root, None if hf else tuple(FILE_FORMATS))
    except (OSError, pa.ArrowException):
        return {"source": cfg.source, "files": {cfg.source: {"missing": True}}}
    shown = {p: cfg.source.rstrip("/") + p[len(root) :] for p in paths}
    return {
        "source": cfg.source,
        "split": cfg.split,
        "files": {shown[p]: file_identity(fs, p, content=False) for p in paths},
    }


def model_identity(cfg: ModelConfig, source: str) -> dict[str, Any]:
    """``source`` is what resolve_model_source returned: a local folder (tiny, a local model, or
    the cached copy of an s3:// / gs:// folder) or a hub id."""
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if not n.startswith("."))
        files = {
            n: file_identity(_LOCAL, os.path.join(source, n), content=True)
            for n in names
            if os.path.isfile(os.path.join(source, n))
        }
        return {"name": cfg.name, "files": files}
    return {"name": cfg.name, "revision": cfg.revision, "commit": _hub_commit(cfg)}


def _hub_commit(cfg: ModelConfig) -> str | None:
    """The commit the hub (or its local cache) resolved ``model.revision`` to."""
    from transformers import AutoConfig

    try:
        conf = AutoConfig.from_pretrained(
            cfg.name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except OSError:
        return None
    return getattr(conf, "_commit_hash", None)
