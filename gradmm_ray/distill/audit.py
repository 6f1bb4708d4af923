"""Opt-in privacy audit (``audit.enabled``): how close is each selected example to the real data?

OUTSIDE THE DP GUARANTEE. The audit reads the real examples again after the release, so its
output (``audit.parquet`` and its section of the report) is not differentially private. It never
changes the selection, and it never writes real text: real examples appear only as a file and a
row within it, with distances and n-gram lengths. It streams the real rows like stage 1
(distributed/audit.py runs ``RealNeighbours`` on each block and folds the answers on the driver).

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


class RealNeighbours:
    """The audit's running answer per selected row over a stream of real blocks: the nearest
    real row so far (its key and the L2 distance) and the longest token run shared with any
    real row. Each block is answered by ``block``; memory is a few numbers per selected row, whatever the size of the real data (``merge_answers``)."""

    def __init__(self, lm: CausalLM, queries: Sequence[str]):
        self.lm = lm
        self.query_states = mean_pooled_states(lm, list(queries))
        self.query_ids = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in queries]

    def block(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(index of the nearest text, its distance, longest shared run) per query, in one block."""
        index, dist = nearest_neighbours(
            self.query_states, mean_pooled_states(self.lm, list(texts))
        )
        tok = self.lm.tokenizer
        real_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        cache: dict[int, set[tuple[int, ...]]] = {}
        return index, dist, [longest_common_ngram(q, cache, real_ids) for q in self.query_ids]


def merge_answers(old: dict | None, new: dict) -> dict:
    """Two blocks' answers for one selected row (fragment, key, distance, ngram) as one: the
    nearest row over all blocks is the nearest of each block's nearest (ties: the lower key);
    the longest shared run lies within one real row, hence within one block."""
    if old is None:
        return dict(new)
    closer = (new["distance"], new["key"]) < (old["distance"], old["key"])
    return {**(new if closer else old), "ngram": max(old["ngram"], new["ngram"])}


def audit_table(selected: list[dict], best: list[dict], files: Sequence[str]) -> pa.Table:
    """One row per selected example: its id, the nearest real row (its file, ``files`` indexed by
    the key's high bits, and its row in that file) and distance, and the longest shared token
    run. No real text."""
    from gradmm_ray.io.real_data import KEY_FILE_SHIFT

    low = (1 << KEY_FILE_SHIFT) - 1
    return pa.table(
        {
            "id": pa.array([int(r["synthetic_id"]) for r in selected], pa.int64()),
            "label": pa.array([r["label"] for r in selected], pa.string()),
            "nearest_real_file": pa.array(
                [files[b["key"] >> KEY_FILE_SHIFT] for b in best], pa.string()
            ),
            "nearest_real_row": pa.array([b["key"] & low for b in best], pa.int64()),
            "nearest_distance": pa.array([b["distance"] for b in best], pa.float64()),
            "longest_common_ngram": pa.array([b["ngram"] for b in best], pa.int64()),
        }
    )
