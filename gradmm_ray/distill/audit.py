"""Opt-in privacy audit (``audit.enabled``): how close is each selected example to the real data?

OUTSIDE THE DP GUARANTEE. The audit reads the real examples again after the release, so its
output (``audit.parquet`` and its section of the report) is not differentially private. It never
changes the selection, and it never writes real text: real examples appear only as row indices
into the source, with distances and n-gram lengths.

For each selected row:
  * the nearest real example by L2 distance between mean-pooled final hidden states of the texts
    (the LM's own embedding of the text, paper Fig. 2b);
  * the length of the longest run of tokens it shares with any real example.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import torch

from gradmm_ray.core.lm import CausalLM
from gradmm_ray.core.scoring import mean_pooled_states

AUDIT_FILE = "audit.parquet"


def nearest_neighbours(
    queries: torch.Tensor, keys: torch.Tensor, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and L2 distance of each query's nearest key, scanning keys in chunks."""
    best_d = torch.full((len(queries),), float("inf"))
    best_i = torch.zeros(len(queries), dtype=torch.long)
    for start in range(0, len(keys), chunk):
        d = torch.cdist(queries.double(), keys[start : start + chunk].double())  # (Q, chunk)
        value, index = d.min(dim=1)
        better = value < best_d
        best_d = torch.where(better, value.float(), best_d)
        best_i = torch.where(better, index + start, best_i)
    return best_i, best_d


def longest_common_ngram(
    query: Sequence[int],
    corpus_ngrams: dict[int, set[tuple[int, ...]]],
    corpus: Sequence[Sequence[int]],
) -> int:
    """Length of the longest contiguous token run of ``query`` found in any corpus sequence.
    ``corpus_ngrams`` caches the set of n-grams of the corpus per n."""

    def shared(n: int) -> bool:
        if n not in corpus_ngrams:
            corpus_ngrams[n] = {
                tuple(seq[i : i + n]) for seq in corpus for i in range(len(seq) - n + 1)
            }
        grams = corpus_ngrams[n]
        return any(tuple(query[i : i + n]) in grams for i in range(len(query) - n + 1))

    lo, hi = 0, len(query)  # shared(lo) holds (n = 0 trivially); find the largest n that does
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if shared(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def audit_table(
    lm: CausalLM, selected: list[dict], real_texts: Sequence[str], real_rows: Sequence[int]
) -> pa.Table:
    """One row per selected example: its id, the nearest real row's index and distance, and
    the longest shared token run. No real text."""
    syn_texts = [r["text"] for r in selected]
    index, dist = nearest_neighbours(
        mean_pooled_states(lm, syn_texts), mean_pooled_states(lm, real_texts)
    )
    tok = lm.tokenizer
    real_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in real_texts]
    cache: dict[int, set[tuple[int, ...]]] = {}
    ngram = [
        longest_common_ngram(tok(t, add_special_tokens=False)["input_ids"], cache, real_ids)
        for t in syn_texts
    ]
    return pa.table(
        {
            "id": pa.array([int(r["synthetic_id"]) for r in selected], pa.int64()),
            "label": pa.array([r["label"] for r in selected], pa.string()),
            "nearest_real_row": pa.array([int(real_rows[i]) for i in index.tolist()], pa.int64()),
            "nearest_distance": pa.array(dist.tolist(), pa.float64()),
            "longest_common_ngram": pa.array(ngram, pa.int64()),
        }
    )
