"""Runs the stages in order: validate everything, then targets -> solve -> select.

All checks that can fail on user input (config, data, model, output directory) run in
``prepare`` before Ray starts and before anything is written. A stage that already finished
(its output exists under the same settings) is not re-run; stage 2 resumes item by item.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field

from gradmm_ray.config import Config
from gradmm_ray.core.lm import load_tokenizer
from gradmm_ray.core.target_space import single_token_ids
from gradmm_ray.core.text import check_verbalizers
from gradmm_ray.distill.audit import AUDIT_FILE
from gradmm_ray.distributed.targets import TARGETS_FILE, read_release_record
from gradmm_ray.errors import OutputError
from gradmm_ray.io.inputs import data_identity, model_identity
from gradmm_ray.io.real_data import SourcePlan, check_head, plan_source
from gradmm_ray.io.storage import (
    RUN_FILE,
    OutputDir,
    check_inputs,
    check_output_dir,
    check_output_location,
    check_writable,
    is_own,
    output_lock,
    remove_run_files,
)
from gradmm_ray.models.sources import resolve_model_source


@dataclass
class Prepared:
    cfg: Config
    out: OutputDir
    mode: str  # new | resume | overwrite
    run_targets: bool
    source: SourcePlan | None  # planned (and its first rows checked) when stage 1 runs
    bytes_per_row: float = 0.0  # of the checked rows: sizes the stream for JSON and CSV
    inputs: dict = field(default_factory=dict)  # data and model identity, for run.json


@dataclass
class RunSummary:
    output: str
    mode: str
    cluster: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, object] = field(default_factory=dict)
    privacy: dict | None = None
    files: list[str] = field(default_factory=list)


def prepare(cfg: Config, *, overwrite: bool) -> Prepared:
    """Every user-input check, in the order a user would fix them. Leaves nothing behind (the
    writability probe deletes its file and any folder it created)."""
    check_output_location(cfg.output)
    out = OutputDir(cfg.output)
    mode = check_output_dir(out, cfg.fingerprint_dict(), overwrite=overwrite)
    check_writable(out)
    source = resolve_model_source(cfg.model.name)
    tokenizer = load_tokenizer(source, cfg.model.revision, cfg.model.trust_remote_code)
    check_verbalizers(tokenizer, cfg.data.verbalizers)
    if cfg.targets.gradient == "label_rows":
        single_token_ids(tokenizer, cfg.data.verbalizers)  # one token per label, or DataError
    inputs = {"data": data_identity(cfg.data), "model": model_identity(cfg.model, source)}
    if mode == "resume":
        check_inputs(out, inputs)
    has_targets = mode == "resume" and out.exists(TARGETS_FILE)  # overwrite deletes them
    if has_targets:
        read_release_record(out)  # a damaged release stops here, not after Ray starts
    needs_targets = "targets" in cfg.stages and not (mode == "resume" and has_targets)
    if not needs_targets and not has_targets:
        raise OutputError(
            f"output {out.uri!r} has no {TARGETS_FILE}: run the targets stage first (--stages targets,...)"
        )
    needs_real = needs_targets or (cfg.audit.enabled and "select" in cfg.stages)
    # The files, their columns and the first rows only: every row is checked in the stream.
    source = plan_source(cfg.data) if needs_real else None
    bytes_per_row = check_head(source, cfg.data) if source is not None else 0.0
    return Prepared(
        cfg, out, mode, needs_targets, source, bytes_per_row=bytes_per_row, inputs=inputs
    )


def run(prep: Prepared) -> RunSummary:
    """The stages, holding the output's lock throughout (released on errors too)."""
    with output_lock(prep.out):
        return _run_locked(prep)


def _run_locked(prep: Prepared) -> RunSummary:
    # Ray and the stages are imported only now: bad input fails in a second, before Ray loads.
    import ray

    from gradmm_ray.distributed.quiet_stderr import ray_false_alarms_filtered
    from gradmm_ray.distributed.ray_env import configure_ray_data, init_ray

    cfg, out = prep.cfg, prep.out
    summary = RunSummary(output=out.uri, mode=prep.mode)
    # Ray first: when it cannot start or join, the output is left exactly as it was.
    summary.cluster, started_ray = init_ray()
    # After ray.init, whose handler would print a stack dump: a stop (`ray job stop` sends
    # SIGTERM) unwinds like Ctrl-C, so the lock is released and one line says what was kept.
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        if prep.mode == "overwrite":
            remove_run_files(out)
        run_record = {"fingerprint": cfg.fingerprint_dict(), "inputs": prep.inputs}
        out.write_json(RUN_FILE, {**run_record, "config": cfg.to_dict()})
        configure_ray_data(cfg.execution)
        # After ray.init: the processes it starts must not inherit the filter's pipe.
        with ray_false_alarms_filtered():
            _run_stages(prep, summary)
    except KeyboardInterrupt as e:
        raise Stopped(
            _what_was_kept(out, "SIGTERM" if isinstance(e, _Terminated) else "Ctrl-C")
        ) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        if started_ray:
            ray.shutdown()
    return summary


