"""The opt-in audit: exact nearest neighbours and shared n-grams, against brute force."""

import random

import torch

from gradmm_ray.distill.audit import (
    RealNeighbours,
    audit_table,
    longest_common_ngram,
    merge_answers,
    nearest_neighbours,
)


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


def test_audit_finds_a_copied_example_across_blocks(tiny_lm):
    """A synthetic text equal to a real row in the second of two blocks: folding the blocks'
    answers finds that row (file and row from its key) at distance 0, sharing all its tokens."""
    from gradmm_ray.io.real_data import KEY_FILE_SHIFT

    blocks = [
        ["A warm and funny film.", "Dull from start to finish."],
        ["Nothing much happens.", "The score is simply superb."],
    ]
    keys = [[5, 6], [(1 << KEY_FILE_SHIFT) + 40, (1 << KEY_FILE_SHIFT) + 41]]
    copied = blocks[1][1]
    selected = [{"synthetic_id": 9, "label": "positive", "text": copied}]
    neighbours = RealNeighbours(tiny_lm, [copied])
    best = None
    for texts, block_keys in zip(blocks, keys, strict=True):
        index, dist, ngram = neighbours.block(texts)
        answer = {"key": block_keys[int(index[0])], "distance": float(dist[0]), "ngram": ngram[0]}
        best = merge_answers(best, answer)
    row = audit_table(selected, [best], ["a.jsonl", "b.jsonl"]).to_pylist()[0]
    assert (row["nearest_real_file"], row["nearest_real_row"]) == ("b.jsonl", 41)
    assert row["nearest_distance"] < 1e-3
    n_tokens = len(tiny_lm.tokenizer(copied, add_special_tokens=False)["input_ids"])
    assert row["longest_common_ngram"] == n_tokens
    assert set(row) == {
        "id",
        "label",
        "nearest_real_file",
        "nearest_real_row",
        "nearest_distance",
        "longest_common_ngram",
    }


def test_merge_answers_keeps_nearest_and_longest():
    """Folding is order-free: the nearest distance (ties: lower key) and the longest run win."""
    a = {"key": 7, "distance": 0.5, "ngram": 2}
    b = {"key": 3, "distance": 0.5, "ngram": 4}
    c = {"key": 9, "distance": 0.2, "ngram": 1}
    for order in ((a, b, c), (c, b, a), (b, a, c)):
        best = None
        for x in order:
            best = merge_answers(best, x)
        assert best == {"key": 9, "distance": 0.2, "ngram": 4}
    assert merge_answers(a, b) == {"key": 3, "distance": 0.5, "ngram": 4}
