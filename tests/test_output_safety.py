"""The output directory survives misuse: --overwrite deletes only a run's own files, resumed runs
check their inputs, one run at a time holds a lock, damaged files are named (or repaired), and an
unwritable --output is refused before any work. No Ray: everything here runs in seconds."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

from gradmm_ray.config import build_config
from gradmm_ray.distill import pipeline, report
from gradmm_ray.distill.audit import AUDIT_FILE
from gradmm_ray.distill.output import SYNTHETIC_FILE
from gradmm_ray.distributed.solve import SOLVES_DIR, finished_keys, read_solves
from gradmm_ray.distributed.targets import TARGETS_FILE, TARGETS_RECORD, read_targets, write_targets
from gradmm_ray.errors import OutputError
from gradmm_ray.io.inputs import data_identity, file_identity
from gradmm_ray.io.storage import (
    LOCK_FILE,
    RUN_FILE,
    STALE_LOCK_HOURS,
    OutputDir,
    OutputWarning,
    check_output_dir,
    describe_change,
    is_own,
    lock_state,
    output_lock,
    remove_run_files,
)
from gradmm_ray.models.sources import resolve_model_source
from tests.test_cli_errors import fails, good_rows, snapshot, write_jsonl

PART = "solves/part-" + "a" * 32 + ".parquet"
TMP = ".tmp-" + "b" * 32


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped) on this host."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def touch(folder: Path, *rels: str) -> None:
    for rel in rels:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(rel)


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Which files are a run's own


def test_own_names_match_the_modules_that_write_them():
    """Every file name the pipeline writes is recognised as its own (a new output file that is
    not added to storage.OWN_FILES would survive --overwrite and block the next run)."""
    names = [RUN_FILE, LOCK_FILE, TARGETS_FILE, TARGETS_RECORD, SYNTHETIC_FILE, AUDIT_FILE]
    names += [report.MANIFEST_FILE, report.REPORT_FILE, PART, TMP, f"{SOLVES_DIR}/{TMP}"]
    names += re.findall(r'"(plots/[\w.-]+\.png)"', Path(report.__file__).read_text())
    assert len(names) > 12  # the plots were found
    for name in names:
        assert is_own(name), name
    for foreign in [
        "notes.txt",
        "solves/mine.parquet",
        "plots/mine.png",
        "sub/run.json",
        "x.tmp-1",
    ]:
        assert not is_own(foreign), foreign


def test_overwrite_removes_only_the_runs_files(tmp_path, capsys):
    """A directory with a run and foreign files: --overwrite is accepted and removes exactly the
    run's files (foreign ones stay, with their folders); the message path never deletes."""
    root = tmp_path / "out"
    own = [RUN_FILE, TARGETS_FILE, TARGETS_RECORD, PART, "plots/funnel.png", "report.md", TMP]
    foreign = ["notes.txt", "solves/mine.parquet", "plots/mine.png", "sub/run.json"]
    touch(root, *own, *foreign)
    out = OutputDir(str(root))
    assert check_output_dir(out, {}, overwrite=True) == "overwrite"
    remove_run_files(out)
    assert files_under(root) == set(foreign)


def test_overwrite_removes_empty_run_folders(tmp_path):
    root = tmp_path / "out"
    touch(root, RUN_FILE, PART, "plots/funnel.png", "mine.txt")
    remove_run_files(OutputDir(str(root)))
    assert sorted(p.name for p in root.iterdir()) == ["mine.txt"]


@pytest.mark.parametrize(
    ("files", "overwrite", "expected"),
    [
        ([], False, "new"),
        (
            [TMP, LOCK_FILE, ".probe-" + "c" * 32],
            False,
            "new",
        ),  # a run killed before it wrote run.json
        ([TARGETS_FILE], True, "overwrite"),
        ([RUN_FILE, "notes.txt"], True, "overwrite"),
        (["notes.txt"], False, "holds no gradmm-ray run"),
        (["notes.txt"], True, "holds no gradmm-ray run"),
        ([TARGETS_FILE, "notes.txt"], True, "holds no gradmm-ray run"),
        ([TARGETS_FILE], False, "pass --overwrite to recompute"),
    ],
)
def test_check_output_dir_cases(tmp_path, dead_pid, files, overwrite, expected):
    """Mode decisions; directories with foreign files and no run are refused, never with advice
    to pass --overwrite. The lock here is a dead process's (stale)."""
    root = tmp_path / "out"
    root.mkdir()
    for rel in files:
        text = json.dumps(_holder(pid=dead_pid)) if rel == LOCK_FILE else rel
        (root / rel).write_text(text)
    out = OutputDir(str(root))
    if expected in ("new", "overwrite"):
        assert check_output_dir(out, {}, overwrite=overwrite) == expected
        return
    with pytest.raises(OutputError, match=re.escape(expected)) as e:
        check_output_dir(out, {}, overwrite=overwrite)
    if "no gradmm-ray run" in expected:
        assert "--overwrite" not in str(e.value) and "choose another --output" in str(e.value)


def test_corrupt_run_file(tmp_path, capsys):
    """A truncated run.json is named on one line; --overwrite is accepted (the file is ours)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / RUN_FILE).write_text('{"fingerprint": {"seed": ')
    fails(capsys, ["--output", str(out)], f"{out}/{RUN_FILE} is unreadable", "--overwrite")
    assert check_output_dir(OutputDir(str(out)), {}, overwrite=True) == "overwrite"


# ---------------------------------------------------------------------------------------------
# Inputs recorded in run.json


def _started_run(tmp_path: Path, data: str, model: str = "tiny") -> tuple[Path, list[str]]:
    """An output directory as pipeline.run leaves it after its first write (run.json only)."""
    out = tmp_path / "out"
    cfg = build_config({"data": {"source": data}, "model": {"name": model}, "output": str(out)})
    prep = pipeline.prepare(cfg, overwrite=False)
    assert prep.mode == "new" and set(prep.inputs) == {"data", "model"}
    OutputDir(str(out)).write_json(
        RUN_FILE, {"fingerprint": cfg.fingerprint_dict(), "inputs": prep.inputs}
    )
    return out, ["--data", data, "--model", model, "--output", str(out)]


def test_unchanged_inputs_resume(tmp_path):
    out, _ = _started_run(tmp_path, write_jsonl(tmp_path / "d.jsonl", good_rows()))
    cfg = build_config(
        {
            "data": {"source": str(tmp_path / "d.jsonl")},
            "model": {"name": "tiny"},
            "output": str(out),
        }
    )
    assert pipeline.prepare(cfg, overwrite=False).mode == "resume"


def test_changed_data_file_is_refused(tmp_path, capsys):
    """A data file edited after the run started is named, with what changed, on one line; the
    output is left as it was."""
    data = write_jsonl(tmp_path / "d.jsonl", good_rows())
    out, argv = _started_run(tmp_path, data)
    before = snapshot(out)
    mtime = os.stat(data).st_mtime_ns
    write_jsonl(tmp_path / "d.jsonl", good_rows(6))
    os.utime(data, ns=(mtime + 10**9, mtime + 10**9))  # an edit a second later, whatever the clock
    fails(capsys, argv, f"data file {data!r} changed (mtime)", "pass --overwrite")
    assert snapshot(out) == before


def test_data_identity_reveals_nothing_about_the_content(tmp_path):
    """run.json identifies private data files by mtime only: no size, no hash. With a size or a
    hash, anyone knowing all rows but one could tell from run.json whether that row is there."""
    rows = good_rows()
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    b = write_jsonl(tmp_path / "b.jsonl", rows[:-1])  # one row fewer
    mtime = os.stat(a).st_mtime_ns
    os.utime(b, ns=(mtime, mtime))
    ident = {
        p: data_identity(build_config({"data": {"source": p}}).data)["files"][p] for p in (a, b)
    }
    assert ident[a] == ident[b] == {"mtime_ns": mtime}


def test_changed_file_in_data_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", good_rows())
    out, argv = _started_run(tmp_path, str(folder))
    write_jsonl(folder / "b.jsonl", good_rows())
    fails(capsys, argv, f"data file '{folder}/b.jsonl' was added")


def test_changed_model_is_refused(tmp_path, capsys):
    """A local model folder whose config changed after the run started is named."""
    model = tmp_path / "model"
    shutil.copytree(resolve_model_source("tiny"), model)
    out, argv = _started_run(tmp_path, "sample", str(model))
    conf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**conf, "rope_theta": 1234.0}))
    fails(capsys, argv, "model file 'config.json' changed", "since this run started")


def test_model_file_identity_hashes_both_ends_of_large_files(tmp_path):
    """Model files (public): a change near either end of a large file shows in the hash; one in
    its unhashed middle shows in the recorded modification time."""
    import pyarrow.fs as pafs

    fs, path = pafs.LocalFileSystem(), str(tmp_path / "big.bin")
    data = bytearray(os.urandom(3 << 20))
    Path(path).write_bytes(data)
    first = file_identity(fs, path, content=True)
    assert set(first) == {"size", "sha256", "mtime_ns"}
    for offset in (10, len(data) - 10):
        changed = bytearray(data)
        changed[offset] ^= 1
        Path(path).write_bytes(changed)
        os.utime(path, ns=(first["mtime_ns"], first["mtime_ns"]))
        assert file_identity(fs, path, content=True)["sha256"] != first["sha256"]
    Path(path).write_bytes(data)
    os.utime(path, ns=(first["mtime_ns"] + 10**9, first["mtime_ns"] + 10**9))
    assert describe_change(
        "model", {"files": {"f": first}}, {"files": {"f": file_identity(fs, path, content=True)}}
    ) == ("model file 'f' changed (mtime)")


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ({"hub": "a/b", "split": "train"}, {"hub": "a/b", "split": "train"}, None),
        ({"hub": "a/b", "split": "train"}, {"hub": "a/b", "split": "test"}, "data changed (split 'train' -> 'test')"),
        ({"files": {"f": {"size": 1}}}, {"files": {"f": {"missing": True}}}, "data file 'f' is gone"),
        ({"files": {"f": {"size": 1, "sha256": "x"}}}, {"files": {"f": {"size": 2, "sha256": "y"}}}, "data file 'f' changed (content/size)"),
    ],
)  # fmt: skip
def test_describe_change(old, new, expected):
    assert describe_change("data", old, new) == expected


def test_hub_data_identity_is_id_and_split():
    cfg = build_config({"data": {"source": "someone/dataset", "split": "test"}}).data
    assert data_identity(cfg) == {"hub": "someone/dataset", "split": "test"}


# ---------------------------------------------------------------------------------------------
# The lock


def _holder(*, host: str | None = None, pid: int | None = None, hours_ago: float = 0.0) -> dict:
    started = datetime.now(timezone.utc) - timedelta(hours=hours_ago)
    return {
        "owner": "someone",
        "host": host or socket.gethostname(),
        "pid": os.getpid() if pid is None else pid,
        "started": started.isoformat(timespec="seconds"),
        "token": "t",
    }


@pytest.mark.parametrize(
    ("holder", "alive", "expected"),
    [
        (_holder(), True, "held"),
        (_holder(), False, "stale"),
        (_holder(host="elsewhere", hours_ago=1), False, "held"),
        (_holder(host="elsewhere", hours_ago=STALE_LOCK_HOURS + 1), True, "abandoned"),
        (None, True, "unreadable"),
        ({"host": "x"}, True, "unreadable"),
    ],
)
def test_lock_state(holder, alive, expected):
    assert (
        lock_state(holder, host=socket.gethostname(), now=time.time(), alive=lambda _: alive)
        == expected
    )


def test_lock_is_held_then_released_even_on_error(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    with pytest.raises(RuntimeError), output_lock(out):
        holder = json.loads((tmp_path / "out" / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert {"owner", "started"} <= set(holder)
        held = pytest.raises(OutputError, match=f"in use by another run .*pid {os.getpid()}")
        with held, output_lock(out):
            pass
        raise RuntimeError("a stage failed")
    assert not (tmp_path / "out" / LOCK_FILE).exists()


def test_second_run_is_refused_naming_the_holder(tmp_path, capsys):
    """While a run holds the lock, the same command elsewhere stops in prepare, on one line."""
    out = tmp_path / "out"
    with output_lock(OutputDir(str(out))):
        before = snapshot(out)
        fails(capsys, ["--output", str(out)], "in use by another run", f"pid {os.getpid()}")
        assert snapshot(out) == before


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, dead_pid):
    """A lock left by a dead process on this host is taken over (and released after)."""
    root = tmp_path / "out"
    root.mkdir()
    (root / LOCK_FILE).write_text(json.dumps(_holder(pid=dead_pid)))
    out = OutputDir(str(root))
    assert check_output_dir(out, {}, overwrite=False) == "new"
    with pytest.warns(OutputWarning, match=f"taking over .*pid {dead_pid}"), output_lock(out):
        assert json.loads((root / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (root / LOCK_FILE).exists()


def test_old_lock_from_another_host_says_how_to_remove_it(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps(_holder(host="node-7", hours_ago=48)))
    old = pytest.raises(OutputError, match=f"delete {re.escape(str(out / LOCK_FILE))}")
    with old, output_lock(OutputDir(str(out))):
        pass
    fails(capsys, ["--output", str(out)], "another host", "node-7", f"delete {out / LOCK_FILE}")


# ---------------------------------------------------------------------------------------------
# Damaged files


def _release(out: OutputDir) -> None:
    record = SimpleNamespace(to_dict=lambda: {"epsilon": 1.0})
    targets = {lab: {"weight": torch.randn(5, 3)} for lab in ("negative", "positive")}
    write_targets(out, targets, record, build_config({}), model_revision=None)


def test_release_round_trip_and_record_from_the_file(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    _release(out)
    targets, record = read_targets(out)
    assert set(targets) == {"negative", "positive"} and targets["positive"]["weight"].shape == (
        5,
        3,
    )
    assert record == out.read_json(TARGETS_RECORD) and record["privacy"] == {"epsilon": 1.0}
    (tmp_path / "out" / TARGETS_RECORD).unlink()  # a readable copy only
    assert read_targets(out)[1] == record


def test_release_is_one_unit(tmp_path, monkeypatch):
    """Killed between the two writes of the release: no targets.safetensors (so the next run
    computes the release again), never a release without its record."""
    out = OutputDir(str(tmp_path / "out"))
    commits = []

    def commit_once(tmp: str, target: str) -> None:
        if commits:
            raise KeyboardInterrupt("killed")
        commits.append(target)
        out.fs.move(tmp, target)

    monkeypatch.setattr(out, "_commit", commit_once)
    with pytest.raises(KeyboardInterrupt):
        _release(out)
    assert not out.exists(TARGETS_FILE)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-7]), "is truncated"),
        (lambda p: p.write_bytes(p.read_bytes()[:5]), "is not a readable release"),
        (lambda p: p.write_bytes(b"garbage" * 10), "is not a readable release"),
        (lambda p: p.unlink(), "is missing: run the targets stage"),
    ],
)
def test_damaged_release_is_named(tmp_path, damage, expected):
    out = OutputDir(str(tmp_path / "out"))
    _release(out)
    damage(tmp_path / "out" / TARGETS_FILE)
    with pytest.raises(OutputError, match=f"{re.escape(out.uri)}/{TARGETS_FILE} {expected}"):
        read_targets(out)


def test_resume_with_a_truncated_release_stops_in_prepare(tmp_path, capsys):
    out, argv = _started_run(tmp_path, "sample")
    _release(OutputDir(str(out)))
    path = out / TARGETS_FILE
    path.write_bytes(path.read_bytes()[:-100])
    fails(capsys, argv, f"{out}/{TARGETS_FILE} is truncated", "--overwrite", "privacy budget")


def test_unreadable_solve_part_is_deleted_and_redone(tmp_path):
    """finished_keys drops a truncated part (its items are solved again) with a warning, and
    ignores parquet files it did not write; read_solves names a damaged part."""
    root = tmp_path / "out"
    out = OutputDir(str(root))
    good = "solves/part-" + "1" * 32 + ".parquet"
    bad = "solves/part-" + "2" * 32 + ".parquet"
    out.write_parquet(good, pa.table({"synthetic_id": [0, 1], "rho": [1.0, 1.0]}))
    out.write_parquet(bad, pa.table({"synthetic_id": [2, 3], "rho": [1.0, 1.0]}))
    (root / "solves" / "mine.parquet").write_bytes(b"not ours")
    (root / bad).write_bytes((root / bad).read_bytes()[:40])
    with pytest.raises(
        OutputError, match=f"{re.escape(str(root / bad))} is unreadable; run the solve stage"
    ):
        read_solves(out)
    with pytest.warns(OutputWarning, match="part-2+.parquet is unreadable; deleting it"):
        assert finished_keys(out) == {(0, 1.0), (1, 1.0)}
    assert sorted(p.name for p in (root / "solves").iterdir()) == ["mine.parquet", Path(good).name]
    assert read_solves(out).num_rows == 2


def test_resume_reads_only_the_key_columns(tmp_path, monkeypatch):
    """finished_keys asks Parquet for synthetic_id and rho only (a solve part also holds token
    ids, texts and per-iteration curves, which resume never needs)."""
    out = OutputDir(str(tmp_path / "out"))
    part = "solves/part-" + "3" * 32 + ".parquet"
    curves = [[0.5] * 30, [0.4] * 30]
    out.write_parquet(part, pa.table({"synthetic_id": [0, 1], "rho": [1.0, 2.0], "curve": curves}))
    asked = []
    read = OutputDir.read_parquet

    def recording(self, rel, columns=None):
        asked.append(columns)
        return read(self, rel, columns)

    monkeypatch.setattr(OutputDir, "read_parquet", recording)
    assert finished_keys(out) == {(0, 1.0), (1, 2.0)}
    assert asked == [["synthetic_id", "rho"]]


# ---------------------------------------------------------------------------------------------
# Unwritable --output


def test_output_under_a_regular_file(capsys, tmp_path):
    (tmp_path / "file").write_text("a file")
    out = tmp_path / "file" / "out"
    fails(capsys, ["--output", str(out)], repr(str(out)), "not writable", "choose another --output")
    assert (tmp_path / "file").read_text() == "a file"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_output_where_even_root_cannot_write(capsys):
    """/proc refuses new folders to everyone, root included (CI runs as root)."""
    fails(capsys, ["--output", "/proc/gradmm-out"], "'/proc/gradmm-out'", "not writable")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output(capsys, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        fails(capsys, ["--output", str(parent / "out")], "not writable")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_probe_leaves_no_folder_behind(tmp_path):
    """prepare creates the output folder (and parents) only to probe it, then removes them."""
    out = tmp_path / "a" / "b" / "out"
    cfg = build_config({"output": str(out)})
    assert pipeline.prepare(cfg, overwrite=False).mode == "new"
    assert list(tmp_path.iterdir()) == []