class Stopped(Exception):
    """The run was stopped (SIGTERM, e.g. `ray job stop`, or Ctrl-C); the message says what the
    output keeps."""


class _Terminated(KeyboardInterrupt):
    pass


def _stop_on_sigterm(signum, frame) -> None:
    raise _Terminated()


def _what_was_kept(out: OutputDir, how: str) -> str:
    from gradmm_ray.distributed.solve import SOLVES_DIR

    kept = [TARGETS_FILE] if out.exists(TARGETS_FILE) else []
    parts = [rel for rel in out.list(SOLVES_DIR, ".parquet") if is_own(rel)]
    if parts:
        kept.append(f"{len(parts)} {SOLVES_DIR}/ part file(s)")
    what = ", ".join(kept) if kept else "nothing finished yet"
    return (
        f"stopped by {how}; {out.uri} keeps {what}: re-run the same command to resume "
        "(finished stages and solved examples are not computed again)"
    )


def _run_stages(prep: Prepared, summary: RunSummary) -> None:
    from gradmm_ray.core.privacy import combined_target
    from gradmm_ray.core.selection import select_rows
    from gradmm_ray.distill import report
    from gradmm_ray.distill.output import SYNTHETIC_FILE, synthetic_table
    from gradmm_ray.distributed.audit import run_audit
    from gradmm_ray.distributed.ray_env import stage_errors
    from gradmm_ray.distributed.select import score_candidates, split_gradients
    from gradmm_ray.distributed.solve import read_solves, run_solve
    from gradmm_ray.distributed.targets import read_targets, run_targets

    cfg, out = prep.cfg, prep.out
    started = time.perf_counter()

    if prep.run_targets:
        model_revision = _model_revision(cfg)
        with stage_errors("targets"):
            result = run_targets(
                prep.source,
                cfg,
                out,
                bytes_per_row=prep.bytes_per_row,
                model_revision=model_revision,
            )
        summary.timings["targets"] = result.seconds
        summary.files.append(TARGETS_FILE)
    targets, record = read_targets(out)
    summary.privacy = record["privacy"]

    if "solve" in cfg.stages:
        with stage_errors("solve"):
            stats = run_solve(targets, cfg, out)
        summary.timings["solve"] = stats.seconds
        summary.counts["solve"] = {
            "work_items": stats.total,
            "already_done": stats.skipped,
            "solved_now": stats.solved,
            "first_result_seconds": stats.first_result_seconds,
        }
        summary.files.append("solves/")

    if "select" in cfg.stages:
        t0 = time.perf_counter()
        solves = read_solves(out)
        if solves is None:
            raise OutputError(f"output {out.uri!r} has no solves: run the solve stage first")
        with stage_errors("select"):
            scored = score_candidates(solves, targets, cfg)
        scored, gradients = split_gradients(scored)
        rows = scored.to_pylist()
        if gradients is not None:
            for row, gradient in zip(rows, gradients, strict=True):
                row["gradient"] = gradient
        selection = select_rows(
            rows,
            cfg.select,
            sorted(cfg.data.verbalizers),
            target=combined_target(targets).numpy() if gradients is not None else None,
        )
        out.write_parquet(SYNTHETIC_FILE, synthetic_table(selection.rows, cfg))
        summary.timings["select"] = time.perf_counter() - t0
        summary.counts["funnel"] = selection.funnel
        summary.counts["selected"] = len(selection.rows)
        if selection.set_cosine is not None:
            summary.counts["set_cosine"] = round(selection.set_cosine, 4)
            summary.counts["lowest_loss_cosine"] = round(selection.lowest_loss_cosine, 4)
        summary.files.append(SYNTHETIC_FILE)
        audit = None
        if cfg.audit.enabled:
            with stage_errors("audit"):
                audit = run_audit(
                    prep.source, selection.rows, cfg, bytes_per_row=prep.bytes_per_row
                )
            out.write_parquet(AUDIT_FILE, audit)
            summary.files.append(AUDIT_FILE)
        summary.files += report.write_report(out, cfg, scored, selection, record, audit)

    summary.timings["total"] = time.perf_counter() - started
    report.write_manifest(out, cfg, summary, record)
    summary.files.append(report.MANIFEST_FILE)


def _model_revision(cfg: Config) -> str | None:
    from transformers import AutoConfig

    source = resolve_model_source(cfg.model.name)
    try:
        conf = AutoConfig.from_pretrained(
            source, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except OSError:
        return cfg.model.revision
    return cfg.model.revision or getattr(conf, "_commit_hash", None)
