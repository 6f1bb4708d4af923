"""Real examples: plan, read, validate, key, cap. Pure pyarrow: Ray streams these pieces
(distributed/real_rows.py); the fine-tuning job and the tests call them in memory.

Sources (``data.source``):
  * ``sample``: the bundled movie reviews (``data.split`` = train or test);
  * a JSONL / JSON, CSV or Parquet file, or a folder of them, on any filesystem pyarrow knows
    (local paths, ``s3://``, ``gs://``, ...);
  * a folder written by ``datasets.Dataset.save_to_disk`` (a DatasetDict uses ``data.split``);
  * otherwise a Hugging Face Hub dataset id, loaded with ``data.split``.

Nothing here holds the whole data on the driver. ``plan_source`` lists the *fragments* (a file;
a Parquet row group; an Arrow file of a Hugging Face dataset) from listings and metadata only,
and ``check_head`` validates the first rows, so that the checks that are cheap and decisive
(files exist and are not empty, Parquet columns, the label column against the verbalizers) run
before any GPU is asked for. Every fragment is then read, validated and keyed where it is used;
a bad row anywhere fails with one line naming its file and row (``validate_table``).

Row keys: ``file index << 40 | row within the file``, files in sorted path order. A key is a
row's identity for the Poisson sample and the caps: it does not depend on how Ray cuts blocks,
so a retried block decides exactly as the first try did.

Caps (``data.per_class``, ``data.max_examples``): per class, the rows with the lowest seeded
priorities (a hash of the key) up to the class's quota (``class_quotas``). Streamed, that is
one pass that reduces each fragment to its class counts and lowest priorities, a threshold per
class, then a filter; in memory, the same rule applied to the whole table. Both keep the same rows.

Tokenisation rule for a training pair (used by the targets, the solver, the label check and
fine-tuning alike): the prompt is tokenised with the special tokens the tokenizer adds (BOS for
most causal LMs), the completion without any, and the two id lists are concatenated. The loss is
the mean cross-entropy over the completion tokens only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from gradmm_ray.config import DataConfig
from gradmm_ray.core.privacy import seeded_uniform_bits
from gradmm_ray.errors import DataError
from gradmm_ray.sample_data import sample_data_path

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
KEY_FILE_SHIFT = 40  # rows per file < 2**40, files < 2**24
CAP_STREAM = 2  # seeded_uniform_bits stream of the cap priorities (1 is the Poisson sample's)
HEAD_ROWS = 10_000  # rows the driver validates before the cluster starts
HEAD_BYTES = 8 << 20  # at most this much of a JSON / CSV file is parsed for them
NO_CAP = np.iinfo(np.uint64).max


# ---------------------------------------------------------------------------------------------
# Plan


def _is_uri(source: str) -> bool:
    return "://" in source


def _filesystem(source: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    if _is_uri(source):
        try:
            return pafs.FileSystem.from_uri(source)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"data.source {source!r}: cannot open ({_first_line(e)})") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(source))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else e.__class__.__name__


def looks_like_path(source: str) -> bool:
    return (
        _is_uri(source)
        or source.startswith(("/", "./", "../", "~"))
        or Path(source).suffix.lower() in FILE_FORMATS
        or os.path.exists(source)
    )


@dataclass(frozen=True)
class Fragment:
    """What one reader reads: a file, or one row group of a Parquet file."""

    index: int  # position in the plan
    file_index: int  # position of its file in sorted order: the high bits of its rows' keys
    path: str  # inside the plan's filesystem
    shown: str  # how messages name the file
    fmt: str  # json | csv | parquet | arrow (a Hugging Face dataset's IPC stream file)
    size_bytes: int
    row_group: int | None = None
    first_row: int = 0  # row within the file of the fragment's first row
    rows: int | None = None  # from metadata; None for JSON and CSV until read


@dataclass(frozen=True)
class SourcePlan:
    """The fragments of a source, from listings and metadata only."""

    name: str  # for messages: data.source, or the bundled file's name
    uri: str | None  # the source URI when remote; None: files on the driver's disk
    fragments: tuple[Fragment, ...]
    class_names: dict[str, tuple[str, ...]] = field(default_factory=dict)  # ClassLabel names
    single_file: bool = True  # read_table keeps every column of a single file

    def filesystem(self) -> pafs.FileSystem:
        return _filesystem(self.uri)[0] if self.uri else pafs.LocalFileSystem()

    def estimated_rows(self, bytes_per_row: float) -> int:
        """Rows from metadata where known, else from the file size."""
        return sum(
            f.rows if f.rows is not None else int(f.size_bytes / max(bytes_per_row, 1.0))
            for f in self.fragments
        )


def _required_columns(cfg: DataConfig) -> dict[str, str]:
    return {"data.text_column": cfg.text_column, "data.label_column": cfg.label_column}


def _check_columns(columns: Sequence[str], required: dict[str, str], shown: str) -> None:
    for key, col in required.items():
        if col not in columns:
            raise DataError(
                f"{shown}: column {col!r} not found (columns: {', '.join(columns)}); set {key}"
            )


def plan_source(cfg: DataConfig, *, check_columns: bool = True) -> SourcePlan:
    """The fragments of ``data.source``; DataError for a source that does not exist, an empty
    file, an unknown format, or (``check_columns``) a file or dataset without the text and
    label columns (JSON / CSV: on the first line)."""
    required = _required_columns(cfg) if check_columns else {}
    if cfg.source == "sample":
        path = sample_data_path(cfg.split)
        return _plan_files(pafs.LocalFileSystem(), [str(path)], path.name, None, required, {})
    if not looks_like_path(cfg.source):
        return _plan_dataset(_load_hub(cfg.source, cfg.split), cfg.source, cfg.split, required)
    fs, root = _filesystem(cfg.source)
    info = fs.get_file_info(root)
    uri = cfg.source if _is_uri(cfg.source) else None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data.source {cfg.source!r}: file or folder does not exist")
    if info.type == pafs.FileType.File:
        if Path(root).suffix.lower() not in FILE_FORMATS:
            raise DataError(
                f"data.source {cfg.source!r}: unknown file format {Path(root).suffix!r}, "
                f"expected one of {sorted(FILE_FORMATS)}"
            )
        return _plan_files(fs, [root], cfg.source, uri, required, {root: cfg.source})
    if any(
        fs.get_file_info(f"{root}/{marker}").type == pafs.FileType.File
        for marker in ("dataset_info.json", "dataset_dict.json")
    ):
        import datasets

        return _plan_dataset(datasets.load_from_disk(cfg.source), cfg.source, cfg.split, required)
    files = sorted(
        f.path
        for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if f.type == pafs.FileType.File
        and not f.base_name.startswith(".")
        and Path(f.path).suffix.lower() in FILE_FORMATS
    )
    if not files:
        raise DataError(
            f"data.source {cfg.source!r}: folder holds no .jsonl, .json, .csv or .parquet files"
        )
    shown = {p: cfg.source.rstrip("/") + p[len(root) :] if uri else p for p in files}
    plan = _plan_files(fs, files, cfg.source, uri, required, shown)
    return SourcePlan(plan.name, plan.uri, plan.fragments, single_file=False)


def _plan_files(
    fs: pafs.FileSystem,
    paths: list[str],
    name: str,
    uri: str | None,
    required: dict[str, str],
    shown: dict[str, str],
) -> SourcePlan:
    infos = fs.get_file_info(paths)
    for path, info in zip(paths, infos, strict=True):
        if info.size == 0:
            raise DataError(f"{shown.get(path, path)}: the dataset is empty (0 bytes)")
    with ThreadPoolExecutor(max_workers=16) as pool:  # one small read per file: latency-bound
        heads = dict(zip(paths, pool.map(lambda p: _file_head(fs, p), paths), strict=True))
    fragments: list[Fragment] = []
    for file_index, (path, info) in enumerate(zip(paths, infos, strict=True)):
        where, fmt = shown.get(path, path), FILE_FORMATS[Path(path).suffix.lower()]
        if fmt != "parquet":
            if heads[path] is not None:  # the first line's keys or the header's names
                _check_columns(heads[path], required, where)
            fragments.append(Fragment(len(fragments), file_index, path, where, fmt, info.size))
            continue
        meta = heads[path]
        if isinstance(meta, Exception):
            raise DataError(f"{where}: cannot read as PARQUET ({_first_line(meta)})")
        _check_columns(meta.schema.names, required, where)
        first = 0
        for rg in range(meta.num_row_groups):
            rows = meta.row_group(rg).num_rows
            size = meta.row_group(rg).total_byte_size
            fragments.append(
                Fragment(len(fragments), file_index, path, where, fmt, size, rg, first, rows)
            )
            first += rows
    return SourcePlan(name, uri, tuple(fragments))


def _file_head(fs: pafs.FileSystem, path: str, head_bytes: int = 1 << 16):
    """A Parquet file's footer (or the exception reading it), or the column names on a JSON /
    CSV file's first line (None when that line does not parse: the full read names the
    problem)."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fmt = FILE_FORMATS[Path(path).suffix.lower()]
    try:
        if fmt == "parquet":
            with fs.open_input_file(path) as f:
                return pq.read_metadata(f)
        with fs.open_input_stream(path) as f:
            first = f.read(head_bytes).split(b"\n", 1)[0] + b"\n"
        if fmt == "json":
            return pajson.read_json(pa.BufferReader(first)).column_names
        return pacsv.read_csv(pa.BufferReader(first)).column_names  # the header: no rows
    except (OSError, pa.ArrowException, ValueError) as e:
        return e if fmt == "parquet" else None


