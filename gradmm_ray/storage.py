"""The output directory, local or on object storage (``s3://``, ``gs://``), through pyarrow.fs.

Every file is written under a temporary name and then moved into place, so an interrupted run
never leaves a complete-looking file. ``run.json`` holds the fingerprint of the settings that
determine the results; a second run on the same directory with other settings is refused unless
``--overwrite`` is given.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

RUN_FILE = "run.json"


class OutputError(ValueError):
    """A user-facing problem with the output directory."""


class OutputDir:
    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        else:
            self.fs, self.root = (
                pafs.LocalFileSystem(),
                os.path.abspath(os.path.expanduser(self.uri)),
            )

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def display(self, rel: str = "") -> str:
        return f"{self.uri}/{rel}" if rel else self.uri

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_empty(self) -> bool:
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.NotFound:
            return True
        if info.type != pafs.FileType.Directory:
            raise OutputError(f"output {self.uri!r} exists and is not a directory")
        return not self.fs.get_file_info(pafs.FileSelector(self.root))

    def list(self, rel: str, suffix: str = "") -> list[str]:
        """Relative paths of the files directly in ``rel`` ending with ``suffix``, sorted."""
        base = self.path(rel)
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base))
        names = [
            i.base_name
            for i in infos
            if i.type == pafs.FileType.File
            and i.base_name.endswith(suffix)
            and not i.base_name.startswith(".")
        ]
        return sorted(f"{rel}/{n}" for n in names)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic: a hidden temporary beside the target, then a move."""
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self._commit(tmp, target)

    def _commit(self, tmp: str, target: str) -> None:
        self.fs.move(tmp, target)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_text(rel, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")

    def write_parquet(self, rel: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(rel, buf.getvalue())

    def read_parquet(self, rel: str) -> pa.Table:
        return pq.read_table(self.path(rel), filesystem=self.fs)

    def clear(self) -> None:
        if self.fs.get_file_info(self.root).type == pafs.FileType.Directory:
            self.fs.delete_dir_contents(self.root)

    def remove(self, rel: str) -> None:
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))


def check_output_dir(out: OutputDir, fingerprint: dict, *, overwrite: bool) -> str:
    """Decide what to do with the output directory before any work: "new", "resume" or
    "overwrite". Raises OutputError for a directory that holds another run (or other files)."""
    if out.is_empty():
        return "new"
    if overwrite:
        return "overwrite"
    if not out.exists(RUN_FILE):
        raise OutputError(
            f"output {out.uri!r} is not empty and holds no gradmm-ray run; choose another --output or pass --overwrite"
        )
    previous = out.read_json(RUN_FILE).get("fingerprint")
    if previous != fingerprint:
        changed = sorted(_diff_keys(previous or {}, fingerprint))
        shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
        raise OutputError(
            f"output {out.uri!r} holds a run with different settings ({shown}); choose another --output or pass --overwrite"
        )
    return "resume"


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in set(a) | set(b):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys
