"""Bad input through the command line: exit code 2, one stderr line, no traceback, nothing
written to --output and Ray never started (all checks run in ``pipeline.prepare``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradmm_ray.config import build_config
from gradmm_ray.distill import pipeline
from gradmm_ray.distill.cli import main
from gradmm_ray.entry import EXIT_USER_ERROR
from gradmm_ray.env import OFFLINE
from gradmm_ray.io.storage import RUN_FILE, OutputDir, check_output_location

try:
    import ray
except ImportError:  # pragma: no cover - ray is a dependency
    ray = None

REPO = Path(__file__).resolve().parents[1]
PREFIX = "distill.py: error:"


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def good_rows(n: int = 4) -> list[dict]:
    return [
        {"text": f"Review number {i}.", "label": "positive" if i % 2 else "negative"}
        for i in range(n)
    ]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def fails(capsys, argv: list[str], *parts: str) -> str:
    """Run main(argv) in-process and check the one-line user error; return that line."""
    ray_before = ray is not None and ray.is_initialized()
    code = main(argv)
    captured = capsys.readouterr()
    assert code == EXIT_USER_ERROR == 2
    assert "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    line = lines[0]
    assert line.startswith(PREFIX), line
    for part in parts:
        assert part in line, (part, line)
    if ray is not None and not ray_before:
        assert not ray.is_initialized()
    return line


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


def run_data(capsys, out: Path, data: str, *parts: str, extra: tuple[str, ...] = ()) -> str:
    line = fails(capsys, ["--data", data, "--output", str(out), *extra], *parts)
    assert not out.exists()
    return line


# ---------------------------------------------------------------------------------------------
# Data


def test_missing_file(capsys, out, tmp_path):
    """A data file that does not exist is named."""
    missing = str(tmp_path / "missing.jsonl")
    run_data(capsys, out, missing, repr(missing), "does not exist")


def test_garbage_parquet(capsys, out, tmp_path):
    """A .parquet file with garbage bytes is reported as unreadable Parquet, naming the file."""
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"this is not a parquet file at all, just some bytes" * 4)
    run_data(capsys, out, str(path), "bad.parquet", "cannot read as PARQUET")


def test_invalid_json(capsys, out, tmp_path):
    """A .jsonl with invalid JSON is reported as unreadable JSON, naming the file."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine", "label": "positive"}\n{"text": "broken", "label":\n')
    run_data(capsys, out, str(path), "bad.jsonl", "cannot read as JSON")


@pytest.mark.parametrize(
    ("flag", "column"), [("data.text_column", "body"), ("data.label_column", "sentiment")]
)
def test_missing_column(capsys, out, tmp_path, flag, column):
    """A missing column is named with the columns present and the setting to change."""
    data = write_jsonl(tmp_path / "d.jsonl", good_rows())
    run_data(
        capsys,
        out,
        data,
        "d.jsonl",
        f"column {column!r} not found",
        "columns: text, label",
        f"set {flag}",
        extra=("--set", f"{flag}={column}"),
    )


def test_empty_jsonl(capsys, out, tmp_path):
    """A .jsonl with zero lines is reported as empty, naming the file."""
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    line = run_data(capsys, out, str(path), "empty.jsonl")
    assert "empty" in line.lower()


def test_header_only_csv(capsys, out, tmp_path):
    """A CSV with a header and no rows is reported as an empty dataset."""
    path = tmp_path / "header.csv"
    path.write_text("text,label\n")
    run_data(capsys, out, str(path), "header.csv", "empty (0 rows)")


@pytest.mark.parametrize("text", ["", "   \t"])
def test_empty_text(capsys, out, tmp_path, text):
    """Empty or whitespace-only text is named with its row index, column and value."""
    rows = good_rows()
    rows.insert(2, {"text": text, "label": "positive"})
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    run_data(capsys, out, data, "d.jsonl", "row 2", "'text'", "empty", repr(text))


def test_numeric_text(capsys, out, tmp_path):
    """A text column of numbers is refused naming the column, the first row and its value."""
    rows = [{"text": 5 + i, "label": lab} for i, lab in enumerate(["positive", "negative"] * 2)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    run_data(capsys, out, data, "d.jsonl", "'text'", "expected string", "row 0", "5")


def test_number_among_strings(capsys, out, tmp_path):
    """A number in a text column of strings is refused naming the row."""
    rows = good_rows()
    rows[1] = {"text": 42, "label": "positive"}
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    run_data(capsys, out, data, "d.jsonl", "text", "row 1")


def test_label_without_verbalizer(capsys, out, tmp_path):
    """A label with no verbalizer is named with its row and value and the known labels."""
    rows = good_rows()
    rows.insert(3, {"text": "Meh.", "label": "neutral"})
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    run_data(
        capsys,
        out,
        data,
        "d.jsonl",
        "row 3",
        "'neutral'",
        "data.verbalizers",
        "positive",
        "negative",
    )


def test_integer_label_outside_label_names(capsys, out, tmp_path):
    """An integer label outside data.label_names is named with its row and value."""
    rows = [{"text": f"Review {i}.", "label": i % 2} for i in range(4)]
    rows.insert(2, {"text": "Odd one.", "label": 3})
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    run_data(
        capsys,
        out,
        data,
        "d.jsonl",
        "row 2",
        "label 3",
        "data.label_names",
        "0..1",
        extra=("--set", "data.label_names=[negative, positive]"),
    )


def test_integer_labels_without_names(capsys, out, tmp_path):
    """Integer labels without data.label_names ask for them."""
    rows = [{"text": f"Review {i}.", "label": i % 2} for i in range(4)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    run_data(capsys, out, data, "d.jsonl", "'label'", "integer labels", "data.label_names")


def test_class_with_one_example(capsys, out, tmp_path):
    """A class with fewer than 2 examples is named with its count."""
    rows = [{"text": f"Good {i}.", "label": "positive"} for i in range(4)]
    rows.append({"text": "Bad.", "label": "negative"})
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    run_data(capsys, out, data, "d.jsonl", "class 'negative'", "1 example", "at least 2")


def test_class_with_no_examples(capsys, out, tmp_path):
    """A verbalizer class absent from the data is named with count 0."""
    rows = [{"text": f"Good {i}.", "label": "positive"} for i in range(4)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    run_data(capsys, out, data, "d.jsonl", "class 'negative'", "0 example")


def test_hub_id_offline(capsys, out):
    """A hub dataset id that cannot be loaded (offline) is named."""
    run_data(capsys, out, "no-such-user/no-such-dataset", "'no-such-user/no-such-dataset'")


def test_jsonl_not_utf8(capsys, out, tmp_path):
    """A JSONL file saved as Latin-1 is named with its line, not a UnicodeDecodeError."""
    path = tmp_path / "latin1.jsonl"
    rows = [json.dumps(r, ensure_ascii=False) for r in good_rows()]
    rows.insert(2, '{"text": "Café society.", "label": "positive"}')
    path.write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    run_data(capsys, out, str(path), f"{path} line 3: not UTF-8 text", "save the file as UTF-8")


def test_folder_file_without_label_column(capsys, out, tmp_path):
    """In a folder of files, the file that lacks the label column is the one named."""
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", good_rows())
    write_jsonl(folder / "b.jsonl", [{"text": "No label here."}])
    run_data(capsys, out, str(folder), f"{folder / 'b.jsonl'}: column 'label' not found")


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("override", "parts"),
    [
        ("privacy.epsilon=0", ["privacy.epsilon", "got 0.0", "> 0"]),
        ("privacy.epsilon=-1", ["privacy.epsilon", "got -1.0", "> 0"]),
        ("privacy.delta=0", ["privacy.delta", "got 0.0", "(0, 1)"]),
        ("privacy.delta=1", ["privacy.delta", "got 1.0", "(0, 1)"]),
        ("privacy.clip_norm=0", ["privacy.clip_norm", "got 0.0", "> 0, auto or null"]),
        ("privacy.clip_norm=null", ["privacy.clip_norm", "null", ".inf", "epsilon 1.0"]),
    ],
)
def test_invalid_privacy_values(capsys, out, override, parts):
    """Invalid privacy settings name the field, the value and the allowed range."""
    fails(capsys, ["--set", override, "--output", str(out)], *parts)
    assert not out.exists()


def test_unknown_target_space(capsys, out):
    """targets.gradient lists the accepted spaces."""
    fails(
        capsys,
        ["--set", "targets.gradient=rows", "--output", str(out)],
        "targets.gradient",
        "'rows'",
        "full_head",
        "label_rows",
    )
    assert not out.exists()


def test_label_rows_refuses_a_multi_token_verbalizer(capsys, out):
    """label_rows needs one token per label: the multi-token verbalizer is named, with its
    token count, on one line, before anything is written (" terrible" is 3 tiny tokens)."""
    fails(
        capsys,
        [
            "--config",
            "tiny",
            "--set",
            "targets.gradient=label_rows",
            "--set",
            'data.verbalizers={positive: " great", negative: " terrible"}',
            "--output",
            str(out),
        ],
        "targets.gradient label_rows",
        "data.verbalizers.negative",
        "' terrible'",
        "3 tokens",
    )
    assert not out.exists()


def test_two_config_problems_on_one_line(capsys, out):
    """Several config problems are reported together, still on one line."""
    fails(
        capsys,
        ["--set", "privacy.epsilon=0", "--set", "privacy.delta=2", "--output", str(out)],
        "privacy.epsilon",
        "privacy.delta",
    )
    assert not out.exists()


def test_unknown_key_via_set(capsys, out):
    """An unknown --set key gets a did-you-mean."""
    fails(
        capsys,
        ["--set", "data.txt_column=body", "--output", str(out)],
        "unknown config key 'data.txt_column'",
        "did you mean 'text_column'?",
    )
    assert not out.exists()


def test_unknown_key_via_yaml(capsys, out, tmp_path):
    """An unknown key in the --config YAML file gets a did-you-mean."""
    path = tmp_path / "run.yaml"
    path.write_text("privacy:\n  epsilom: 2\n")
    fails(
        capsys,
        ["--config", str(path), "--output", str(out)],
        "unknown config key 'privacy.epsilom'",
        "did you mean 'epsilon'?",
    )
    assert not out.exists()


def test_missing_config_file(capsys, out, tmp_path):
    """A --config file that does not exist is named."""
    missing = tmp_path / "nope.yaml"
    fails(capsys, ["--config", str(missing), "--output", str(out)], "nope.yaml", "does not exist")
    assert not out.exists()


def test_invalid_yaml_config_file(capsys, out, tmp_path):
    """A --config file that is not valid YAML is named on one line."""
    path = tmp_path / "bad.yaml"
    path.write_text("data: [unclosed\n  source: x\n")
    fails(capsys, ["--config", str(path), "--output", str(out)], "bad.yaml", "not valid YAML")
    assert not out.exists()


def test_malformed_set(capsys, out):
    """A --set without '=' is named."""
    fails(capsys, ["--set", "privacy.epsilon", "--output", str(out)], "expected section.key=value")
    assert not out.exists()


def test_bad_stage(capsys, out):
    """An unknown stage in --stages is named with the allowed ones."""
    fails(capsys, ["--stages", "targets,train", "--output", str(out)], "stages", "'train'")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Model


def test_model_path_does_not_exist(capsys, out):
    """A local model path that does not exist is named."""
    fails(
        capsys,
        ["--model", "./no/such/dir", "--output", str(out)],
        "model.name './no/such/dir'",
        "does not exist",
    )
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Output directory


def _write_run(out: Path, cfg) -> None:
    OutputDir(str(out)).write_json(
        RUN_FILE, {"fingerprint": cfg.fingerprint_dict(), "config": cfg.to_dict()}
    )


def test_output_holds_a_different_run(capsys, out):
    """An output directory holding a run with other settings is refused, naming the changed
    setting, and left exactly as it was."""
    _write_run(out, build_config({"privacy": {"epsilon": 2.0}, "output": str(out)}))
    (out / "targets.safetensors").write_bytes(b"previous results")
    before = snapshot(out)
    fails(
        capsys,
        ["--output", str(out)],
        repr(str(out)),
        "different settings",
        "privacy.epsilon",
        "--overwrite",
    )
    assert snapshot(out) == before


def test_output_not_empty_without_run_file(capsys, out):
    """A non-empty directory that holds no run is refused, even with --overwrite, without
    recommending a destructive flag, and left as it was."""
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    for extra in ([], ["--overwrite"]):
        line = fails(
            capsys, ["--output", str(out), *extra], repr(str(out)), "not empty", "notes.txt"
        )
        assert "choose another --output" in line and "--overwrite" not in line
    assert snapshot(out) == before


def test_output_is_a_file(capsys, tmp_path):
    """An --output path that is a file is refused and left as it was."""
    path = tmp_path / "out"
    path.write_text("a file")
    fails(capsys, ["--output", str(path)], repr(str(path)), "not a directory")
    assert path.read_text() == "a file"


def test_relative_output_refused_under_ray_job_submit(capsys, monkeypatch, tmp_path):
    """In a submitted Ray job (Ray's supervisor sets RAY_JOB_CONFIG_JSON_ENV_VAR) a relative
    --output, or the default one, is one line naming it and the way out, before anything is
    written; an absolute path passes that check; outside a job a relative path is fine."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    for argv in (["--output", "runs/a"], []):
        line = fails(capsys, argv, "is relative", "ray job submit", "s3://", "absolute path")
        assert "'runs/a'" in line or "'outputs/demo'" in line
    assert not any(tmp_path.iterdir())
    check_output_location(str(tmp_path / "abs"))
    check_output_location("s3://bucket/run")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    check_output_location("runs/a")


def test_overwrite_accepts_a_different_run_without_writing_in_prepare(out):
    """With --overwrite the same directory is accepted (mode overwrite); prepare writes nothing."""
    _write_run(out, build_config({"privacy": {"epsilon": 2.0}, "output": str(out)}))
    before = snapshot(out)
    cfg = build_config({"output": str(out), "privacy": {"sample_rate": 0.5}})
    prep = pipeline.prepare(cfg, overwrite=True)
    assert prep.mode == "overwrite"
    assert snapshot(out) == before


def test_same_settings_resume(out):
    """A directory holding a run with the same fingerprint is resumed, not refused."""
    cfg = build_config({"output": str(out), "privacy": {"sample_rate": 0.5}})
    _write_run(out, cfg)
    other_resources = build_config(
        {"output": str(out), "privacy": {"sample_rate": 0.5}, "solve": {"max_actors": 9}}
    )
    assert pipeline.prepare(other_resources, overwrite=False).mode == "resume"


# ---------------------------------------------------------------------------------------------
# The real entry point


def test_entry_point_subprocess(tmp_path):
    """jobs/distill.py with a missing data file exits 2 with one stderr line, no traceback."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        **OFFLINE,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "jobs/distill.py", "--data", "/nonexistent.jsonl", "--output", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(PREFIX)
    assert "'/nonexistent.jsonl'" in lines[0]
    assert not out.exists()


def test_parquet_and_csv_good_inputs_pass_prepare(tmp_path):
    """Control: the same checks accept well-formed Parquet and CSV (the errors above are
    about the input, not the format)."""
    pq.write_table(pa.Table.from_pylist(good_rows()), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text(
        "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in good_rows())
    )
    for name in ("d.parquet", "d.csv"):
        out = tmp_path / f"out-{name}"
        cfg = build_config({"data": {"source": str(tmp_path / name)}, "output": str(out)})
        prep = pipeline.prepare(cfg, overwrite=False)
        assert prep.mode == "new"
        assert prep.source is not None and prep.source.fragments[0].fmt == name[2:]
        assert prep.bytes_per_row > 0
        assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Ray cannot start


class RayThatCannotStart:
    """Stands in for the `ray` module inside ray_env: ray.init fails as on a node that cannot
    start (e.g. a full /tmp) or a cluster that cannot be reached."""

    @staticmethod
    def is_initialized() -> bool:
        return False

    @staticmethod
    def init(**kwargs) -> None:
        raise RuntimeError("node timed out during startup\n(long explanation on later lines)")


@pytest.mark.parametrize("address", [None, "10.0.0.9:6379"])
def test_ray_that_cannot_start_writes_nothing(capsys, out, monkeypatch, address):
    """ray.init failing ends the job with exit code 1 (the input is fine: re-run when Ray can
    start) and one line with its first line and what to check; an output holding another run
    is left exactly as it was, even with --overwrite (nothing is cleared or written before
    Ray is up)."""
    from gradmm_ray.distributed import ray_env
    from gradmm_ray.entry import EXIT_FAILED

    monkeypatch.setattr(ray_env, "ray", RayThatCannotStart)  # our module's name, not Ray's
    if address:
        monkeypatch.setenv("RAY_ADDRESS", address)
    _write_run(out, build_config({"privacy": {"epsilon": 2.0}, "output": str(out)}))
    (out / "targets.safetensors").write_bytes(b"previous results")
    before = snapshot(out)
    data = write_jsonl(out.parent / "d.jsonl", good_rows())
    code = main(["--data", data, "--output", str(out), "--overwrite"])
    err = capsys.readouterr().err.splitlines()
    assert code == EXIT_FAILED == 1
    assert len(err) == 1 and err[0].startswith(PREFIX), err
    assert "could not start or join Ray: RuntimeError: node timed out during startup;" in err[0]
    assert (f"RAY_ADDRESS={address}" if address else "ray start --head") in err[0]
    assert snapshot(out) == before
