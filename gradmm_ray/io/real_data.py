"""Real examples: read, validate, sample, template, tokenise.

Sources (``data.source``):
  * ``sample``: the bundled movie reviews (``data.split`` = train or test);
  * a JSONL / JSON, CSV or Parquet file, or a folder of them, on any filesystem pyarrow knows
    (local paths, ``s3://``, ``gs://``, ...);
  * a folder written by ``datasets.Dataset.save_to_disk`` (a DatasetDict uses ``data.split``);
  * otherwise a Hugging Face Hub dataset id, loaded with ``data.split``.

Everything is read into one Arrow table of ``text`` and ``label`` (the label's name) on the
driver and validated row by row before any cluster work starts, so that a bad row is reported
with its file, column, row and value instead of failing inside an actor an hour later.

Tokenisation rule for a training pair (used by the targets, the solver, the label check and
fine-tuning alike): the prompt is tokenised with the special tokens the tokenizer adds (BOS for
most causal LMs), the completion without any, and the two id lists are concatenated. The loss is
the mean cross-entropy over the completion tokens only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from gradmm_ray.config import DataConfig
from gradmm_ray.errors import DataError
from gradmm_ray.sample_data import sample_data_path

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


# ---------------------------------------------------------------------------------------------
# Reading


def _is_uri(source: str) -> bool:
    return "://" in source


def _filesystem(source: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs

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


def _read_file(fs, path: str, fmt: str, shown: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    if fs.get_file_info(path).size == 0:
        raise DataError(f"{shown}: the dataset is empty (0 bytes)")
    try:
        if fmt == "parquet":
            return pq.read_table(path, filesystem=fs)
        with fs.open_input_stream(path) as f:
            # Strings only, whatever their look: a label column of "1"/"0" stays text.
            table = pacsv.read_csv(f) if fmt == "csv" else pajson.read_json(f)
        # Neither reader rejects bytes that are not UTF-8: CSV makes such a column binary, JSON
        # keeps them in a string column (full validation checks UTF-8), and a bad column name
        # fails only when Python decodes it.
        _ = table.column_names
        if any(pa.types.is_binary(t) for t in table.schema.types):
            raise UnicodeError("a column holds bytes that are not UTF-8")
        table.validate(full=True)
        return table
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as e:
        if fmt != "parquet":
            _check_utf8(fs, path, shown)  # the usual cause; raises naming the line
        raise DataError(f"{shown}: cannot read as {fmt.upper()} ({_first_line(e)})") from None


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


def _read_path(source: str, required: dict[str, str]) -> pa.Table:
    """One table from a file or a folder of files; ``required`` maps each needed column's
    setting to its name, checked per file so that the file lacking one is named."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data.source {source!r}: file or folder does not exist")
    if info.type == pafs.FileType.Directory:
        if fs.get_file_info(f"{path}/dataset_info.json").type == pafs.FileType.File or (
            fs.get_file_info(f"{path}/dataset_dict.json").type == pafs.FileType.File
        ):
            return _read_hf_disk(source, None)
        files = [
            f
            for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if f.type == pafs.FileType.File and Path(f.path).suffix.lower() in FILE_FORMATS
        ]
        if not files:
            raise DataError(
                f"data.source {source!r}: folder holds no .jsonl, .json, .csv or .parquet files"
            )
        tables = []
        for f in sorted(files, key=lambda f: f.path):
            table = _read_file(fs, f.path, FILE_FORMATS[Path(f.path).suffix.lower()], f.path)
            _check_columns(table, required, f.path)
            # Only the needed columns: other columns may differ between files.
            tables.append(table.select(list(required.values())))
        try:
            return pa.concat_tables(tables, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise DataError(
                f"data.source {source!r}: files have incompatible columns ({_first_line(e)})"
            ) from None
    fmt = FILE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise DataError(
            f"data.source {source!r}: unknown file format {Path(path).suffix!r}, expected one of {sorted(FILE_FORMATS)}"
        )
    return _read_file(fs, path, fmt, source)


def _read_hf_disk(source: str, split: str | None) -> pa.Table:
    import datasets

    ds = datasets.load_from_disk(source)
    return _hf_to_table(ds, source, split)


def _hf_to_table(ds, source: str, split: str | None) -> pa.Table:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"data.source {source!r}: split {split!r} not found (splits: {', '.join(ds)}); set data.split"
            )
        ds = ds[split]
    table = ds.data.table if hasattr(ds.data, "table") else ds.with_format("arrow")[:]
    # Integer labels with ClassLabel names: keep the names with the table.
    names = {
        col: feat.names
        for col, feat in ds.features.items()
        if isinstance(feat, datasets.ClassLabel)
    }
    meta = dict(table.schema.metadata or {})
    for col, label_names in names.items():
        meta[f"gradmm.class_names.{col}".encode()] = "\x1f".join(label_names).encode()
    return table.replace_schema_metadata(meta)


