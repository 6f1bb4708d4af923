"""The output directory, local or on object storage (``s3://``, ``gs://``), through pyarrow.fs.

Every file is written under a temporary name and then moved into place, so an interrupted run
never leaves a complete-looking file. ``run.json`` holds the fingerprint of the settings that
determine the results and the identity of the inputs (io/inputs.py); a second run on the
same directory with other settings or changed inputs is refused unless ``--overwrite`` is given.

``--overwrite`` deletes only the files a run writes (OWN_FILES, OWN_PATTERN), never anything
else; a directory holding other files and no run is refused even with it. A run holds
``.gradmm.lock`` (owner, host, pid, start time) for its whole duration, so that two runs never
write the same directory.

One file over ~400 lines on purpose: writing, owning, locking and checking the output
directory are one idea (what a run may do to a directory), and each rule refers to the others.
"""

from __future__ import annotations

import getpass
import io
import json
import os
import re
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gradmm_ray.errors import OutputError

RUN_FILE = "run.json"
LOCK_FILE = ".gradmm.lock"
STALE_LOCK_HOURS = 24  # a lock from another host this old is reported as probably abandoned

# Every name a run writes (pipeline, targets, solve, select, audit, report) and write_bytes'
# temporaries. --overwrite deletes these and nothing else; tests/test_output_safety.py checks
# this list against those modules.
OWN_FILES = frozenset(
    {
        RUN_FILE,
        LOCK_FILE,
        "targets.safetensors",
        "targets.json",
        "synthetic.parquet",
        "audit.parquet",
        "manifest.json",
        "report.md",
        "plots/match_loss.png",
        "plots/admm_curves.png",
        "plots/funnel.png",
        "plots/audit_distances.png",
    }
)
# Temporaries of write_bytes and check_writable's probe, left behind only by a killed process.
LEFTOVER_PATTERN = re.compile(r"((solves|plots)/)?\.(tmp|probe)-[0-9a-f]{32}")
OWN_PATTERN = re.compile(rf"solves/part-[0-9a-f]{{32}}\.parquet|{LEFTOVER_PATTERN.pattern}")
OWN_DIRS = ("solves", "plots")


class OutputWarning(UserWarning):
    """Something about the output directory was repaired (a stale lock, an unreadable part)."""


# Set by Ray's job supervisor in the environment of a `ray job submit` entrypoint.
RAY_SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def check_output_location(uri: str, environ: dict[str, str] | None = None) -> None:
    """A submitted Ray job runs in Ray's temporary copy of its --working-dir, deleted with the
    job: a relative output would vanish with it. OutputError unless the output is a URI or an
    absolute path there; anything goes outside a submitted job."""
    env = os.environ if environ is None else environ
    if RAY_SUBMITTED_JOB_ENV not in env or "://" in uri or os.path.isabs(os.path.expanduser(uri)):
        return
    raise OutputError(
        f"output {uri!r} is relative: under `ray job submit` the job runs in Ray's temporary copy "
        "of --working-dir, deleted with the job; give --output s3://BUCKET/PATH (or gs://), or "
        "an absolute path on storage that outlives the job"
    )


