"""Real data: readers, label handling, stratified sampling and the tokenisation rule."""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradmm_ray.config import DataConfig
from gradmm_ray.core.text import check_verbalizers, encode_pair
from gradmm_ray.errors import DataError
from gradmm_ray.io.real_data import load_real_examples, read_table, stratified_sample

ROWS = [
    {"text": "A warm and clever film.", "label": "positive"},
    {"text": "Dull, flat and far too long.", "label": "negative"},
    {"text": "The cast is superb.", "label": "positive"},
    {"text": "A lifeless, silly mess.", "label": "negative"},
    {"text": "Gripping from start to finish.", "label": "positive"},
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def examples(source, **kw):
    return load_real_examples(DataConfig(source=str(source), **kw), seed=0)


def as_rows(real) -> list[tuple[int, str, str]]:
    return [(r["row"], r["text"], r["label"]) for r in real.table.to_pylist()]


@pytest.fixture(scope="module")
def tokenizer():
    from gradmm_ray.core.lm import load_tokenizer
    from gradmm_ray.models.sources import resolve_model_source

    return load_tokenizer(resolve_model_source("tiny"))


# ---------------------------------------------------------------------------------------------
# Readers


def test_jsonl_file(tmp_path):
    """A JSONL file is read with its text and string labels; row indices follow the file."""
    real = examples(write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert as_rows(real) == [(i, r["text"], r["label"]) for i, r in enumerate(ROWS)]
    assert real.counts == {"positive": 3, "negative": 2}
    assert real.table.num_rows == 5
    assert real.table.column_names == ["row", "key", "text", "label"]


def test_csv_file(tmp_path):
    """A CSV file with quoted commas is read; labels stay the strings in the file."""
    path = tmp_path / "d.csv"
    path.write_text(
        'text,label\n"Good, really good.",positive\nBad.,negative\n'
        '"Great, fun.",positive\n"Awful, boring.",negative\n'
    )
    real = examples(path)
    assert [t for _, t, _ in as_rows(real)] == [
        "Good, really good.",
        "Bad.",
        "Great, fun.",
        "Awful, boring.",
    ]
    assert real.counts == {"positive": 2, "negative": 2}


def test_parquet_file_with_custom_columns(tmp_path):
    """A Parquet file is read; data.text_column / data.label_column pick the columns."""
    path = tmp_path / "d.parquet"
    pq.write_table(
        pa.table(
            {
                "review": [r["text"] for r in ROWS],
                "sentiment": [r["label"] for r in ROWS],
                "extra": list(range(5)),
            }
        ),
        path,
    )
    real = examples(path, text_column="review", label_column="sentiment")
    assert as_rows(real) == [(i, r["text"], r["label"]) for i, r in enumerate(ROWS)]


def test_folder_of_parquet_files(tmp_path):
    """A folder of several Parquet files is read as one table, files in sorted path order."""
    folder = tmp_path / "parts"
    (folder / "sub").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), folder / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[2:4]), folder / "part-1.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[4:]), folder / "sub" / "part-2.parquet")
    (folder / "README.txt").write_text("not data")
    table, _ = read_table(DataConfig(source=str(folder)))
    assert table.num_rows == 5
    real = examples(folder)
    assert real.table.num_rows == 5
    assert [t for _, t, _ in as_rows(real)] == [r["text"] for r in ROWS]


def test_empty_folder_is_a_data_error(tmp_path):
    """A folder without data files is named in a DataError."""
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="folder holds no"):
        examples(tmp_path / "nothing")