def _read_hub(source: str, split: str) -> pa.Table:
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # the hub raises many types; all mean "cannot load this id"
        raise DataError(
            f"data.source {source!r}: not a local file or folder, and not loadable as a Hugging Face "
            f"dataset ({_first_line(e)})"
        ) from None
    return _hf_to_table(ds, source, None)


def read_table(cfg: DataConfig) -> tuple[pa.Table, str]:
    """The raw table and a short name for messages."""
    if cfg.source == "sample":
        path = sample_data_path(cfg.split)
        return _read_path(str(path), _required_columns(cfg)), path.name
    if looks_like_path(cfg.source):
        fs, path = _filesystem(cfg.source)
        import pyarrow.fs as pafs

        if fs.get_file_info(path).type == pafs.FileType.Directory and (
            fs.get_file_info(f"{path}/dataset_dict.json").type == pafs.FileType.File
        ):
            return _read_hf_disk(cfg.source, cfg.split), cfg.source
        return _read_path(cfg.source, _required_columns(cfg)), cfg.source
    return _read_hub(cfg.source, cfg.split), cfg.source


# ---------------------------------------------------------------------------------------------
# Validation


@dataclass(frozen=True)
class RealExamples:
    """Validated, sampled real rows. ``table`` has columns ``row`` (index in the source),
    ``text`` and ``label`` (the label's name, a key of ``data.verbalizers``)."""

    table: pa.Table
    source_name: str
    counts: dict[str, int]  # label -> rows kept. Private: for stage 1's internal checks only.


def _class_names(table: pa.Table, column: str, cfg: DataConfig) -> Sequence[str] | None:
    if cfg.label_names is not None:
        return cfg.label_names
    raw = (table.schema.metadata or {}).get(f"gradmm.class_names.{column}".encode())
    return raw.decode().split("\x1f") if raw else None


def _required_columns(cfg: DataConfig) -> dict[str, str]:
    return {"data.text_column": cfg.text_column, "data.label_column": cfg.label_column}


def _check_columns(table: pa.Table, required: dict[str, str], shown: str) -> None:
    columns = table.column_names
    for key, col in required.items():
        if col not in columns:
            raise DataError(
                f"{shown}: column {col!r} not found (columns: {', '.join(columns)}); set {key}"
            )