def is_own(rel: str) -> bool:
    """Whether ``rel`` (relative to the output root) is a name that a run writes."""
    return rel in OWN_FILES or OWN_PATTERN.fullmatch(rel) is not None


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

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def tree(self) -> dict[str, bool]:
        """Every path under the root (recursive), relative, -> whether it is a directory."""
        if self.fs.get_file_info(self.root).type != pafs.FileType.Directory:
            return {}
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True))
        return {i.path[len(self.root) + 1 :]: i.type == pafs.FileType.Directory for i in infos}

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def open_file(self, rel: str) -> pa.NativeFile:
        """Random access (``size()``, ``read_at``) without reading the whole file."""
        return self.fs.open_input_file(self.path(rel))

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

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        """The table, or only ``columns`` of it (Parquet reads just those column chunks)."""
        return pq.read_table(self.path(rel), columns=columns, filesystem=self.fs)

    def delete(self, rel: str) -> None:
        self.fs.delete_file(self.path(rel))

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if it does not exist; False when it does. Atomic on a local disk
        (O_EXCL). Object stores offer no write-if-absent through pyarrow.fs: there it is a check,
        a write and a read-back, so two writers within the same second can both win."""
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)
            try:
                fd = os.open(self.path(rel), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.exists(rel):
            return False
        self.write_bytes(rel, data)
        return self.read_bytes(rel) == data


def split_own(out: OutputDir) -> tuple[list[str], list[str]]:
    """(files a run wrote, everything else) under the output root, relative and sorted."""
    own, foreign = [], []
    for rel, is_dir in sorted(out.tree().items()):
        if is_dir and rel in OWN_DIRS:
            continue
        (own if not is_dir and is_own(rel) else foreign).append(rel)
    return own, foreign


def remove_run_files(out: OutputDir) -> None:
    """--overwrite: delete the previous run's files (never the lock, held by this run), then
    its folders if that left them empty; foreign files stay where they are."""
    own, _ = split_own(out)
    for rel in own:
        if rel != LOCK_FILE:
            out.delete(rel)
    for rel in OWN_DIRS:
        if out.fs.get_file_info(out.path(rel)).type == pafs.FileType.Directory and not (
            out.fs.get_file_info(pafs.FileSelector(out.path(rel)))
        ):
            out.fs.delete_dir(out.path(rel))


def check_output_dir(out: OutputDir, fingerprint: dict, *, overwrite: bool) -> str:
    """Decide what to do with the output directory before any work: "new", "resume" or
    "overwrite". Raises OutputError for a directory that another run holds, that holds another
    run, or that holds files of its own (never recommending --overwrite for those)."""
    info = out.fs.get_file_info(out.root)
    if info.type == pafs.FileType.NotFound:
        return "new"
    if info.type != pafs.FileType.Directory:
        raise OutputError(f"output {out.uri!r} exists and is not a directory")
    check_lock(out)
    own, foreign = split_own(out)
    if RUN_FILE not in own:
        if foreign:
            raise OutputError(
                f"output {out.uri!r} is not empty and holds no gradmm-ray run (found {foreign[0]!r}); choose another --output"
            )
        if all(rel == LOCK_FILE or LEFTOVER_PATTERN.fullmatch(rel) for rel in own):
            return "new"  # leftovers of a run killed before it wrote run.json
        if not overwrite:
            raise OutputError(
                f"output {out.uri!r} holds gradmm-ray results but no {RUN_FILE}; choose another --output or pass --overwrite to recompute them"
            )
        return "overwrite"
    if overwrite:
        return "overwrite"
    previous = read_run_file(out).get("fingerprint")
    if previous != fingerprint:
        changed = sorted(_diff_keys(previous or {}, fingerprint))
        shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
        raise OutputError(
            f"output {out.uri!r} holds a run with different settings ({shown}); choose another --output or pass --overwrite"
        )
    return "resume"


def read_run_file(out: OutputDir) -> dict:
    try:
        run = out.read_json(RUN_FILE)
        if not isinstance(run, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise OutputError(
            f"{out.uri}/{RUN_FILE} is unreadable ({_first_line(e)}); choose another --output or pass --overwrite to recompute"
        ) from None
    return run


def check_inputs(out: OutputDir, inputs: dict[str, dict]) -> None:
    """On resume: the data and model must be the ones the run started with. A run.json from
    before inputs were recorded is accepted (run() records them now)."""
    previous = read_run_file(out).get("inputs")
    if previous is None:
        return
    for what in ("data", "model"):
        change = describe_change(what, previous.get(what, {}), inputs[what])
        if change:
            raise OutputError(
                f"output {out.uri!r}: {change} since this run started; choose another --output or pass --overwrite to recompute"
            )


def check_writable(out: OutputDir) -> None:
    """Write and delete a small file, so that permissions, read-only mounts, a file in the path
    or a bucket policy stop the run before any work. Folders the probe had to create are
    removed again: a run refused later leaves nothing behind."""
    created = []
    if out.is_local:
        path = out.root
        while not os.path.exists(path):
            created.append(path)
            path = os.path.dirname(path)
    probe = out.path(f".probe-{uuid.uuid4().hex}")
    try:
        if out.is_local:  # object stores have no folders to create
            out.fs.create_dir(out.root, recursive=True)
        with out.fs.open_output_stream(probe) as f:
            f.write(b"gradmm-ray write probe")
        out.fs.delete_file(probe)
    except (OSError, pa.ArrowException) as e:
        raise OutputError(
            f"output {out.uri!r} is not writable ({_first_line(e)}); choose another --output"
        ) from None
    finally:
        for path in created:  # deepest first
            try:
                os.rmdir(path)
            except OSError:
                break


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# ---------------------------------------------------------------------------------------------
# The lock


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def lock_state(
    holder: dict | None, *, host: str, now: float, alive: Callable[[int], bool] = pid_alive
) -> str:
    """held | stale (same host, dead pid: take it over) | abandoned (another host, older than
    STALE_LOCK_HOURS) | unreadable. A recycled pid reads as held: safe, if rarely too careful."""
    try:
        same_host = holder["host"] == host
        pid, started = int(holder["pid"]), datetime.fromisoformat(holder["started"]).timestamp()
    except (TypeError, KeyError, ValueError):
        return "unreadable"
    if same_host:
        return "held" if alive(pid) else "stale"
    return "abandoned" if now - started > STALE_LOCK_HOURS * 3600 else "held"


def _read_lock(out: OutputDir) -> dict | None:
    try:
        return out.read_json(LOCK_FILE)
    except (OSError, ValueError):
        return None


def _holder(h: dict) -> str:
    return f"{h.get('owner')}@{h.get('host')}, pid {h.get('pid')}, started {h.get('started')}"


def check_lock(out: OutputDir) -> None:
    """Raises OutputError when another run holds the output's lock (a stale one is fine)."""
    if out.exists(LOCK_FILE):
        _judge_lock(out, _read_lock(out))


