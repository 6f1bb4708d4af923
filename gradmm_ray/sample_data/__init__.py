"""The bundled sample: public movie reviews (train and test JSONL), the demo's data
(``data.source: sample``) and the corpus the tiny model's tokenizer is trained on.

Only where the files are: reading rows as real data is ``io.real_data``'s job. The tiny model's
recipe (``models.tiny``) finds the files here, so building it never imports the real-data reader.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from gradmm_ray.errors import DataError

SAMPLE_SPLITS = {"train": "movie_reviews_train.jsonl", "test": "movie_reviews_test.jsonl"}


def sample_data_path(split: str = "train") -> Path:
    if split not in SAMPLE_SPLITS:
        raise DataError(
            f"data.split: got {split!r} for the bundled sample, expected one of {sorted(SAMPLE_SPLITS)}"
        )
    return Path(str(resources.files("gradmm_ray") / "sample_data" / SAMPLE_SPLITS[split]))
