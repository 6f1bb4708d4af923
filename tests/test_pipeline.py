"""End to end on local Ray: stage 1 invariance, the output contract, resume, no real text out."""

import contextlib
import dataclasses
import io
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from gradmm_ray.config import Config, DataConfig, build_config, load_yaml
from gradmm_ray.core.target_space import target_space
from gradmm_ray.core.text import encode_pair, format_prompt
from gradmm_ray.distill import cli
from gradmm_ray.distill.output import OUTPUT_COLUMNS
from gradmm_ray.io.real_data import load_real_examples, plan_source
from gradmm_ray.presets import resolve_config_path

CANARY = "zqxj canary wombat"
TINY = build_config(load_yaml(resolve_config_path("tiny")))  # what FAST runs: --config tiny

# Small but complete settings: every stage and rule runs, in seconds.
FAST = [
    "--config", "tiny",  # the fastest settings (the defaults run SmolLM2)
    "--set", "solve.candidates_per_class=3",
    "--set", "admm.outer_iters=3",
    "--set", "admm.inner_steps=4",
    "--set", "admm.init_candidates=4",
    "--set", "admm.num_tokens=6",
    "--set", "select.per_class=2",
    # At epsilon=1 with 24 rows per class the noise dominates; quality is not under test here.
    "--set", "select.label_check=false",
]  # fmt: skip


def _direct_clean_sums(lm, real, cfg: Config) -> dict[str, torch.Tensor]:
    """Stage 1's clean per-class sums computed in one process, one batch per class."""
    space = target_space(cfg.targets.gradient, lm, cfg.data.verbalizers)
    out = {}
    rows = real.table.to_pylist()
    for label, completion in cfg.data.verbalizers.items():
        pairs = [
            encode_pair(
                lm.tokenizer, format_prompt(cfg.data.prompt_template, r["text"]), completion
            )
            for r in rows
            if r["label"] == label
        ]
        out[label] = space.clipped_sum_of_pairs(lm, pairs, cfg.privacy.clip_norm)[0].double()
    return out


def test_stage1_sum_does_not_depend_on_sharding(ray_session, tiny_lm):
    """1 actor with small batches vs 2 actors with large ones: the clean per-class sums agree with
    each other and with a one-process computation to 1e-5 relative."""
    from gradmm_ray.distributed.targets import clean_class_sums

    cfg = dataclasses.replace(
        TINY,
        data=dataclasses.replace(TINY.data, per_class=24),
        model=dataclasses.replace(TINY.model, device="cpu"),
    )
    real = load_real_examples(cfg.data, seed=0)
    one = dataclasses.replace(
        cfg,
        targets=dataclasses.replace(
            cfg.targets, micro_batch_size=3, rows_per_partial=6, min_actors=1, max_actors=1,
            num_gpus=0,
        ),
    )  # fmt: skip
    two = dataclasses.replace(
        cfg,
        targets=dataclasses.replace(
            cfg.targets, micro_batch_size=16, rows_per_partial=16, min_actors=2, max_actors=2,
            num_gpus=0,
        ),
    )  # fmt: skip
    plan = plan_source(cfg.data)
    sums_one = clean_class_sums(plan, one, bytes_per_row=100.0)
    sums_two = clean_class_sums(plan, two, bytes_per_row=100.0)
    direct = _direct_clean_sums(tiny_lm, real, cfg)
    for label in ("positive", "negative"):
        w1, w2 = sums_one[label]["weight"], sums_two[label]["weight"]
        scale = direct[label].norm()
        assert (w1 - w2).norm() / scale < 1e-5
        assert (w1 - direct[label]).norm() / scale < 1e-5


# Class sizes of the canary data: numbers that no setting or other output uses, so that finding
# one in an output file or the log means a count leaked.
COUNTS = {"positive": 37, "negative": 29}


@pytest.fixture(scope="module")
def canary_data(tmp_path_factory):
    """The bundled reviews (COUNTS rows per class) with a canary string planted in one row."""
    real = load_real_examples(DataConfig(per_class=max(COUNTS.values())), seed=0)
    rows, kept = [], dict.fromkeys(COUNTS, 0)
    for r in real.table.select(["text", "label"]).to_pylist():
        if kept[r["label"]] < COUNTS[r["label"]]:
            kept[r["label"]] += 1
            rows.append(r)
    assert kept == COUNTS
    rows[5]["text"] = f"The {CANARY} ruined it for me."
    path = tmp_path_factory.mktemp("data") / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run_capturing(argv: list[str]) -> str:
    """cli.main with the driver's stdout and stderr (prints, progress bars) captured."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        assert cli.main(argv) == 0
    return buf.getvalue()


@pytest.fixture(scope="module")
def demo_run(ray_session, canary_data, tmp_path_factory):
    """A full run with the audit off, then the same run resumed with the audit on (the audit
    is not part of the settings fingerprint: only stage 3 runs again)."""
    out = tmp_path_factory.mktemp("run") / "out"
    argv = ["--data", str(canary_data), "--output", str(out), *FAST]
    log = _run_capturing(argv)
    synthetic_without_audit = (out / "synthetic.parquet").read_bytes()
    log += _run_capturing([*argv, "--set", "audit.enabled=true"])
    return out, argv, log, synthetic_without_audit


def test_output_contract(demo_run):
    """synthetic.parquet has the contract's columns, rows for every class, and the exact training
    pair; it loads with datasets, pandas and Ray Data."""
    import datasets
    import pandas as pd

    out = demo_run[0]
    path = str(out / "synthetic.parquet")
    table = pq.read_table(path)
    assert tuple(table.column_names) == OUTPUT_COLUMNS
    rows = table.to_pylist()
    assert {r["label"] for r in rows} == {"positive", "negative"}
    cfg = TINY
    for r in rows:
        assert r["prompt"] == cfg.data.prompt_template.format(text=r["text"])
        assert r["completion"] == cfg.data.verbalizers[r["label"]]
        assert 0 <= r["match_loss"] <= 2 and 0 < r["label_prob"] < 1
    assert len(pd.read_parquet(path)) == len(rows)
    assert datasets.load_dataset("parquet", data_files=path, split="train").num_rows == len(rows)


def test_manifest_funnel_and_report(demo_run):
    """The manifest's funnel ends at the written row count; the record and report are present."""
    out, _, log, _ = demo_run
    manifest = json.loads((out / "manifest.json").read_text())
    n_rows = pq.read_metadata(out / "synthetic.parquet").num_rows
    funnel = manifest["counts"]["funnel"]
    assert funnel[0]["rows"] == 6 and funnel[-1]["rows"] == n_rows
    assert all(sum(f["per_class"].values()) == f["rows"] for f in funnel)
    assert manifest["privacy"]["private"] is True
    assert manifest["privacy"]["noise_multiplier"] > 0
    assert set(manifest["timings_seconds"]) >= {"targets", "solve", "select", "total"}
    # The manifest is the second (audit) run's, which found every solve done.
    assert manifest["counts"]["solve"] == {
        "work_items": 6,
        "already_done": 6,
        "solved_now": 0,
        "first_result_seconds": None,
    }
    first = re.search(
        r"6 work items: 6 solved now, 0 already done \(first result after (\S+)s\)", log
    )
    assert first and float(first.group(1)) > 0
    assert manifest["versions"]["ray"] and manifest["config"]["privacy"]["epsilon"] == 1.0
    for rel in (
        "report.md",
        "plots/match_loss.png",
        "plots/admm_curves.png",
        "plots/funnel.png",
        "targets.json",
    ):
        assert (out / rel).stat().st_size > 0
    # The newcomer's summary: the selected rows' median matching loss (from the output itself)
    # beside their pre-ADMM start and all candidates, and the privacy in words.
    report = (out / "report.md").read_text()
    glance = report[report.index("## At a glance") : report.index("## Privacy")]
    median = float(np.median(pq.read_table(out / "synthetic.parquet").column("match_loss")))
    assert f"selected rows median {median:.3f}; the same rows before ADMM" in glance
    assert "all 6 candidates" in glance and "factor e^1 " in glance
    targets = json.loads((out / "targets.json").read_text())
    assert (
        targets["privacy"]["adjacency"] == "add_remove"
        and targets["verbalizers"]["positive"] == " great"
    )