def test_unknown_suffix_is_a_data_error(tmp_path):
    """A file with an unknown suffix names the suffix and the known formats."""
    path = tmp_path / "d.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match=r"unknown file format '\.xlsx'"):
        examples(path)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_text_file_not_utf8_names_the_line(tmp_path, fmt):
    """A Latin-1 byte on line 4 of a JSONL or CSV file is named with the file, the line and
    the byte (pyarrow's JSON reader accepts it silently; CSV makes the column binary)."""
    if fmt == "jsonl":
        lines = [json.dumps(r) for r in ROWS[:3]]
        bad = '{"text": "Caf\xe9 society.", "label": "positive"}'
    else:
        lines = ["text,label", *(f"{r['text'].replace(',', '')},{r['label']}" for r in ROWS[:2])]
        bad = "Caf\xe9 society.,positive"
    path = tmp_path / f"d.{fmt}"
    path.write_bytes(("\n".join([*lines, bad, *lines[1:]]) + "\n").encode("latin-1"))
    with pytest.raises(DataError) as e:
        examples(path)
    assert str(e.value).startswith(f"{path} line 4: not UTF-8 text (byte 0xe9")
    assert len(str(e.value).splitlines()) == 1


def test_utf16_csv_is_named_as_not_utf8(tmp_path):
    """A UTF-16 CSV (Excel's "Unicode text") fails to parse; the message names the encoding on
    line 1 rather than the parser's complaint about columns."""
    path = tmp_path / "d.csv"
    path.write_text("text,label\nGood.,positive\n", encoding="utf-16")
    with pytest.raises(DataError, match=r"d\.csv line 1: not UTF-8 text \(byte 0xff"):
        examples(path)


def test_folder_file_missing_a_column_is_named(tmp_path):
    """In a folder of files, the one that lacks the label column is named with that column;
    extra columns that differ between files are ignored."""
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{**r, "source": 1} for r in ROWS[:3]])
    write_jsonl(folder / "b.jsonl", [{"text": r["text"], "stars": 5} for r in ROWS[3:]])
    with pytest.raises(DataError) as e:
        examples(folder)
    assert str(e.value).startswith(f"{folder / 'b.jsonl'}: column 'label' not found")
    assert "set data.label_column" in str(e.value)
    write_jsonl(folder / "b.jsonl", [{**r, "source": "web"} for r in ROWS[3:]])
    assert [t for _, t, _ in as_rows(examples(folder))] == [r["text"] for r in ROWS]


def _hf_features(datasets):
    return datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "positive"]),
        }
    )


def test_save_to_disk_dataset_with_classlabel(tmp_path):
    """A Dataset.save_to_disk folder is read; integer ClassLabel labels take the feature's
    names without data.label_names."""
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {"text": ["Lovely.", "Awful.", "Superb.", "Tedious."], "label": [1, 0, 1, 0]},
        features=_hf_features(datasets),
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    real = examples(tmp_path / "hf")
    assert as_rows(real) == [
        (0, "Lovely.", "positive"),
        (1, "Awful.", "negative"),
        (2, "Superb.", "positive"),
        (3, "Tedious.", "negative"),
    ]


def test_save_to_disk_dataset_dict_uses_split(tmp_path):
    """A DatasetDict.save_to_disk folder is read at data.split; a missing split is named."""
    datasets = pytest.importorskip("datasets")
    features = _hf_features(datasets)
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"text": ["T1", "T2", "T3", "T4"], "label": [0, 1, 0, 1]}, features=features
            ),
            "test": datasets.Dataset.from_dict(
                {"text": ["E1", "E2", "E3", "E4", "E5"], "label": [1, 1, 0, 0, 1]},
                features=features,
            ),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    train = examples(tmp_path / "dd")
    assert [t for _, t, _ in as_rows(train)] == ["T1", "T2", "T3", "T4"]
    test = examples(tmp_path / "dd", split="test")
    assert as_rows(test) == [
        (0, "E1", "positive"),
        (1, "E2", "positive"),
        (2, "E3", "negative"),
        (3, "E4", "negative"),
        (4, "E5", "positive"),
    ]
    with pytest.raises(DataError) as info:
        examples(tmp_path / "dd", split="validation")
    msg = str(info.value)
    assert "'validation' not found" in msg and "train" in msg and "test" in msg


