"""Stage 1's input stream (distributed/real_rows.py): the rows it delivers are exactly the rows
the in-memory reader keeps, caps included; a bad row deep in the data fails the run with one
line naming its file and row and leaves no release; a small source reaches every actor; the
exactly-once check catches a lost or doubled partial."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradmm_ray.config import DataConfig
from gradmm_ray.io.real_data import (
    CapSummary,
    cap_priorities,
    check_head,
    load_real_examples,
    plan_source,
)


def reviews(n: int, start: int = 0) -> list[dict]:
    return [
        {
            "text": f"Review {i}: {'fine' if i % 3 else 'poor'} film.",
            "label": "positive" if i % 3 else "negative",
        }
        for i in range(start, start + n)
    ]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def mixed_folder(tmp_path):
    """Three files of three formats; the Parquet one in three row groups."""
    folder = tmp_path / "lake"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", reviews(40))
    pq.write_table(pa.Table.from_pylist(reviews(90, 40)), folder / "b.parquet", row_group_size=30)
    (folder / "c.csv").write_text(
        "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in reviews(50, 130))
    )
    return folder


def streamed(plan, data: DataConfig, *, seed: int, blocks: int = 8) -> pa.Table:
    from gradmm_ray.distributed.real_rows import cap_thresholds, real_rows

    thresholds = (
        cap_thresholds(plan, data, seed)[0] if data.per_class or data.max_examples else None
    )
    ds = real_rows(plan, data, blocks=blocks, thresholds=thresholds, cap_seed=seed)
    return pa.concat_tables(ds.iter_batches(batch_size=None, batch_format="pyarrow"))


def test_plan_lists_fragments_without_reading_rows(mixed_folder):
    """A folder plans to one fragment per JSON / CSV file and per Parquet row group, files in
    sorted order, Parquet row counts from the footer alone."""
    plan = plan_source(DataConfig(source=str(mixed_folder)))
    assert [(f.fmt, f.row_group, f.first_row, f.rows) for f in plan.fragments] == [
        ("json", None, 0, None),
        ("parquet", 0, 0, 30),
        ("parquet", 1, 30, 30),
        ("parquet", 2, 60, 30),
        ("csv", None, 0, None),
    ]
    assert [f.file_index for f in plan.fragments] == [0, 1, 1, 1, 2]


@pytest.mark.parametrize(
    "caps", [{}, {"per_class": 7}, {"max_examples": 25}, {"per_class": 40, "max_examples": 30}]
)
def test_stream_delivers_the_rows_the_in_memory_reader_keeps(ray_session, mixed_folder, caps):
    """Streamed over several fragments (caps by the two-pass threshold), the rows and their keys
    are exactly load_real_examples' (caps by sorting all priorities): one rule, two paths."""
    data = DataConfig(source=str(mixed_folder), **caps)
    plan = plan_source(data)
    got = streamed(plan, data, seed=3)
    want = load_real_examples(data, seed=3).table
    assert _pairs(got) == _pairs(want)
    assert len(set(got.column("key").to_pylist())) == got.num_rows
    if caps:  # another seed keeps other rows
        assert _pairs(streamed(plan, data, seed=4)) != _pairs(want)
    # Each row carries its fragment's count of its class: what the exactly-once check compares.
    for (frag, label), n in _counts(got).items():
        assert {e for f, lab, e in _rows(got) if (f, lab) == (frag, label)} == {n}


def _pairs(t) -> list:
    return sorted(zip(t.column("key").to_pylist(), t.column("text").to_pylist(), strict=True))


def _rows(t):
    return zip(*(t.column(c).to_pylist() for c in ("fragment", "label", "expected")), strict=True)


def _counts(t) -> dict:
    out: dict = {}
    for f, lab, _ in _rows(t):
        out[(f, lab)] = out.get((f, lab), 0) + 1
    return out


def test_cap_summary_merged_from_pieces_equals_whole():
    """The caps' first pass reduces blocks separately: merging their summaries gives the same
    counts, lowest priorities and thresholds as one summary of everything."""
    rng = np.random.default_rng(0)
    labels = rng.choice(["a", "b", "c"], size=500, p=[0.6, 0.3, 0.1])
    prio = cap_priorities(np.arange(500, dtype=np.uint64), seed=1)
    data = DataConfig(per_class=20, max_examples=45, verbalizers={"a": " a", "b": " b", "c": " c"})
    whole = CapSummary()
    whole.add(labels, prio, 20)
    merged = CapSummary()
    for lo, hi in ((0, 7), (7, 300), (300, 500)):
        part = CapSummary()
        part.add(labels[lo:hi], prio[lo:hi], 20)
        merged.merge(part, 20)
    assert merged.counts == whole.counts
    assert all(np.array_equal(merged.lowest[k], whole.lowest[k]) for k in whole.lowest)
    assert merged.thresholds(data) == whole.thresholds(data)
    kept = {k: int(((labels == k) & (prio <= t)).sum()) for k, t in whole.thresholds(data).items()}
    assert kept == {"a": 20, "b": 20, "c": 5} or sum(kept.values()) == 45


def test_head_check_stops_a_bad_first_file_before_ray(tmp_path):
    """The driver validates the first rows: a label the verbalizers do not know stops prepare."""
    from gradmm_ray.errors import DataError

    path = write_jsonl(tmp_path / "d.jsonl", [*reviews(3), {"text": "Odd.", "label": "neutral"}])
    with pytest.raises(DataError, match=r"d\.jsonl row 3: label 'neutral' has no entry"):
        check_head(plan_source(DataConfig(source=path)), DataConfig(source=path))


