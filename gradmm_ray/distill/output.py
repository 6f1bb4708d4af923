"""The output contract: OUTPUT/synthetic.parquet, one row per selected synthetic example with
the exact training pair (``prompt`` + ``completion``) in the template the targets used."""

from __future__ import annotations

import pyarrow as pa

from gradmm_ray.config import Config
from gradmm_ray.core.selection import selection_score
from gradmm_ray.core.text import format_prompt

SYNTHETIC_FILE = "synthetic.parquet"
OUTPUT_COLUMNS = (
    "id",
    "text",
    "label",
    "prompt",
    "completion",
    "match_loss",
    "log_ppl",
    "label_prob",
    "rho",
    "seed",
)


def synthetic_table(rows: list[dict], cfg: Config) -> pa.Table:
    """The output contract: one row per selected example, the exact training pair included."""
    d = cfg.data
    rows = sorted(
        rows,
        key=lambda r: (r["label"], selection_score(r, cfg.select.ppl_weight), r["synthetic_id"]),
    )
    return pa.table(
        {
            "id": pa.array([int(r["synthetic_id"]) for r in rows], pa.int64()),
            "text": pa.array([r["text"] for r in rows], pa.string()),
            "label": pa.array([r["label"] for r in rows], pa.string()),
            "prompt": pa.array(
                [format_prompt(d.prompt_template, r["text"]) for r in rows], pa.string()
            ),
            "completion": pa.array([d.verbalizers[r["label"]] for r in rows], pa.string()),
            "match_loss": pa.array([float(r["match_loss"]) for r in rows], pa.float64()),
            "log_ppl": pa.array([float(r["log_ppl"]) for r in rows], pa.float64()),
            "label_prob": pa.array([float(r["label_prob"]) for r in rows], pa.float64()),
            "rho": pa.array([float(r["rho"]) for r in rows], pa.float64()),
            "seed": pa.array([int(r["seed"]) for r in rows], pa.int64()),
        }
    )