def test_integer_labels_with_label_names(tmp_path):
    """Integer labels are mapped through data.label_names (index -> name)."""
    rows = [{"text": f"review {i}", "label": i % 2} for i in range(6)]
    real = examples(write_jsonl(tmp_path / "d.jsonl", rows), label_names=("negative", "positive"))
    assert [lab for _, _, lab in as_rows(real)] == ["negative", "positive"] * 3
    assert real.counts == {"positive": 3, "negative": 3}


def test_integer_labels_without_names_ask_for_label_names(tmp_path):
    """Integer labels with no names anywhere point the user at data.label_names."""
    rows = [{"text": f"review {i}", "label": i % 2} for i in range(4)]
    with pytest.raises(DataError, match="set data.label_names"):
        examples(write_jsonl(tmp_path / "d.jsonl", rows))


def test_label_names_override_classlabel_names(tmp_path):
    """Explicit data.label_names win over a saved dataset's ClassLabel names."""
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 1]}, features=_hf_features(datasets)
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    real = examples(tmp_path / "hf", label_names=("positive", "negative"))
    assert [lab for _, _, lab in as_rows(real)] == ["positive", "negative"] * 2


def test_bundled_sample_train():
    """The bundled sample: 400 training rows, 200 per class, every row kept by default."""
    real = load_real_examples(DataConfig(), seed=0)
    assert real.table.num_rows == 400
    assert real.counts == {"positive": 200, "negative": 200}
    assert real.source_name == "movie_reviews_train.jsonl"


def test_bundled_sample_test_split():
    """data.split=test selects the bundled 100-row test file."""
    real = load_real_examples(DataConfig(split="test"), seed=0)
    assert real.table.num_rows == 100
    assert sum(real.counts.values()) == 100


def test_bundled_sample_unknown_split():
    """An unknown split for the sample names the allowed ones."""
    with pytest.raises(DataError, match=r"data\.split: got 'validation'.*test.*train"):
        load_real_examples(DataConfig(split="validation"), seed=0)


def test_hub_id_fails_fast_offline():
    """With HF_HUB_OFFLINE=1 a hub id fails at once with a DataError naming the id."""
    source = "no-such-user/no-such-dataset"
    t0 = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_real_examples(DataConfig(source=source), seed=0)
    assert time.perf_counter() - t0 < 15
    msg = str(info.value)
    assert repr(source) in msg
    assert "Hugging Face" in msg
    assert "\n" not in msg


# ---------------------------------------------------------------------------------------------
# Sampling


def _counts(labels, idx) -> Counter:
    return Counter(np.asarray(labels)[idx].tolist())


def test_per_class_caps_each_class():
    """per_class keeps at most that many rows of every class (smaller classes whole)."""
    labels = ["a"] * 10 + ["b"] * 5 + ["c"] * 2
    idx = stratified_sample(labels, per_class=4, max_examples=None, seed=0)
    assert _counts(labels, idx) == {"a": 4, "b": 4, "c": 2}
    assert list(idx) == sorted(idx)
    assert len(set(idx.tolist())) == len(idx)


def test_max_examples_is_proportional():
    """max_examples shrinks classes in proportion to their size."""
    labels = ["a"] * 80 + ["b"] * 20
    idx = stratified_sample(labels, per_class=None, max_examples=10, seed=0)
    assert _counts(labels, idx) == {"a": 8, "b": 2}
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    idx = stratified_sample(labels, per_class=None, max_examples=20, seed=3)
    assert _counts(labels, idx) == {"a": 10, "b": 6, "c": 4}


def test_max_examples_keeps_two_per_class():
    """A class too small for its share still keeps 2 rows."""
    labels = ["a"] * 98 + ["b"] * 2
    idx = stratified_sample(labels, per_class=None, max_examples=10, seed=0)
    assert _counts(labels, idx)["b"] == 2