def test_no_exact_count_in_any_output_or_the_log(demo_run):
    """No class size or total of the real rows appears in any text file of the output (the
    record, the manifest, the report, run.json) or in what the driver printed."""
    out, argv, log, _ = demo_run
    counts = {*COUNTS.values(), sum(COUNTS.values())}
    paths = [a for a in argv if a.startswith("/")]  # temporary folders are numbered
    standalone = re.compile(r"(?<![\w.])(\d+)(?![\w.%])")  # not in a word, a float or a percentage
    texts = {"log": log}
    for path in out.rglob("*"):
        if path.suffix in (".json", ".md", ".txt", ".yaml"):
            texts[str(path)] = path.read_text()
    assert len(texts) >= 5
    for where, text in texts.items():
        for p in paths:
            text = text.replace(p, "")
        found = {int(m) for m in standalone.findall(text)} & counts
        assert not found, f"{where} holds {found}"


def test_two_identical_runs_release_different_targets(ray_session, canary_data, tmp_path):
    """The same command twice releases different noise: the release cannot be regenerated from
    anything in the output, and the difference of two releases is noise, not zero."""
    from safetensors.torch import load_file

    releases = []
    for name in ("a", "b"):
        argv = ["--data", str(canary_data), "--output", str(tmp_path / name), "--stages", "targets"]
        assert cli.main([*argv, *FAST]) == 0
        releases.append(load_file(tmp_path / name / "targets.safetensors"))
    a, b = releases
    assert set(a) == set(b)
    for key in a:
        assert not torch.equal(a[key], b[key]), key
    record = json.loads((tmp_path / "a" / "targets.json").read_text())["privacy"]
    assert "seed" not in json.dumps(record)


def test_no_real_text_leaves_stage_one(demo_run):
    """A canary planted in the real data appears in no output file and no driver output, with the
    audit off and on."""
    out, _, log, _ = demo_run
    assert (out / "audit.parquet").exists()
    for path in out.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path
    assert CANARY not in log and "targets: 100%" in log


def test_audit_is_reported_and_never_changes_the_selection(demo_run):
    """The audit adds audit.parquet and a labelled report section; synthetic.parquet is
    identical with and without it."""
    out, _, _, synthetic_without_audit = demo_run
    synthetic = pq.read_table(out / "synthetic.parquet")
    assert synthetic.equals(pq.read_table(io.BytesIO(synthetic_without_audit)))
    audit = pq.read_table(out / "audit.parquet")
    assert sorted(audit.column("id").to_pylist()) == sorted(synthetic.column("id").to_pylist())
    assert all(0 <= r < sum(COUNTS.values()) for r in audit.column("nearest_real_row").to_pylist())
    report = (out / "report.md").read_text()
    assert "outside the DP guarantee" in report and (out / "plots/audit_distances.png").exists()


def test_rerun_resumes_without_recomputing(demo_run, capsys):
    """The same command again keeps every finished solve and recomputes none."""
    out, argv = demo_run[:2]
    before = sorted(p.name for p in (out / "solves").iterdir())
    targets_before = (out / "targets.safetensors").read_bytes()
    assert cli.main(argv) == 0
    summary = capsys.readouterr().out
    assert "6 work items: 0 solved now, 6 already done\n" in summary  # no first result to time
    assert sorted(p.name for p in (out / "solves").iterdir()) == before
    assert (out / "targets.safetensors").read_bytes() == targets_before


