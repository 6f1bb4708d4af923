"""Training and evaluation pairs: the --train file's rows (prompt/completion, or text/label put
through the templates) and a real split's validated rows, as :class:`Example` s whose ``origin``
says where each came from."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pyarrow as pa

from gradmm_ray.config import DataConfig
from gradmm_ray.core.text import format_prompt
from gradmm_ray.core.training import Example
from gradmm_ray.errors import DataError
from gradmm_ray.finetune.config import FinetuneError
from gradmm_ray.io.real_data import looks_like_path, read_table, validate_table


def read_train_file(path: str) -> tuple[pa.Table, str]:
    """The raw --train table (Parquet, local or s3:// / gs://)."""
    if "://" not in path and not os.path.exists(os.path.expanduser(path)):
        raise FinetuneError(f"--train {path!r}: file does not exist")
    try:
        table, _ = read_table(DataConfig(source=path))
    except DataError as e:
        raise FinetuneError(f"--train: {e}") from None
    return table, path


def _label_name(value: Any, data: DataConfig, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and data.label_names and 0 <= value < len(data.label_names):
        return data.label_names[value]
    raise FinetuneError(f"{where}: label {value!r} is not a label name (set data.label_names)")


def training_examples(table: pa.Table, data: DataConfig, *, loss: str, shown: str) -> list[Example]:
    """The --train rows as pairs: ``prompt``/``completion`` (optional ``label``) used as they are,
    or ``text``/``label`` put through data.prompt_template and data.verbalizers."""
    columns = table.column_names
    if table.num_rows == 0:
        raise FinetuneError(f"{shown}: the training set is empty (0 rows)")
    if {"prompt", "completion"} <= set(columns):
        return _pair_examples(table, data, loss=loss, shown=shown)
    if {"text", "label"} <= set(columns):
        rows = validate_table(
            table, dataclasses.replace(data, text_column="text", label_column="label"), shown
        )
        return [
            Example(
                format_prompt(data.prompt_template, t),
                data.verbalizers[lab],
                lab,
                f"train-file:{r}",
            )
            for r, t, lab in zip(
                *(rows.column(c).to_pylist() for c in ("row", "text", "label")), strict=True
            )
        ]
    raise FinetuneError(
        f"{shown}: expected columns prompt and completion, or text and label "
        f"(columns: {', '.join(columns)})"
    )


def _pair_examples(table: pa.Table, data: DataConfig, *, loss: str, shown: str) -> list[Example]:
    label_of_completion = {c: lab for lab, c in data.verbalizers.items()}
    prompts = table.column("prompt").to_pylist()
    completions = table.column("completion").to_pylist()
    has_label = "label" in table.column_names
    labels = table.column("label").to_pylist() if has_label else [None] * table.num_rows
    out = []
    for i, (prompt, completion, raw_label) in enumerate(
        zip(prompts, completions, labels, strict=True)
    ):
        where = f"{shown} row {i}"
        for col, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str) or not value.strip():
                raise FinetuneError(f"{where}: column {col!r} is empty or not text ({value!r})")
        label = _label_name(raw_label, data, where) if has_label else None
        if label is None:
            label = label_of_completion.get(completion)
        if loss == "classification":
            if label is None:
                raise FinetuneError(
                    f"{where}: completion {completion!r} is none of data.verbalizers "
                    f"({data.verbalizers}) and there is no label: the classification loss needs "
                    "one (or use --loss sft)"
                )
            if label not in data.verbalizers:
                raise FinetuneError(
                    f"{where}: label {label!r} has no entry in data.verbalizers (known: {', '.join(data.verbalizers)})"
                )
            if completion != data.verbalizers[label]:
                raise FinetuneError(
                    f"{where}: completion {completion!r} is not data.verbalizers[{label!r}] "
                    f"({data.verbalizers[label]!r}); set data.verbalizers to the ones the set was made with"
                )
        out.append(Example(prompt, completion, label, f"train-file:{i}"))
    return out


def has_named_splits(source: str) -> bool:
    """Whether ``splits.test_split`` names a split of the source: the bundled sample, a hub id or a
    DatasetDict folder. A plain file or folder of files is one split: TEST is carved from it."""
    if source == "sample" or not looks_like_path(source):
        return True
    local = os.path.expanduser(source)
    return "://" not in source and os.path.isfile(os.path.join(local, "dataset_dict.json"))


def read_split(data: DataConfig, split: str) -> tuple[list[Example], list[str]]:
    """Validated real rows of one split as examples (origin ``"{split}:{row}"``) and their texts."""
    raw, shown = read_table(dataclasses.replace(data, split=split))
    rows = validate_table(raw, data, shown)
    texts = rows.column("text").to_pylist()
    examples = [
        Example(format_prompt(data.prompt_template, t), data.verbalizers[lab], lab, f"{split}:{r}")
        for r, t, lab in zip(
            *(rows.column(c).to_pylist() for c in ("row", "text", "label")), strict=True
        )
    ]
    return examples, texts
