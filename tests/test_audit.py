"""The opt-in audit: exact nearest neighbours and shared n-grams, against brute force."""

import random

import torch

from gradmm_ray.distill.audit import audit_table, longest_common_ngram, nearest_neighbours


def _brute_longest_common_run(query: list[int], corpus: list[list[int]]) -> int:
    best = 0
    for seq in corpus:
        for i in range(len(query)):
            for j in range(len(seq)):
                n = 0
                while i + n < len(query) and j + n < len(seq) and query[i + n] == seq[j + n]:
                    n += 1
                best = max(best, n)
    return best


def test_longest_common_ngram_matches_brute_force():
    """Binary search over cached n-gram sets equals the all-pairs scan, on random sequences."""
    rng = random.Random(0)
    corpus = [[rng.randrange(6) for _ in range(rng.randrange(1, 12))] for _ in range(20)]
    cache: dict = {}
    for _ in range(50):
        query = [rng.randrange(6) for _ in range(rng.randrange(0, 15))]
        assert longest_common_ngram(query, cache, corpus) == _brute_longest_common_run(
            query, corpus
        )


def test_nearest_neighbours_matches_brute_force():
    """Chunked scan gives the same index and distance as a full distance matrix."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(7, 5, generator=g), torch.randn(50, 5, generator=g)
    index, dist = nearest_neighbours(q, k, chunk=8)
    full = torch.cdist(q.double(), k.double())
    assert torch.equal(index, full.argmin(1))
    torch.testing.assert_close(dist.double(), full.min(1).values, rtol=1e-6, atol=1e-6)


def test_audit_finds_a_copied_example(tiny_lm):
    """A synthetic text equal to real row 2 has distance 0 to it and shares all its tokens."""
    real = ["A warm and funny film.", "Dull from start to finish.", "The score is simply superb."]
    selected = [{"synthetic_id": 9, "label": "positive", "text": real[2]}]
    table = audit_table(tiny_lm, selected, real, real_rows=[10, 11, 12]).to_pylist()[0]
    assert table["nearest_real_row"] == 12 and table["nearest_distance"] < 1e-3
    n_tokens = len(tiny_lm.tokenizer(real[2], add_special_tokens=False)["input_ids"])
    assert table["longest_common_ngram"] == n_tokens
    assert set(table) == {
        "id",
        "label",
        "nearest_real_row",
        "nearest_distance",
        "longest_common_ngram",
    }
