"""The real rows as a Ray Data stream: stage 1's input, never held on the driver.

One read task per fragment (``io.real_data.plan_source``: a file, or a Parquet row group). It
reads, validates and keys its fragment, applies the caps, and stamps every row with its
fragment and the number of rows of its class that the fragment holds, so that the driver can
check that each row was counted exactly once without ever seeing the rows. Ray Data's built-in
readers give no row position, which the keys (Poisson sample, caps) and the bad-row messages
need; underneath they and this use the same pyarrow readers. Read tasks run on whichever node
Ray picks: an ``s3://`` / ``gs://`` source is read from any node, a local path (Ray's convention,
as for its own readers) only where every node sees it (a shared filesystem, the job's working
directory, the bundled sample).

With caps (``data.per_class`` / ``data.max_examples``), a first pass reduces every fragment to
its class counts and lowest cap priorities (a few numbers per class), and the driver turns them
into one threshold per class; the second pass keeps the rows under it (io.real_data, "Caps").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from tqdm.auto import tqdm

from gradmm_ray.config import DataConfig, TargetsConfig
from gradmm_ray.io.real_data import (
    CapSummary,
    SourcePlan,
    cap_depth,
    cap_priorities,
    check_class_counts,
    class_quotas,
    fragment_rows,
    has_caps,
    within_caps,
)


class RealRowsDatasource(Datasource):
    """Rows ``key``, ``text``, ``label``, ``fragment`` and ``expected`` (rows of the row's class
    in its fragment after the caps); with ``thresholds`` only the rows under them."""

    def __init__(
        self,
        plan: SourcePlan,
        data: DataConfig,
        *,
        thresholds: dict[str, int] | None = None,
        cap_seed: int = 0,
    ):
        super().__init__()
        self.plan, self.data, self.thresholds, self.cap_seed = plan, data, thresholds, cap_seed

    def estimate_inmemory_data_size(self) -> int:
        return sum(f.size_bytes for f in self.plan.fragments)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        return [
            ReadTask(
                functools.partial(
                    _read_fragment, self.plan, i, self.data, self.thresholds, self.cap_seed
                ),
                BlockMetadata(
                    num_rows=f.rows if self.thresholds is None else None,
                    size_bytes=f.size_bytes,
                    input_files=[f.shown],
                    exec_stats=None,
                ),
            )
            for i, f in enumerate(self.plan.fragments)
        ]


def _read_fragment(
    plan: SourcePlan,
    index: int,
    data: DataConfig,
    thresholds: dict[str, int] | None,
    cap_seed: int,
) -> Iterator[pa.Table]:
    rows = fragment_rows(plan, plan.fragments[index], data)  # DataError names file and row
    labels = rows.column("label").to_numpy(zero_copy_only=False)
    if thresholds is not None:
        keep = within_caps(
            labels, cap_priorities(rows.column("key").to_numpy(), cap_seed), thresholds
        )
        rows, labels = rows.filter(pa.array(keep)), labels[keep]
    if rows.num_rows == 0:
        return
    names, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    yield rows.append_column(
        "fragment", pa.array(np.full(rows.num_rows, index, dtype=np.int32))
    ).append_column("expected", pa.array(counts[inverse].astype(np.int64)))


def _cap_summary(block: pa.Table, *, depth: int, seed: int) -> pa.Table:
    """A block reduced to its class counts and ``depth`` lowest cap priorities."""
    summary = CapSummary()
    summary.add(
        block.column("label").to_numpy(zero_copy_only=False),
        cap_priorities(block.column("key").to_numpy(), seed),
        depth,
    )
    labels = sorted(summary.counts)
    return pa.table(
        {
            "label": pa.array(labels, pa.string()),
            "count": pa.array([summary.counts[lab] for lab in labels], pa.int64()),
            "lowest": pa.array([summary.lowest[lab] for lab in labels], pa.list_(pa.uint64())),
        }
    )


def cap_thresholds(
    plan: SourcePlan, data: DataConfig, seed: int
) -> tuple[dict[str, int], dict[str, int]]:
    """(threshold per class, rows each class keeps): the caps' first pass, run on the cluster;
    the driver holds a few numbers per class. DataError when a class keeps fewer than 2."""
    depth = cap_depth(data)
    ds = ray.data.read_datasource(
        RealRowsDatasource(plan, data), override_num_blocks=len(plan.fragments), num_cpus=0
    ).map_batches(
        _cap_summary,
        fn_kwargs={"depth": depth, "seed": seed},
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=0.5,
    )
    summary = CapSummary()
    with tqdm(desc="caps: class counts", unit=" blocks") as bar:  # counts only: rows are private
        for part in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in part.to_pylist():
                block = CapSummary(
                    {row["label"]: row["count"]},
                    {row["label"]: np.asarray(row["lowest"], dtype=np.uint64)},
                )
                summary.merge(block, depth)
            bar.update(1)
    kept = class_quotas(summary.counts, per_class=data.per_class, max_examples=data.max_examples)
    check_class_counts(kept, data, plan.name)
    return summary.thresholds(data), kept


def real_rows(
    plan: SourcePlan,
    data: DataConfig,
    *,
    blocks: int,
    thresholds: dict[str, int] | None,
    cap_seed: int,
) -> ray.data.Dataset:
    """The stream, cut into at least ``blocks`` blocks (Ray splits each fragment's rows when
    there are fewer fragments, so that a small source still reaches every actor)."""
    return ray.data.read_datasource(
        RealRowsDatasource(plan, data, thresholds=thresholds, cap_seed=cap_seed),
        override_num_blocks=max(blocks, len(plan.fragments)),
        # Reads are light next to the model: 0 CPUs, so that a pool of actors holding every
        # CPU (a 2-core machine, or a cluster's CPU nodes) cannot starve its own input.
        num_cpus=0,
    )


def stream_shape(
    estimated_rows: int, rows_per_partial: int, min_rows: int, max_actors: int
) -> tuple[int, int]:
    """(rows per actor call, blocks): 4 calls per actor (so that every actor gets work, and the
    driver's partials scale with the pool, not the rows), each of at most ``rows_per_partial``
    rows (a call's memory, and what a retry re-runs)."""
    per_call = max(min_rows, min(rows_per_partial, math.ceil(estimated_rows / (4 * max_actors))))
    return per_call, max(1, math.ceil(estimated_rows / per_call))


@dataclass
class PoolStream:
    """The real rows cut for a pool: the dataset, rows per actor call, the rows expected (exact
    for Parquet or capped sources, else estimated from file sizes), and, when capped, the rows
    each class keeps."""

    rows: ray.data.Dataset
    per_call: int
    expected_rows: int
    kept: dict[str, int] | None


def stream_for_pool(
    plan: SourcePlan, data: DataConfig, pool: TargetsConfig, *, seed: int, bytes_per_row: float
) -> PoolStream:
    """The caps' first pass when capped, then the stream shaped for ``pool`` (stage 1's and the
    audit's: the same rows, the same cut)."""
    thresholds, kept = cap_thresholds(plan, data, seed) if has_caps(data) else (None, None)
    expected = sum(kept.values()) if kept else plan.estimated_rows(bytes_per_row)
    per_call, blocks = stream_shape(
        expected, pool.rows_per_partial, pool.micro_batch_size, pool.max_actors
    )
    rows = real_rows(plan, data, blocks=blocks, thresholds=thresholds, cap_seed=seed)
    return PoolStream(rows, per_call, expected, kept)