def _load_hub(source: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # the hub raises many types; all mean "cannot load this id"
        raise DataError(
            f"data.source {source!r}: not a local file or folder, and not loadable as a Hugging Face "
            f"dataset ({_first_line(e)})"
        ) from None


def _plan_dataset(ds, source: str, split: str, required: dict[str, str]) -> SourcePlan:
    """A datasets.Dataset (hub or save_to_disk) by its Arrow files on the driver's disk; its
    ClassLabel columns keep their names."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"data.source {source!r}: split {split!r} not found (splits: {', '.join(ds)}); set data.split"
            )
        ds = ds[split]
    _check_columns(ds.column_names, required, source)
    if ds._indices is not None:  # a selected or shuffled view: the files hold other rows
        ds = ds.flatten_indices()
    names = {
        col: tuple(feat.names)
        for col, feat in ds.features.items()
        if isinstance(feat, datasets.ClassLabel)
    }
    fragments = []
    for i, entry in enumerate(ds.cache_files):
        path = entry["filename"]
        with pa.memory_map(path) as f:  # counting an IPC stream's rows maps it, reads nothing
            rows = sum(b.num_rows for b in pa.ipc.open_stream(f))
        fragments.append(Fragment(i, i, path, source, "arrow", os.path.getsize(path), rows=rows))
    if not fragments:
        raise DataError(f"data.source {source!r}: the dataset has no files on disk")
    return SourcePlan(source, None, tuple(fragments), names)


# ---------------------------------------------------------------------------------------------
# Reading


def read_fragment(
    plan: SourcePlan,
    frag: Fragment,
    columns: dict[str, str] | None,
    limit: int | None = None,
) -> pa.Table:
    """The fragment's rows (its first ``limit`` rows at least, when given), only ``columns``
    (setting -> name; each checked, naming the file) or all of them."""
    fs = plan.filesystem()
    names = list(dict.fromkeys(columns.values())) if columns else None
    if frag.fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open_input_file(frag.path) as f:
            pf = pq.ParquetFile(f)
            if limit is None:
                table = pf.read_row_group(frag.row_group, columns=names)
            else:
                batch = next(
                    pf.iter_batches(batch_size=limit, row_groups=[frag.row_group], columns=names),
                    None,
                )
                table = (
                    pa.Table.from_batches([batch])
                    if batch is not None
                    else pf.schema_arrow.empty_table()
                )
    elif frag.fmt == "arrow":
        batches = []
        with pa.memory_map(frag.path) as f:
            for batch in pa.ipc.open_stream(f):
                batches.append(batch)
                if limit is not None and sum(b.num_rows for b in batches) >= limit:
                    break
            table = (
                pa.Table.from_batches(batches)
                if batches
                else pa.ipc.open_stream(f).schema.empty_table()
            )
        table = table.combine_chunks()  # a copy: the table outlives the mapping
    else:
        table = _read_text_file(fs, frag, head_bytes=HEAD_BYTES if limit is not None else None)
    if columns:
        _check_columns(table.column_names, columns, frag.shown)
        table = table.select(names)
    if plan.class_names:
        meta = dict(table.schema.metadata or {})
        for col, label_names in plan.class_names.items():
            meta[f"gradmm.class_names.{col}".encode()] = "\x1f".join(label_names).encode()
        table = table.replace_schema_metadata(meta)
    return table


def _read_text_file(fs, frag: Fragment, *, head_bytes: int | None) -> pa.Table:
    """A JSON or CSV file, or its first ``head_bytes`` cut at a line end (the driver's check)."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    try:
        with fs.open_input_stream(frag.path) as f:
            data = f.read(head_bytes + 1) if head_bytes is not None else f.read()
        if head_bytes is not None and len(data) > head_bytes:
            cut = data.rfind(b"\n", 0, head_bytes)
            if cut > 0:
                data = data[: cut + 1]
            else:  # one line longer than the head: the whole file
                with fs.open_input_stream(frag.path) as f:
                    data = f.read()
        buffer = pa.BufferReader(data)
        # Strings only, whatever their look: a label column of "1"/"0" stays text.
        table = pacsv.read_csv(buffer) if frag.fmt == "csv" else pajson.read_json(buffer)
        # Neither reader rejects bytes that are not UTF-8: CSV makes such a column binary, JSON
        # keeps them in a string column (full validation checks UTF-8), and a bad column name
        # fails only when Python decodes it.
        _ = table.column_names
        if any(pa.types.is_binary(t) for t in table.schema.types):
            raise UnicodeError("a column holds bytes that are not UTF-8")
        table.validate(full=True)
        return table
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as e:
        _check_utf8(fs, frag.path, frag.shown)  # the usual cause; raises naming the line
        raise DataError(
            f"{frag.shown}: cannot read as {frag.fmt.upper()} ({_first_line(e)})"
        ) from None


def _check_utf8(fs, path: str, shown: str, chunk_bytes: int = 1 << 24) -> None:
    """Raise DataError naming the first line of a text file that is not UTF-8. Runs only after
    a read failed, so the file is scanned a second time only then."""
    line_no, pending = 1, b""
    with fs.open_input_stream(path) as f:
        while True:
            chunk = f.read(chunk_bytes)
            # b"\n" never occurs inside a multi-byte UTF-8 character: splitting there is safe.
            *lines, pending = (pending + chunk).split(b"\n")
            if not chunk:
                lines.append(pending)
            for line in lines:
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{shown} line {line_no}: not UTF-8 text (byte 0x{line[e.start]:02x} at "
                        f"byte {e.start + 1} of the line); save the file as UTF-8"
                    ) from None
                line_no += 1
            if not chunk:
                return


def read_table(cfg: DataConfig) -> tuple[pa.Table, str]:
    """The whole source in memory (for small inputs: fine-tuning's files and splits) and a
    short name for messages. A single file keeps all its columns; a folder the two it needs."""
    plan = plan_source(cfg, check_columns=False)  # a single file's columns are the caller's
    columns = None if plan.single_file else _required_columns(cfg)
    tables = [read_fragment(plan, f, columns) for f in plan.fragments]
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(
            f"data.source {cfg.source!r}: files have incompatible columns ({_first_line(e)})"
        ) from None
    return table, plan.name


# ---------------------------------------------------------------------------------------------
# Validation


def _class_names(table: pa.Table, column: str, cfg: DataConfig) -> Sequence[str] | None:
    if cfg.label_names is not None:
        return cfg.label_names
    raw = (table.schema.metadata or {}).get(f"gradmm.class_names.{column}".encode())
    return raw.decode().split("\x1f") if raw else None


def _first_true(mask: pa.ChunkedArray | pa.Array) -> int | None:
    index = pc.index(pc.fill_null(mask, True), True).as_py()
    return None if index < 0 else index


def validate_table(
    table: pa.Table, cfg: DataConfig, shown: str, *, first_row: int = 0, allow_empty: bool = False
) -> pa.Table:
    """Check the columns and every row (vectorised); return ``row`` (``first_row`` + position),
    ``text`` and ``label`` (the label's name), or raise DataError naming the first bad row."""
    _check_columns(table.column_names, _required_columns(cfg), shown)
    if table.num_rows == 0 and not allow_empty:
        raise DataError(f"{shown}: the dataset is empty (0 rows)")

    text = table.column(cfg.text_column)
    if not pa.types.is_string(text.type) and not pa.types.is_large_string(text.type):
        i = _first_true(pc.invert(pc.is_null(text))) or 0
        raise DataError(
            f"{shown} row {first_row + i}: column {cfg.text_column!r} holds {text.type} values "
            f"(e.g. {text[i].as_py() if len(text) else None!r}), expected strings"
        )
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0)
    i = _first_true(blank)
    if i is not None:
        raise DataError(
            f"{shown} row {first_row + i}: column {cfg.text_column!r} is empty ({text[i].as_py()!r})"
        )

    label = table.column(cfg.label_column)
    known = list(cfg.verbalizers)
    if pa.types.is_integer(label.type):
        names = _class_names(table, cfg.label_column, cfg)
        if names is None:
            raise DataError(
                f"{shown}: column {cfg.label_column!r} holds integer labels; set data.label_names to name them (e.g. [negative, positive])"
            )
        outside = pc.or_(pc.less(label, 0), pc.greater_equal(label, len(names)))
        i = _first_true(outside)
        if i is not None:
            raise DataError(
                f"{shown} row {first_row + i}: label {label[i].as_py()!r} is outside "
                f"data.label_names (0..{len(names) - 1})"
            )
        labels = pc.take(pa.array(list(names), pa.string()), label)
    elif pa.types.is_string(label.type) or pa.types.is_large_string(label.type):
        labels = label.cast(pa.string())
        if cfg.label_names is not None:
            known = [n for n in known if n in cfg.label_names]
    else:
        raise DataError(
            f"{shown}: column {cfg.label_column!r} holds {label.type} values, expected strings or integers"
        )
    i = _first_true(pc.invert(pc.is_in(labels, value_set=pa.array(known, pa.string()))))
    if i is not None:
        lab = labels[i].as_py()
        where = (
            "data.label_names"
            if cfg.label_names is not None and lab not in cfg.label_names
            else "data.verbalizers"
        )
        raise DataError(
            f"{shown} row {first_row + i}: label {lab!r} has no entry in {where} (known: {', '.join(known)})"
        )
    return pa.table(
        {
            "row": pa.array(np.arange(first_row, first_row + table.num_rows, dtype=np.int64)),
            "text": text.cast(pa.string()),
            "label": labels,
        }
    )


def fragment_rows(plan: SourcePlan, frag: Fragment, cfg: DataConfig) -> pa.Table:
    """One fragment read and validated: ``key``, ``text``, ``label``."""
    try:
        raw = read_fragment(plan, frag, _required_columns(cfg))
    except FileNotFoundError:
        import socket

        raise DataError(
            f"{frag.shown}: not found on {socket.gethostname()}: a local data.source must be "
            "readable on every node that runs stage 1 (a shared filesystem or the job's working "
            "directory); or give an s3:// / gs:// URI"
        ) from None
    rows = validate_table(raw, cfg, frag.shown, first_row=frag.first_row, allow_empty=True)
    keys = (np.uint64(frag.file_index) << np.uint64(KEY_FILE_SHIFT)) + rows.column(
        "row"
    ).to_numpy().astype(np.uint64)
    return pa.table({"key": keys, "text": rows.column("text"), "label": rows.column("label")})


def check_head(plan: SourcePlan, cfg: DataConfig) -> float:
    """Validate the first fragment's first rows on the driver: a systematic problem (a wrong
    column, labels the verbalizers do not know, integer labels without names) stops the run
    before the cluster starts (and, when these rows are the whole source, a class with fewer
    than 2). Returns file bytes per row (to size the stream for JSON and CSV)."""
    frag = plan.fragments[0]
    raw = read_fragment(plan, frag, _required_columns(cfg), limit=HEAD_ROWS)
    only = len(plan.fragments) == 1 or all(f.rows == 0 for f in plan.fragments)
    shown = frag.shown if len(plan.fragments) == 1 else plan.name
    if only and raw.num_rows == 0:
        raise DataError(f"{shown}: the dataset is empty (0 rows)")
    rows = validate_table(raw, cfg, frag.shown, first_row=frag.first_row, allow_empty=True)
    whole = raw.num_rows == frag.rows if frag.rows is not None else frag.size_bytes <= HEAD_BYTES
    if len(plan.fragments) == 1 and whole:  # the head is all the data: count its classes now
        labels = rows.column("label").to_numpy(zero_copy_only=False)
        check_class_counts({lab: int((labels == lab).sum()) for lab in cfg.verbalizers}, cfg, shown)
    # File bytes per row (what estimated_rows divides): the parsed head's, exact for a whole file.
    parsed = frag.size_bytes if whole else min(frag.size_bytes, HEAD_BYTES)
    return parsed / max(raw.num_rows, 1)


# ---------------------------------------------------------------------------------------------
# Caps


def class_quotas(
    counts: dict[str, int], *, per_class: int | None, max_examples: int | None
) -> dict[str, int]:
    """Rows kept per class: ``per_class`` caps each class; ``max_examples`` then shrinks classes
    in proportion (largest remainder), keeping >= 2 each (or the whole class when smaller)."""
    take = {lab: n if per_class is None else min(n, per_class) for lab, n in counts.items()}
    total = sum(take.values())
    if max_examples is None or total <= max_examples:
        return take
    sizes = dict(take)
    quotas = {lab: n * max_examples / total for lab, n in sizes.items()}
    take = {lab: min(sizes[lab], max(2, int(q))) for lab, q in quotas.items()}
    # Raising small classes to 2 is paid for by the classes most above their quota.
    while sum(take.values()) > max_examples and any(n > 2 for n in take.values()):
        lab = max((k for k in take if take[k] > 2), key=lambda k: take[k] - quotas[k])
        take[lab] -= 1
    leftover = max_examples - sum(take.values())
    for lab in sorted(quotas, key=lambda k: quotas[k] - int(quotas[k]), reverse=True):
        if leftover <= 0:
            break
        if take[lab] < sizes[lab]:
            take[lab] += 1
            leftover -= 1
    return take


def stratified_sample(
    labels: Sequence[str], *, per_class: int | None, max_examples: int | None, seed: int
) -> np.ndarray:
    """Indices of a seeded, stratified sample of a list of labels (sorted), ``class_quotas``
    rows of each class, for splits made in memory (fine-tuning, the quality benchmark)."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    by_class = {
        lab: rng.permutation(np.flatnonzero(labels_arr == lab)) for lab in sorted(set(labels))
    }
    take = class_quotas(
        {lab: len(idx) for lab, idx in by_class.items()},
        per_class=per_class,
        max_examples=max_examples,
    )
    return np.sort(np.concatenate([idx[: take[lab]] for lab, idx in by_class.items()]))


def has_caps(cfg: DataConfig) -> bool:
    return cfg.per_class is not None or cfg.max_examples is not None


def cap_depth(cfg: DataConfig) -> int:
    """No class keeps more rows than this: the lowest priorities each fragment must report."""
    return min(n for n in (cfg.per_class, cfg.max_examples) if n is not None)


def cap_priorities(keys: np.ndarray, seed: int) -> np.ndarray:
    return seeded_uniform_bits(seed, CAP_STREAM, keys)


@dataclass
class CapSummary:
    """Per class: rows seen and the ``depth`` lowest cap priorities (sorted)."""

    counts: dict[str, int] = field(default_factory=dict)
    lowest: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, labels: np.ndarray, priorities: np.ndarray, depth: int) -> None:
        for lab in np.unique(labels):
            mine = priorities[labels == lab]
            lab = str(lab)
            self.counts[lab] = self.counts.get(lab, 0) + len(mine)
            merged = np.concatenate([self.lowest.get(lab, mine[:0]), mine])
            self.lowest[lab] = np.sort(merged)[:depth]

    def merge(self, other: CapSummary, depth: int) -> None:
        for lab, n in other.counts.items():
            self.counts[lab] = self.counts.get(lab, 0) + n
            merged = np.concatenate(
                [self.lowest.get(lab, other.lowest[lab][:0]), other.lowest[lab]]
            )
            self.lowest[lab] = np.sort(merged)[:depth]

    def thresholds(self, cfg: DataConfig) -> dict[str, int]:
        """The highest priority each class keeps (every row of a class under its quota)."""
        quotas = class_quotas(self.counts, per_class=cfg.per_class, max_examples=cfg.max_examples)
        return {
            lab: int(self.lowest[lab][q - 1]) if q < self.counts[lab] else int(NO_CAP)
            for lab, q in quotas.items()
        }


def within_caps(
    labels: np.ndarray, priorities: np.ndarray, thresholds: dict[str, int]
) -> np.ndarray:
    limit = np.array([thresholds.get(str(lab), 0) for lab in labels], dtype=np.uint64)
    return priorities <= limit


# ---------------------------------------------------------------------------------------------
# In memory


@dataclass(frozen=True)
class RealExamples:
    """Validated, capped real rows in memory (small inputs only: the fine-tuning job, the
    opt-in audit, tests). ``table``: ``row`` (index in the source, files in order), ``key``,
    ``text`` and ``label`` (a key of ``data.verbalizers``). Stage 1 streams the same rows
    instead (distributed/real_rows.py)."""

    table: pa.Table
    source_name: str
    counts: dict[str, int]  # label -> rows kept. Private: for internal checks only.


def check_class_counts(counts: dict[str, int], cfg: DataConfig, shown: str) -> None:
    for lab in cfg.verbalizers:
        n = counts.get(lab, 0)
        if n < 2:
            raise DataError(
                f"{shown}: class {lab!r} has {n} example(s) after sampling, expected at least 2"
            )


def load_real_examples(cfg: DataConfig, seed: int) -> RealExamples:
    """Read, validate and cap the whole source in memory; DataError naming any problem."""
    plan = plan_source(cfg)
    parts, offset = [], 0
    for frag in plan.fragments:
        rows = fragment_rows(plan, frag, cfg)
        parts.append(rows.append_column("row", pa.array(np.arange(offset, offset + rows.num_rows))))
        offset += rows.num_rows
    table = pa.concat_tables(parts).select(["row", "key", "text", "label"])
    if table.num_rows == 0:
        raise DataError(f"{plan.name}: the dataset is empty (0 rows)")
    labels = table.column("label").to_numpy(zero_copy_only=False)
    if has_caps(cfg):
        priorities = cap_priorities(table.column("key").to_numpy(), seed)
        summary = CapSummary()
        summary.add(labels, priorities, cap_depth(cfg))
        keep = within_caps(labels, priorities, summary.thresholds(cfg))
        table, labels = table.filter(pa.array(keep)), labels[keep]
    counts = {lab: int((labels == lab).sum()) for lab in cfg.verbalizers}
    check_class_counts(counts, cfg, plan.name)
    return RealExamples(table=table, source_name=plan.name, counts=counts)