def test_bad_row_deep_in_the_data_fails_the_run_with_one_line(ray_session, tmp_path, capsys):
    """A blank text in the second file (past the driver's head check) fails stage 1 in the
    stream: exit 2, one line naming the file and its row, no release written."""
    from gradmm_ray.distill.cli import main

    folder = tmp_path / "lake"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", reviews(30))
    bad = reviews(20, 30)
    bad[13]["text"] = "   "
    write_jsonl(folder / "b.jsonl", bad)
    out = tmp_path / "out"
    code = main(
        ["--config", "tiny", "--data", str(folder), "--output", str(out), "--stages", "targets",
         "--set", "targets.max_actors=1", "--set", "targets.num_gpus=0"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("distill.py: error: ") and "Traceback" not in "\n".join(err)
    assert f"{folder / 'b.jsonl'} row 13: column 'text' is empty ('   ')" in err[-1]
    assert not (out / "targets.safetensors").exists()


def test_the_stream_runs_when_the_actors_hold_every_cpu(ray_session, tmp_path):
    """As on a 2-core machine with a 2-actor pool: the reads need no CPU of their own, so an
    actor pool holding every CPU still gets its input (with a CPU each they would wait forever;
    the stall timeout turns that into a failure here)."""
    from gradmm_ray.config import ExecutionConfig, TargetsConfig
    from gradmm_ray.distributed.ray_env import map_on_actor_pool
    from gradmm_ray.distributed.real_rows import real_rows

    class CountRows:  # local: pickled by value, workers cannot import test modules
        def __call__(self, batch: dict) -> dict:
            return {"rows": np.array([len(batch["key"])])}

    cpus = int(ray_session.cluster_resources()["CPU"])
    data = DataConfig(source=write_jsonl(tmp_path / "d.jsonl", reviews(40)))
    ctx = ray_session.data.DataContext.get_current()
    before, ctx.execution_no_progress_timeout_s = ctx.execution_no_progress_timeout_s, 60
    try:
        calls = map_on_actor_pool(
            real_rows(plan_source(data), data, blocks=8, thresholds=None, cap_seed=0),
            CountRows,
            constructor_kwargs={},
            pool=TargetsConfig(min_actors=cpus, max_actors=cpus, num_gpus=0, num_cpus=1),
            batch_size=5,
            execution=ExecutionConfig(),
        ).take_all()
    finally:
        ctx.execution_no_progress_timeout_s = before
    assert sum(c["rows"] for c in calls) == 40


def test_a_small_source_reaches_every_actor(ray_session, tmp_path):
    """One 60-row file and a pool of 2: the stream is cut so that both actors get calls (Ray
    would otherwise bundle the one small block into one call on one actor)."""
    from gradmm_ray.config import ExecutionConfig, TargetsConfig
    from gradmm_ray.distributed.ray_env import map_on_actor_pool
    from gradmm_ray.distributed.real_rows import real_rows, stream_shape

    class PidOfCall:  # local: pickled by value, workers cannot import test modules
        def __call__(self, batch: dict) -> dict:
            time.sleep(0.3)  # calls overlap, as model forwards would
            return {"pid": np.array([os.getpid()]), "rows": np.array([len(batch["key"])])}

    data = DataConfig(source=write_jsonl(tmp_path / "d.jsonl", reviews(60)))
    plan = plan_source(data)
    per_call, blocks = stream_shape(60, 4096, 2, 2)
    assert per_call < 60
    pool = TargetsConfig(min_actors=2, max_actors=2, num_gpus=0, num_cpus=1)
    calls = map_on_actor_pool(
        real_rows(plan, data, blocks=blocks, thresholds=None, cap_seed=0),
        PidOfCall,
        constructor_kwargs={},
        pool=pool,
        batch_size=per_call,
        execution=ExecutionConfig(),
    ).take_all()
    assert sum(c["rows"] for c in calls) == 60
    assert len({c["pid"] for c in calls}) == 2


def test_exactly_once_check_catches_a_lost_or_doubled_partial(mixed_folder):
    """The driver's check: counts per (fragment, class) against what each fragment holds, and
    Parquet fragments against their footers. Dropping or repeating one partial fails it."""
    from gradmm_ray.distributed.targets import ExactlyOnce

    plan = plan_source(DataConfig(source=str(mixed_folder)))
    partials = []  # (label, fragments JSON) as actors emit them: two calls per fragment
    for f in plan.fragments:
        rows = f.rows or 10
        for half in (rows // 2, rows - rows // 2):
            partials.append(("positive", json.dumps({f.index: [half, rows]})))
    seen = {"positive": sum(f.rows or 10 for f in plan.fragments)}

    def check(parts, seen=seen):
        once = ExactlyOnce(plan, None)
        for label, frags in parts:
            once.add(label, frags)
        once.check(seen)

    check(partials)
    for broken in (partials[1:], [*partials, partials[0]]):
        with pytest.raises(AssertionError, match="lost or double-counted"):
            check(broken)
    # A whole Parquet fragment lost (both its partials): its footer says it had rows.
    with pytest.raises(AssertionError, match="lost or double-counted"):
        check(partials[:2] + partials[4:])