def _judge_lock(out: OutputDir, holder: dict | None) -> None:
    state = lock_state(holder, host=socket.gethostname(), now=time.time())
    where = f"{out.uri}/{LOCK_FILE}"
    if state == "held":
        raise OutputError(
            f"output {out.uri!r} is in use by another run ({_holder(holder)}); wait for it to finish or choose another --output"
        )
    if state == "abandoned":
        raise OutputError(
            f"output {out.uri!r} is locked by a run on another host ({_holder(holder)}, over {STALE_LOCK_HOURS} h ago); if it is no longer running, delete {where}"
        )
    if state == "unreadable":
        raise OutputError(
            f"output {out.uri!r} has an unreadable lock {LOCK_FILE}; if no run is using this output, delete {where}"
        )


@contextmanager
def output_lock(out: OutputDir) -> Iterator[None]:
    """Hold OUTPUT/.gradmm.lock for the block; a stale one (same host, dead pid) is taken over
    with a warning. Raises OutputError when another live run holds it."""
    me = {
        "owner": getpass.getuser(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "token": uuid.uuid4().hex,
    }
    data = (json.dumps(me, indent=2) + "\n").encode()
    while not out.create_exclusive(LOCK_FILE, data):
        stale = _read_lock(out)
        if stale is None and not out.exists(LOCK_FILE):
            continue  # released in the meantime
        _judge_lock(out, stale)  # raises unless stale
        warnings.warn(
            f"output {out.uri!r}: taking over the lock of a run that is no longer running ({_holder(stale)})",
            OutputWarning,
            stacklevel=3,
        )
        # Delete only the lock judged stale: narrows (not closes) the window in which two
        # runs taking over the same stale lock could both succeed.
        if _read_lock(out) == stale:
            out.delete(LOCK_FILE)
    try:
        yield
    finally:
        if (_read_lock(out) or {}).get("token") == me["token"]:
            out.delete(LOCK_FILE)


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in set(a) | set(b):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


_FIELDS = {"size": "size", "sha256": "content", "mtime_ns": "mtime"}


def describe_change(what: str, old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """One phrase naming the first difference between two input identities (io/inputs.py),
    or None when equal."""
    if old == new:
        return None
    old_files, new_files = old.get("files", {}), new.get("files", {})
    for name in sorted(set(old_files) | set(new_files)):
        a, b = old_files.get(name), new_files.get(name)
        if a == b:
            continue
        if a is None:
            return f"{what} file {name!r} was added"
        if b is None or b.get("missing"):
            return f"{what} file {name!r} is gone"
        fields = [_FIELDS.get(k, k) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        return f"{what} file {name!r} changed ({'/'.join(fields)})"
    keys = sorted(k for k in set(old) | set(new) if k != "files" and old.get(k) != new.get(k))
    return f"{what} changed ({', '.join(f'{k} {old.get(k)!r} -> {new.get(k)!r}' for k in keys)})"