def test_max_examples_is_an_upper_bound_when_two_per_class_fit():
    """Raising small classes to 2 is paid for by the large ones: never more than max_examples
    rows when max_examples >= 2 * classes."""
    labels = ["a"] * 98 + ["b"] * 2
    idx = stratified_sample(labels, per_class=None, max_examples=10, seed=0)
    assert _counts(labels, idx) == {"a": 8, "b": 2}
    labels = ["a"] * 90 + ["b"] * 5 + ["c"] * 5
    idx = stratified_sample(labels, per_class=None, max_examples=6, seed=0)
    assert _counts(labels, idx) == {"a": 2, "b": 2, "c": 2}


def test_max_examples_above_total_keeps_everything():
    """max_examples larger than the data keeps every row."""
    labels = ["a"] * 5 + ["b"] * 3
    idx = stratified_sample(labels, per_class=None, max_examples=100, seed=0)
    assert list(idx) == list(range(8))


def test_per_class_then_max_examples():
    """per_class caps first, then max_examples shrinks the capped classes."""
    labels = ["a"] * 100 + ["b"] * 10
    idx = stratified_sample(labels, per_class=10, max_examples=10, seed=0)
    assert _counts(labels, idx) == {"a": 5, "b": 5}


def test_sampling_is_seeded():
    """Same seed, same rows; another seed, other rows."""
    labels = ["a"] * 100 + ["b"] * 100
    kw = {"per_class": 10, "max_examples": None}
    first = stratified_sample(labels, seed=1, **kw)
    assert np.array_equal(first, stratified_sample(labels, seed=1, **kw))
    assert not np.array_equal(first, stratified_sample(labels, seed=2, **kw))


def test_load_real_examples_samples_the_bundled_data():
    """per_class / max_examples apply in load_real_examples; row keeps the source index."""
    real = load_real_examples(DataConfig(per_class=10), seed=0)
    assert real.counts == {"positive": 10, "negative": 10}
    again = load_real_examples(DataConfig(per_class=10), seed=0)
    other = load_real_examples(DataConfig(per_class=10), seed=1)
    assert real.table.equals(again.table)
    assert not real.table.equals(other.table)
    real = load_real_examples(DataConfig(max_examples=50), seed=0)
    assert real.counts == {"positive": 25, "negative": 25}
    rows = real.table.column("row").to_pylist()
    assert rows == sorted(rows) and len(set(rows)) == 50 and max(rows) < 400


def test_class_with_fewer_than_two_examples(tmp_path):
    """A class left with fewer than 2 rows is refused, naming class and count."""
    rows = [r for r in ROWS if r["label"] == "positive"] + [ROWS[1]]
    with pytest.raises(DataError, match=r"class 'negative' has 1 example\(s\)"):
        examples(write_jsonl(tmp_path / "d.jsonl", rows))


# ---------------------------------------------------------------------------------------------
# Tokenisation rule


def test_encode_pair_prompt_with_specials_completion_without(tokenizer):
    """encode_pair = prompt ids with special tokens + completion ids without; returns the
    prompt length."""
    prompt, completion = "A warm film. It was", " great"
    ids, n_prompt = encode_pair(tokenizer, prompt, completion)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert ids == list(prompt_ids) + list(completion_ids)
    assert n_prompt == len(prompt_ids)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in ids[n_prompt:]
    assert len(ids) > n_prompt


def test_encode_pair_with_a_fake_tokenizer():
    """The rule does not depend on a real tokenizer: only add_special_tokens differs."""

    class Fake:
        def __call__(self, text, add_special_tokens):
            ids = [ord(c) for c in text]
            return {"input_ids": ([0] if add_special_tokens else []) + ids}

    ids, n_prompt = encode_pair(Fake(), "ab", "c")
    assert (ids, n_prompt) == ([0, 97, 98, 99], 3)


LONG_TEXT = "The acting was wonderful, but the plot felt dull and far too long. " * 600
TEMPLATE = "Review: {text} It was"