def validate_table(table: pa.Table, cfg: DataConfig, shown: str) -> pa.Table:
    """Check columns and every row; return (row, text, label-name) or raise DataError."""
    _check_columns(table, _required_columns(cfg), shown)
    if table.num_rows == 0:
        raise DataError(f"{shown}: the dataset is empty (0 rows)")

    text = table.column(cfg.text_column)
    if not pa.types.is_string(text.type) and not pa.types.is_large_string(text.type):
        row, first = next(
            ((i, v) for i, v in enumerate(text.to_pylist()) if v is not None), (0, None)
        )
        raise DataError(
            f"{shown} row {row}: column {cfg.text_column!r} holds {text.type} values "
            f"(e.g. {first!r}), expected strings"
        )
    texts = text.to_pylist()
    for i, t in enumerate(texts):
        if t is None or not t.strip():
            raise DataError(f"{shown} row {i}: column {cfg.text_column!r} is empty ({t!r})")

    label = table.column(cfg.label_column)
    raw_labels = label.to_pylist()
    known = list(cfg.verbalizers)
    if pa.types.is_integer(label.type):
        names = _class_names(table, cfg.label_column, cfg)
        if names is None:
            raise DataError(
                f"{shown}: column {cfg.label_column!r} holds integer labels; set data.label_names to name them (e.g. [negative, positive])"
            )
        labels = []
        for i, v in enumerate(raw_labels):
            if v is None or not 0 <= v < len(names):
                raise DataError(
                    f"{shown} row {i}: label {v!r} is outside data.label_names (0..{len(names) - 1})"
                )
            labels.append(names[v])
    elif pa.types.is_string(label.type) or pa.types.is_large_string(label.type):
        labels = raw_labels
        if cfg.label_names is not None:
            known = [n for n in known if n in cfg.label_names]
    else:
        raise DataError(
            f"{shown}: column {cfg.label_column!r} holds {label.type} values, expected strings or integers"
        )
    for i, lab in enumerate(labels):
        if lab not in known:
            where = (
                "data.label_names"
                if cfg.label_names is not None and lab not in cfg.label_names
                else "data.verbalizers"
            )
            raise DataError(
                f"{shown} row {i}: label {lab!r} has no entry in {where} (known: {', '.join(known)})"
            )

    return pa.table(
        {
            "row": pa.array(np.arange(table.num_rows, dtype=np.int64)),
            "text": pa.array(texts, pa.string()),
            "label": pa.array(labels, pa.string()),
        }
    )


def stratified_sample(
    labels: Sequence[str], *, per_class: int | None, max_examples: int | None, seed: int
) -> np.ndarray:
    """Indices of a seeded, stratified sample (sorted). ``per_class`` caps each class;
    ``max_examples`` then shrinks classes in proportion (largest remainder), keeping >= 2 each."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    by_class = {
        lab: rng.permutation(np.flatnonzero(labels_arr == lab)) for lab in sorted(set(labels))
    }
    if per_class is not None:
        by_class = {lab: idx[:per_class] for lab, idx in by_class.items()}
    total = sum(len(idx) for idx in by_class.values())
    if max_examples is not None and total > max_examples:
        quotas = {lab: len(idx) * max_examples / total for lab, idx in by_class.items()}
        take = {lab: max(2, int(q)) for lab, q in quotas.items()}
        # Raising small classes to 2 is paid for by the classes most above their quota.
        while sum(take.values()) > max_examples and any(n > 2 for n in take.values()):
            lab = max((k for k in take if take[k] > 2), key=lambda k: take[k] - quotas[k])
            take[lab] -= 1
        leftover = max_examples - sum(take.values())
        for lab in sorted(quotas, key=lambda k: quotas[k] - int(quotas[k]), reverse=True):
            if leftover <= 0:
                break
            if take[lab] < len(by_class[lab]):
                take[lab] += 1
                leftover -= 1
        by_class = {lab: idx[: take[lab]] for lab, idx in by_class.items()}
    return np.sort(np.concatenate(list(by_class.values())))


def load_real_examples(cfg: DataConfig, seed: int) -> RealExamples:
    """Read, validate and sample the real data; raise DataError naming any problem."""
    raw, shown = read_table(cfg)
    table = validate_table(raw, cfg, shown)
    idx = stratified_sample(
        table.column("label").to_pylist(),
        per_class=cfg.per_class,
        max_examples=cfg.max_examples,
        seed=seed,
    )
    table = table.take(pa.array(idx))
    counts = {lab: 0 for lab in cfg.verbalizers}
    for lab, n in zip(
        *np.unique(table.column("label").to_numpy(zero_copy_only=False), return_counts=True),
        strict=True,
    ):
        counts[str(lab)] = int(n)
    for lab, n in counts.items():
        if n < 2:
            raise DataError(
                f"{shown}: class {lab!r} has {n} example(s) after sampling, expected at least 2"
            )
    return RealExamples(table=table, source_name=shown, counts=counts)