def test_targets_stage_alone_then_the_rest(ray_session, tmp_path, capsys):
    """--stages targets writes only the release; a later run of solve,select resumes from it."""
    out = tmp_path / "out"
    base = ["--output", str(out), "--set", "privacy.sample_rate=0.05", *FAST]
    assert cli.main([*base, "--stages", "targets"]) == 0
    assert (out / "targets.safetensors").exists() and not (out / "solves").exists()
    from safetensors import safe_open

    with safe_open(out / "targets.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["gradmm"])
        assert set(f.keys()) == {"positive/weight", "negative/weight"}
        assert f.get_tensor("positive/weight").dtype == torch.float32
    assert meta["privacy"]["sample_rate"] == 0.05 and "Poisson" in meta["privacy"]["sampling"]
    assert meta["labels"] == ["negative", "positive"]
    assert cli.main([*base, "--stages", "solve,select"]) == 0
    assert (out / "synthetic.parquet").exists()


def test_label_rows_target_end_to_end(ray_session, canary_data, tmp_path, capsys):
    """targets.gradient=label_rows on the tiny model: every stage runs, the release holds one
    (|S|, d) weight (+ (|S|,) bias) per class, the record names the space and its dimension
    |S|·(d [+ 1]), and the selected rows' match_loss is a 1 - cos in that space. With
    select.rule set_match the scorer's per-row gradients cross Ray to the selection: its step
    ends the funnel with per_class rows per class, and the manifest and report give the set's
    cosine to the combined target. privacy.clip_norm auto: the release was clipped and noised
    at the public calibration's value, computed once (the record says so)."""
    from gradmm_ray.core.lm import load_causal_lm
    from gradmm_ray.core.target_space import public_clip_norm

    out = tmp_path / "out"
    argv = ["--data", str(canary_data), "--output", str(out), *FAST]
    settings = ["--set", "targets.gradient=label_rows", "--set", "select.rule=set_match"]
    assert cli.main([*argv, *settings, "--set", "privacy.clip_norm=auto"]) == 0
    # Announced before stage 1 (on a cluster its task may wait for a GPU node).
    assert "targets: privacy.clip_norm auto: measuring tiny's" in capsys.readouterr().err
    lm = load_causal_lm("tiny", dtype="float32", device="cpu")
    K, d = len(Config().data.verbalizers), lm.head.weight.shape[1]
    from safetensors import safe_open

    with safe_open(out / "targets.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["gradmm"])
        keys = set(f.keys())
        for label in ("positive", "negative"):
            assert tuple(f.get_tensor(f"{label}/weight").shape) == (K, d)
            assert (f"{label}/bias" in keys) == lm.has_head_bias
    record = meta["privacy"]
    data = TINY.data
    prefixes = [data.generation_prefix.format(label=label) for label in sorted(data.verbalizers)]
    C = round(public_clip_norm(lm, data.prompt_template, data.verbalizers, prefixes), 4)
    assert record["clip_norm"] == pytest.approx(C, rel=1e-4) and TINY.privacy.clip_norm != C
    assert record["clip_norm_source"].startswith("auto")
    assert record["noise_std_of_sum"] == pytest.approx(record["noise_multiplier"] * C, rel=1e-4)
    assert record["target_space"] == "label_rows"
    assert record["target_dims"] == K * (d + (1 if lm.has_head_bias else 0))
    assert set(record["noise_to_signal"]) == {"positive", "negative"}
    rows = pq.read_table(out / "synthetic.parquet").to_pylist()
    assert rows and all(0 <= r["match_loss"] <= 2 for r in rows)
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    last = counts["funnel"][-1]
    assert last["step"] == "set_match" and last["rows"] == len(rows)
    assert all(n <= TINY.select.per_class for n in last["per_class"].values())
    assert -1 <= counts["set_cosine"] <= 1 and -1 <= counts["lowest_loss_cosine"] <= 1
    # The report prints the cosine to 3 places, the manifest keeps 4: compare the numbers.
    shown = re.search(r"cosine (-?\d\.\d{3}) for the selected set", (out / "report.md").read_text())
    assert shown and abs(float(shown.group(1)) - counts["set_cosine"]) <= 6e-4