def test_encode_pair_cuts_a_long_text_to_max_tokens(tokenizer):
    """A 9,000-token text is cut to max_tokens by shortening the text only: the template's
    prefix and suffix and the completion stay, and the kept text is the original's start."""
    assert len(tokenizer(LONG_TEXT)["input_ids"]) > 9000
    ids, n_prompt = encode_pair(tokenizer, LONG_TEXT, " great", template=TEMPLATE, max_tokens=100)
    assert len(ids) == 100
    completion = tokenizer(" great", add_special_tokens=False)["input_ids"]
    assert ids[n_prompt:] == completion and ids[0] == tokenizer.bos_token_id
    prompt = tokenizer.decode(ids[1:n_prompt])
    assert prompt.startswith("Review: The acting was wonderful") and prompt.endswith(" It was")
    assert LONG_TEXT.startswith(prompt.removeprefix("Review: ").removesuffix(" It was"))
    # A pair that fits is left exactly as the rule without a limit makes it.
    short = encode_pair(tokenizer, "A warm film.", " great", template=TEMPLATE, max_tokens=100)
    assert short == encode_pair(tokenizer, "Review: A warm film. It was", " great")


def test_encode_pair_without_room_for_the_text(tokenizer):
    """max_tokens below the template + completion length is named as a data.max_tokens error."""
    with pytest.raises(DataError, match="data.max_tokens: got 3, .* no room for the text"):
        encode_pair(tokenizer, LONG_TEXT, " great", template=TEMPLATE, max_tokens=3)


def test_stage1_pads_micro_batches_to_at_most_max_tokens():
    """Stage 1's actor with a 9,000-token row among short ones: every micro-batch it feeds to
    completion_states is padded to at most max_tokens (the tiny model's 256 positions when
    data.max_tokens is null), and with data.max_tokens set, to at most that."""
    from gradmm_ray.config import build_config
    from gradmm_ray.core.lm import pad_pairs
    from gradmm_ray.distributed.targets import ClippedHeadGradSums

    texts = np.array(["A warm film.", LONG_TEXT, "Dull."], dtype=object)
    batch = {"text": texts, "label": np.array(["positive", "negative", "negative"], dtype=object)}
    batch.update(  # the stream's columns: row keys, one fragment holding these rows
        key=np.arange(3, dtype=np.uint64),
        fragment=np.zeros(3, dtype=np.int32),
        expected=np.array([1, 2, 2]),
    )
    for max_tokens, limit in ((None, 256), (64, 64)):
        cfg = build_config(
            {
                "model": {"name": "tiny", "device": "cpu"},
                "data": {"max_tokens": max_tokens},
                "privacy": {"clip_norm": 1.0},  # auto is resolved by run_targets, not here
            }
        )
        actor = ClippedHeadGradSums(cfg)
        widths = []
        states = actor.lm.completion_states

        def spy(pairs, states=states, widths=widths, pad=actor.lm.tokenizer.pad_token_id):
            widths.append(pad_pairs(pairs, pad)[0].shape[1])
            return states(pairs)

        actor.lm.completion_states = spy  # our own object: the real method still runs
        actor(batch)
        assert widths and max(widths) == limit


def test_check_verbalizers_returns_ids(tokenizer):
    """Valid verbalizers map to their completion ids (no special tokens)."""
    ids = check_verbalizers(tokenizer, {"positive": " great", "negative": " bad"})
    assert ids["positive"] == tokenizer(" great", add_special_tokens=False)["input_ids"]
    assert ids["negative"] == tokenizer(" bad", add_special_tokens=False)["input_ids"]
    assert ids["positive"] != ids["negative"]


def test_check_verbalizers_rejects_empty_tokenisation(tokenizer):
    """A verbalizer that tokenises to no ids is refused, naming the label."""
    with pytest.raises(DataError, match=r"data\.verbalizers\.negative: '' tokenises to no tokens"):
        check_verbalizers(tokenizer, {"positive": " great", "negative": ""})


def test_check_verbalizers_rejects_duplicates(tokenizer):
    """Two labels with the same completion ids are refused, naming both labels."""
    with pytest.raises(DataError, match="tokenise to the same ids") as info:
        check_verbalizers(tokenizer, {"positive": " great", "negative": " great"})
    msg = str(info.value)
    assert "'positive'" in msg and "'negative'" in msg
