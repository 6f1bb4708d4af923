"""Selection rules (pure functions on rows) and the output table contract."""

import random
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gradmm_ray.config import Config, SelectConfig
from gradmm_ray.core.selection import (
    balance_classes,
    best_rho_per_id,
    dedupe_text,
    match_set,
    passes_label_check,
    select_rows,
    top_per_class,
)
from gradmm_ray.core.text import normalise_text
from gradmm_ray.distill.output import OUTPUT_COLUMNS, synthetic_table

LABELS = ["negative", "positive"]


def row(
    sid: int,
    label: str = "positive",
    match_loss: float = 0.5,
    *,
    rho: float = 1.0,
    seed: int = 0,
    text: str | None = None,
    log_ppl: float = 0.0,
    label_prob: float = 0.9,
    predicted_label: str | None = None,
) -> dict:
    return {
        "synthetic_id": sid,
        "label": label,
        "rho": rho,
        "seed": seed,
        "text": f"text {sid} rho {rho}" if text is None else text,
        "match_loss": match_loss,
        "log_ppl": log_ppl,
        "label_prob": label_prob,
        "predicted_label": label if predicted_label is None else predicted_label,
        # A fixed vector per (id, rho) for set_match: the row's own gradient in the target space.
        "gradient": np.random.default_rng([sid, int(rho * 10)]).normal(size=GRADIENT_DIMS),
    }


GRADIENT_DIMS = 6
TARGET = np.random.default_rng(99).normal(size=GRADIENT_DIMS)


def ids(rows: list[dict]) -> list[int]:
    return [r["synthetic_id"] for r in rows]


# ---------------------------------------------------------------------------------------------
# Individual rules


def test_label_check_drops_disagreeing_and_low_probability_rows():
    """A row passes iff the predicted label is its own and label_prob >= min_label_prob."""
    assert passes_label_check(row(0, "positive", predicted_label="positive"), 0.0)
    assert not passes_label_check(row(1, "positive", predicted_label="negative"), 0.0)
    assert not passes_label_check(
        row(1, "positive", predicted_label="negative", label_prob=0.99), 0.5
    )
    assert passes_label_check(row(2, label_prob=0.6), 0.6)  # at the threshold: kept
    assert not passes_label_check(row(3, label_prob=0.59), 0.6)


def test_best_rho_per_id_keeps_lowest_score():
    """Per synthetic id the rho with the lowest match_loss is kept; output sorted by id."""
    rows = [
        row(2, rho=0.1, match_loss=0.3),
        row(1, rho=0.1, match_loss=0.5),
        row(1, rho=1.0, match_loss=0.4),
        row(1, rho=5.0, match_loss=0.6),
        row(2, rho=1.0, match_loss=0.2),
    ]
    out = best_rho_per_id(rows, 0.0)
    assert [(r["synthetic_id"], r["rho"]) for r in out] == [(1, 1.0), (2, 1.0)]


def test_best_rho_per_id_ppl_weight_changes_choice():
    """score = match_loss + w * log_ppl: w = 0 picks rho 1.0 (0.4 < 0.5); w = 0.1 picks rho 0.1
    (0.5 + 0.2 = 0.7 < 0.4 + 0.4 = 0.8)."""
    rows = [
        row(1, rho=0.1, match_loss=0.5, log_ppl=2.0),
        row(1, rho=1.0, match_loss=0.4, log_ppl=4.0),
    ]
    assert [r["rho"] for r in best_rho_per_id(rows, 0.0)] == [1.0]
    assert [r["rho"] for r in best_rho_per_id(rows, 0.1)] == [0.1]


def test_normalise_text():
    """Case and whitespace runs are normalised; leading/trailing space stripped."""
    assert normalise_text("  Great\t\tMOVIE \n") == "great movie"
    assert normalise_text("great movie") == normalise_text("GREAT  movie")
    assert normalise_text("great movie!") != normalise_text("great movie")


def test_dedupe_keeps_best_scoring_duplicate():
    """Duplicates after normalisation collapse to the lowest score (ties: lowest id)."""
    rows = [
        row(0, match_loss=0.5, text="Great movie"),
        row(1, match_loss=0.2, text="  great   MOVIE "),
        row(2, match_loss=0.9, text="GREAT\tmovie\n"),
        row(3, match_loss=0.7, text="Great movie!"),
        row(4, match_loss=0.3, text="bad film"),
        row(5, match_loss=0.3, text="Bad Film"),
    ]
    out = dedupe_text(rows, 0.0)
    assert ids(out) == [1, 3, 4]
    # ppl_weight enters the score: now id 0 is best of its group.
    rows[0]["log_ppl"], rows[1]["log_ppl"], rows[2]["log_ppl"] = 0.0, 10.0, 10.0
    assert ids(dedupe_text(rows, 0.1)) == [0, 3, 4]


def test_top_per_class_keeps_r_lowest_ties_by_id():
    """Per class the r lowest scores, ties broken by the lower id; small classes kept whole."""
    rows = [
        row(1, "positive", 0.3),
        row(2, "positive", 0.1),
        row(3, "positive", 0.3),
        row(4, "positive", 0.2),
        row(5, "positive", 0.3),
        row(6, "negative", 0.9),
        row(7, "negative", 0.8),
    ]
    assert ids(top_per_class(rows, 3, 0.0)) == [1, 2, 4, 6, 7]
    assert ids(top_per_class(rows, 1, 0.0)) == [2, 7]
    assert ids(top_per_class(rows, 10, 0.0)) == [1, 2, 3, 4, 5, 6, 7]


def _scores(rows: list[dict], label: str) -> list[float]:
    return sorted(r["match_loss"] for r in rows if r["label"] == label)


def test_balance_two_classes():
    """The class with the higher mean drops its worst rows until its mean <= the other's.

    positive [0.1, 0.2, 0.3] mean 0.2; negative [0.1, 0.2, 0.6, 0.9] mean 0.45 -> drop 0.9 (mean
    0.3 > 0.2) -> drop 0.6 (mean 0.15 <= 0.2) -> stop."""
    pos = [row(i, "positive", s) for i, s in enumerate([0.1, 0.2, 0.3])]
    neg = [row(10 + i, "negative", s) for i, s in enumerate([0.6, 0.1, 0.9, 0.2])]
    out = balance_classes(neg + pos, 0.0)
    assert _scores(out, "positive") == [0.1, 0.2, 0.3]
    assert _scores(out, "negative") == [0.1, 0.2]
    assert ids(out) == sorted(ids(out))


def test_balance_stops_at_equality():
    """'At or below': positive [0.25, 0.25] mean 0.25; negative [0, 0.5, 1] -> drop 1 -> mean
    0.25, equal, so 0.5 stays."""
    pos = [row(0, "positive", 0.25), row(1, "positive", 0.25)]
    neg = [row(2, "negative", 0.0), row(3, "negative", 0.5), row(4, "negative", 1.0)]
    out = balance_classes(pos + neg, 0.0)
    assert ids(out) == [0, 1, 2, 3]


def test_balance_three_classes_and_never_empties():
    """Every class above the lowest mean is trimmed to it, but keeps at least one row.

    a [0, 0.5] mean 0.25 (floor); b [0, 0.25, 0.5, 1] -> drop 1 -> mean 0.25; c [0.5, 0.75] ->
    drop 0.75 -> one row left (mean 0.5 > 0.25) -> kept."""
    rows = [
        row(0, "a", 0.0),
        row(1, "a", 0.5),
        row(2, "b", 0.0),
        row(3, "b", 0.25),
        row(4, "b", 0.5),
        row(5, "b", 1.0),
        row(6, "c", 0.5),
        row(7, "c", 0.75),
    ]
    out = balance_classes(rows, 0.0)
    assert _scores(out, "a") == [0.0, 0.5]
    assert _scores(out, "b") == [0.0, 0.25, 0.5]
    assert _scores(out, "c") == [0.5]
    # A class of one row far above the others stays.
    single = [row(0, "a", 0.1), row(1, "a", 0.2), row(2, "b", 5.0)]
    assert ids(balance_classes(single, 0.0)) == [0, 1, 2]


def balance_by_popping(rows: list[dict], tolerance: float = 0.0) -> list[dict]:
    """The rule as written (quadratic): pop each class's worst row while its mean is above the
    lowest class mean times (1 + tolerance), keeping one."""
    by_label: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["match_loss"], r["synthetic_id"])):
        by_label.setdefault(r["label"], []).append(r)
    floor = min(np.mean([r["match_loss"] for r in m]) for m in by_label.values()) * (1 + tolerance)
    for members in by_label.values():
        while len(members) > 1 and np.mean([r["match_loss"] for r in members]) > floor:
            members.pop()
    return sorted((r for m in by_label.values() for r in m), key=lambda r: r["synthetic_id"])


def test_balance_matches_the_rule_as_written_on_random_tables():
    """The O(n log n) prefix-mean balance keeps exactly the rows the literal popping loop keeps,
    over 300 random tables with 2-4 classes and many ties (scores on a 1/8 grid: exact sums),
    with no tolerance (the paper's rule) and with one."""
    rng = random.Random(0)
    for trial in range(300):
        tolerance = 0.0 if trial % 2 else 0.25
        labels = [f"c{i}" for i in range(rng.randint(2, 4))]
        rows = [
            row(i, rng.choice(labels), rng.randint(0, 16) / 8) for i in range(rng.randint(2, 40))
        ]
        if len({r["label"] for r in rows}) < 2:
            continue
        assert ids(balance_classes(rows, 0.0, tolerance)) == ids(
            balance_by_popping(rows, tolerance)
        )


def test_balance_tolerance_keeps_a_class_within_it_and_cuts_one_beyond():
    """A class 2% above the lowest mean keeps its rows with tolerance 0.05 and loses its worst
    under the paper's strict rule; 10% above loses it under both."""
    near = [row(0, "a", 0.100), row(1, "a", 0.100), row(2, "b", 0.096), row(3, "b", 0.108)]
    assert ids(balance_classes(near, 0.0, 0.05)) == [0, 1, 2, 3]
    assert ids(balance_classes(near, 0.0, 0.0)) == [0, 1, 2]
    far = [row(0, "a", 0.100), row(1, "a", 0.100), row(2, "b", 0.100), row(3, "b", 0.120)]
    assert ids(balance_classes(far, 0.0, 0.05)) == [0, 1, 2]


def test_balance_unchanged_when_balanced_or_single_class():
    """Equal class means, or one class only: nothing dropped."""
    rows = [row(0, "a", 0.1), row(1, "a", 0.3), row(2, "b", 0.2), row(3, "b", 0.2)]
    assert ids(balance_classes(rows, 0.0)) == [0, 1, 2, 3]
    one = [row(0, "a", 0.1), row(1, "a", 9.0)]
    assert ids(balance_classes(one, 0.0)) == [0, 1]


# ---------------------------------------------------------------------------------------------
# The funnel


def fixture_rows() -> list[dict]:
    """Each rule has an effect on these rows (ppl_weight 0, score = match_loss)."""
    return [
        row(0, "positive", 0.5, rho=0.1, text="Other"),
        row(0, "positive", 0.25, rho=1.0, text="Nice film"),
        row(1, "positive", 0.75, text="nice  FILM"),  # duplicate of id 0's best
        row(2, "positive", 0.0, text="Odd film", predicted_label="negative"),  # fails check
        row(3, "positive", 1.0, text="Long film"),
        row(4, "negative", 0.5, text="Bad film"),
        row(5, "negative", 0.25, text="Awful film"),
        row(6, "negative", 0.75, text="Dull film", label_prob=0.6),
    ]


def _counts(funnel: list[dict]) -> list[tuple[str, int, dict]]:
    return [(f["step"], f["rows"], f["per_class"]) for f in funnel]


def test_select_rows_default_funnel_hand_computed():
    """All rules on, per_class 2: 8 -> 7 (label) -> 6 (rho) -> 5 (dedupe) -> 4 (top 2) -> 3
    (balance: positive [0.25, 1.0] mean 0.625 > negative [0.25, 0.5] mean 0.375, drops 1.0)."""
    sel = select_rows(fixture_rows(), SelectConfig(per_class=2, rule="lowest_loss"), LABELS)
    assert ids(sel.rows) == [0, 4, 5]
    assert sel.rows[0]["rho"] == 1.0
    assert _counts(sel.funnel) == [
        ("candidates", 8, {"negative": 3, "positive": 5}),
        ("label_check", 7, {"negative": 3, "positive": 4}),
        ("best_rho", 6, {"negative": 3, "positive": 3}),
        ("dedupe", 5, {"negative": 3, "positive": 2}),
        ("top_per_class", 4, {"negative": 2, "positive": 2}),
        ("balance", 3, {"negative": 2, "positive": 1}),
    ]


def test_select_rows_min_label_prob():
    """min_label_prob 0.7 also drops id 6 (label_prob 0.6)."""
    sel = select_rows(fixture_rows(), SelectConfig(per_class=None, min_label_prob=0.7), LABELS)
    assert sel.funnel[1] == {
        "step": "label_check",
        "rows": 6,
        "per_class": {"negative": 2, "positive": 4},
    }
    assert 6 not in ids(sel.rows)


def test_select_rows_label_check_off_hand_computed():
    """label_check off: id 2 (score 0) survives and wins its class."""
    cfg = SelectConfig(per_class=2, label_check=False, rule="lowest_loss")
    sel = select_rows(fixture_rows(), cfg, LABELS)
    assert [f["step"] for f in sel.funnel] == [
        "candidates",
        "best_rho",
        "dedupe",
        "top_per_class",
        "balance",
    ]
    assert [f["rows"] for f in sel.funnel] == [8, 7, 6, 4, 3]
    assert ids(sel.rows) == [0, 2, 5]


FLAG_CASES = {
    "all_on": {},
    "no_label_check": {"label_check": False},
    "no_dedupe": {"dedupe": False},
    "no_per_class": {"per_class": None},
    "no_balance": {"balance": False},
    "all_off": {"label_check": False, "dedupe": False, "per_class": None, "balance": False},
    "set_match": {"rule": "set_match"},  # balance stays on: it applies to lowest_loss only
    "set_match_no_per_class": {"rule": "set_match", "per_class": None},
}


def _expected_steps(rows: list[dict], cfg: SelectConfig) -> list[tuple[str, list[dict]]]:
    """The rules applied by hand in the documented order."""
    w = cfg.ppl_weight
    steps = [("candidates", rows)]
    if cfg.label_check:
        rows = [r for r in rows if passes_label_check(r, cfg.min_label_prob)]
        steps.append(("label_check", rows))
    rows = best_rho_per_id(rows, w)
    steps.append(("best_rho", rows))
    if cfg.dedupe:
        rows = dedupe_text(rows, w)
        steps.append(("dedupe", rows))
    if cfg.per_class is not None and cfg.rule == "set_match":
        rows = match_set(rows, cfg.per_class, TARGET)[0]
        steps.append(("set_match", rows))
    elif cfg.per_class is not None:
        rows = top_per_class(rows, cfg.per_class, w)
        steps.append(("top_per_class", rows))
    if cfg.balance and cfg.rule == "lowest_loss":
        rows = balance_classes(rows, w, cfg.balance_tolerance)
        steps.append(("balance", rows))
    return steps


@pytest.mark.parametrize("flags", FLAG_CASES.values(), ids=FLAG_CASES.keys())
def test_select_rows_funnel_steps_follow_flags(flags):
    """Steps present iff their rule is on; each count is the rows after that step; per-class
    counts sum to the rows."""
    cfg = replace(SelectConfig(per_class=2, rule="lowest_loss"), **flags)
    sel = select_rows(fixture_rows(), cfg, LABELS, target=TARGET)
    expected = _expected_steps(fixture_rows(), cfg)
    assert [f["step"] for f in sel.funnel] == [s for s, _ in expected]
    for f, (_, rows) in zip(sel.funnel, expected, strict=True):
        assert f["rows"] == len(rows)
        assert sum(f["per_class"].values()) == f["rows"]
        assert f["per_class"] == {lab: sum(r["label"] == lab for r in rows) for lab in LABELS}
    assert sel.funnel[-1]["rows"] == len(sel.rows)
    assert ids(sel.rows) == ids(expected[-1][1])
    step_names = {f["step"] for f in sel.funnel}
    assert ("label_check" in step_names) == cfg.label_check
    assert ("dedupe" in step_names) == cfg.dedupe
    lowest = cfg.rule == "lowest_loss"
    assert ("top_per_class" in step_names) == (cfg.per_class is not None and lowest)
    assert ("set_match" in step_names) == (cfg.per_class is not None and not lowest)
    assert ("balance" in step_names) == (cfg.balance and lowest)
    assert (sel.set_cosine is not None) == ("set_match" in step_names)
    if sel.set_cosine is not None:  # the reference: what the paper's rule would have kept
        reference = top_per_class(expected[-2][1], cfg.per_class, cfg.ppl_weight)
        s = sum(r["gradient"] for r in reference)
        cos = s @ TARGET / (np.linalg.norm(s) * np.linalg.norm(TARGET))
        assert sel.lowest_loss_cosine == pytest.approx(cos)
    assert {"candidates", "best_rho"} <= step_names


TEXTS = ["great movie", "bad film", "a fine story", "dull plot", "loved it", "so boring"]
RANDOM_LABELS = ["a", "b", "c"]


def random_rows(seed: int, n: int = 50) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        sid = rng.randrange(20)
        label = RANDOM_LABELS[sid % 3]  # one synthetic id, one label
        base = rng.choice(TEXTS)
        words = [w.upper() if rng.random() < 0.3 else w for w in base.split()]
        text = (" " * rng.randint(0, 2)) + (" " * rng.randint(1, 3)).join(words)
        rows.append(
            row(
                sid,
                label,
                rng.random(),
                rho=rng.choice([0.1, 1.0, 5.0]),
                seed=rng.randrange(100),
                text=text,
                log_ppl=rng.uniform(1, 6),
                label_prob=rng.random(),
                predicted_label=label if rng.random() < 0.7 else rng.choice(RANDOM_LABELS),
            )
        )
    return rows


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("flags", FLAG_CASES.values(), ids=FLAG_CASES.keys())
def test_select_rows_invariants_random(seed, flags):
    """Output is a subset of the input, at most per_class rows per class, all pass the label
    check (when on), normalised texts unique (when dedupe on), one row per synthetic id, and
    balanced classes with more than one row are at or below the lowest pre-balance class mean."""
    rows = random_rows(seed)
    base = SelectConfig(per_class=3, min_label_prob=0.2, ppl_weight=0.05, rule="lowest_loss")
    cfg = replace(base, **flags)
    sel = select_rows(rows, cfg, RANDOM_LABELS, target=TARGET)
    out = sel.rows
    assert all(any(r is x for x in rows) for r in out)
    assert len(set(ids(out))) == len(out)
    assert sum(sel.funnel[-1]["per_class"].values()) == len(out)
    counts = {lab: sum(r["label"] == lab for r in out) for lab in RANDOM_LABELS}
    if cfg.per_class is not None:
        assert all(c <= cfg.per_class for c in counts.values())
    if cfg.label_check:
        assert all(passes_label_check(r, cfg.min_label_prob) for r in out)
    if cfg.dedupe:
        norm = [normalise_text(r["text"]) for r in out]
        assert len(set(norm)) == len(norm)
    # Funnel counts never increase.
    sizes = [f["rows"] for f in sel.funnel]
    assert sizes == sorted(sizes, reverse=True)
    if cfg.rule == "set_match" and cfg.per_class is not None:  # exactly per_class where possible
        before = select_rows(rows, replace(cfg, per_class=None), RANDOM_LABELS).rows
        for lab in RANDOM_LABELS:
            available = sum(r["label"] == lab for r in before)
            assert counts[lab] == min(cfg.per_class, available)
    if cfg.balance and cfg.rule == "lowest_loss":
        before = select_rows(rows, replace(cfg, balance=False), RANDOM_LABELS).rows
        w = cfg.ppl_weight

        def score(r):
            return r["match_loss"] + w * r["log_ppl"]

        present = {r["label"] for r in before}
        # No class present before balancing disappears.
        assert {r["label"] for r in out} == present
        if len(present) >= 2:
            floor = min(np.mean([score(r) for r in before if r["label"] == lab]) for lab in present)
            floor *= 1 + cfg.balance_tolerance
            for lab in present:
                members = [score(r) for r in out if r["label"] == lab]
                if len(members) > 1:
                    assert np.mean(members) <= floor + 1e-12


# ---------------------------------------------------------------------------------------------
# Set matching


def match_set_literally(rows: list[dict], per_class: int, target: np.ndarray) -> list[int]:
    """The rule as written: in rounds, each class in sorted order adds the row that maximises
    cos(sum of the chosen gradients + its gradient, target), recomputed from scratch; ties to
    the lower id."""
    chosen: list[dict] = []
    for _ in range(per_class):
        for label in sorted({r["label"] for r in rows}):
            best, best_cos = None, -np.inf
            for r in sorted(rows, key=lambda r: r["synthetic_id"]):
                if r["label"] != label or any(r is c for c in chosen):
                    continue
                s = sum((c["gradient"] for c in chosen), np.zeros_like(target)) + r["gradient"]
                cos = s @ target / (np.linalg.norm(s) * np.linalg.norm(target))
                if cos > best_cos + 1e-12:
                    best, best_cos = r, cos
            if best is not None:
                chosen.append(best)
    return sorted(r["synthetic_id"] for r in chosen)


@pytest.mark.parametrize("seed", range(8))
def test_match_set_equals_the_literal_rule_on_random_tables(seed):
    """The incremental inner products pick what recomputing every cosine picks; the cosine
    returned is the chosen set's, computed directly."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 25))
    rows = [
        {"synthetic_id": int(i), "label": str(rng.choice(["a", "b", "c"])),
         "gradient": rng.normal(size=7) * rng.uniform(0.1, 5)}
        for i in rng.permutation(100)[:n]
    ]  # fmt: skip
    target = rng.normal(size=7)
    per_class = int(rng.integers(1, 5))
    out, cosine = match_set(rows, per_class, target)
    assert ids(out) == match_set_literally(rows, per_class, target)
    s = sum(r["gradient"] for r in out)
    assert cosine == pytest.approx(s @ target / (np.linalg.norm(s) * np.linalg.norm(target)))


def test_match_set_counts_ties_and_short_classes():
    """per_class rows of every class that has them, all of a class that has fewer; of two rows
    with the same gradient the lower id wins."""
    g = np.array([1.0, 0.0])
    rows = [
        {"synthetic_id": 7, "label": "pos", "gradient": g},
        {"synthetic_id": 3, "label": "pos", "gradient": g},
        {"synthetic_id": 5, "label": "pos", "gradient": np.array([0.0, 1.0])},
        {"synthetic_id": 9, "label": "neg", "gradient": g},
    ]
    out, _ = match_set(rows, 1, np.array([1.0, 0.0]))
    assert ids(out) == [3, 9]
    out, _ = match_set(rows, 2, np.array([1.0, 0.0]))
    assert sorted(ids(out)) == [3, 7, 9]


def test_match_set_recovers_the_direction_that_per_class_losses_miss():
    """The failure it exists for, in miniature (binary label_rows: an example's gradient is
    w·(±h) with w = 1 − p of its label, h = μ + δ, μ shared and large). Each class's target is
    its real rows' sum, the combined target their sum, which keeps only the separating direction.
    Per-class cosine (lowest loss) picks confident positives (small w) and unsure negatives
    (large w) when those lie nearest their class's direction: the set's summed gradient is the negatives' shared part, nearly orthogonal to the
    real one. Set matching picks rows whose sizes cancel the shared part."""
    rng = np.random.default_rng(0)
    d = 8
    mu = np.zeros(d)
    mu[0] = 10.0
    sep = np.zeros(d)
    sep[1] = 1.0

    def grad(label: str, w: float, noise: float) -> np.ndarray:
        h = mu + (sep if label == "pos" else -sep) + noise * rng.normal(size=d)
        sign = -1.0 if label == "pos" else 1.0  # ∂CE/∂(z_pos − z_neg): push towards the label
        return np.concatenate([sign * w * h, -sign * w * h])

    real = {lab: sum(grad(lab, 0.3, 0.3) for _ in range(50)) for lab in ("pos", "neg")}
    target = real["pos"] + real["neg"]

    def loss(r):  # the per-class matching loss: 1 − cos(g, own class target)
        t = real[r["label"]]
        return 1 - r["gradient"] @ t / (np.linalg.norm(r["gradient"]) * np.linalg.norm(t))

    rows, sid = [], 0
    # (weight, noise): the rows that are worst as a set lie closest to their class's direction.
    kinds = {
        "pos": [(0.02, 0.01)] * 3 + [(0.3, 0.1)] * 2,
        "neg": [(0.6, 0.01)] * 3 + [(0.3, 0.1)] * 2,
    }
    for label, weights in kinds.items():
        for w, noise in weights:
            rows.append({"synthetic_id": sid, "label": label, "gradient": grad(label, w, noise)})
            sid += 1
    for r in rows:
        r["match_loss"] = loss(r)

    def cos_of(chosen):
        s = sum(r["gradient"] for r in chosen)
        return float(s @ target / (np.linalg.norm(s) * np.linalg.norm(target)))

    per_class_choice = []
    for label in ("pos", "neg"):
        per_class_choice += sorted((r for r in rows if r["label"] == label), key=loss)[:2]
    out, cosine = match_set(rows, 2, target)
    assert cosine == pytest.approx(cos_of(out))
    assert cosine > 0.9
    assert cos_of(per_class_choice) < 0.5


def test_select_rows_set_match_needs_its_target():
    with pytest.raises(AssertionError, match="set_match without a target"):
        select_rows(fixture_rows(), SelectConfig(per_class=2, rule="set_match"), LABELS)


# ---------------------------------------------------------------------------------------------
# Output table


def test_synthetic_table_contract(tmp_path):
    """Exact columns; prompt is the data template applied to the text, completion the label's
    verbalizer; writes to parquet and loads back with pandas."""
    cfg = Config()
    rows = [
        row(3, "positive", 0.2, rho=0.5, seed=11, text="A warm story", log_ppl=3.0, label_prob=0.8),
        row(1, "negative", 0.4, rho=1.0, seed=12, text="Flat and dull", log_ppl=2.5),
        row(7, "positive", 0.1, rho=1.0, seed=13, text="Lovely", log_ppl=4.0, label_prob=0.7),
    ]
    table = synthetic_table(rows, cfg)
    expected_cols = [
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
    ]
    assert table.column_names == expected_cols
    assert tuple(expected_cols) == OUTPUT_COLUMNS
    assert table.num_rows == 3
    path = tmp_path / "synthetic.parquet"
    pq.write_table(table, path)
    df = pd.read_parquet(path)
    assert list(df.columns) == expected_cols
    by_id = {r["synthetic_id"]: r for r in rows}
    assert sorted(df["id"].tolist()) == [1, 3, 7]
    for rec in df.to_dict("records"):
        src = by_id[rec["id"]]
        assert rec["text"] == src["text"]
        assert rec["label"] == src["label"]
        assert rec["prompt"] == cfg.data.prompt_template.format(text=src["text"])
        assert rec["completion"] == cfg.data.verbalizers[src["label"]]
        assert rec["match_loss"] == pytest.approx(src["match_loss"])
        assert rec["log_ppl"] == pytest.approx(src["log_ppl"])
        assert rec["label_prob"] == pytest.approx(src["label_prob"])
        assert rec["rho"] == pytest.approx(src["rho"])
        assert rec["seed"] == src["seed"]
    assert df["id"].dtype == np.int64 and df["seed"].dtype == np.int64
    # Sorted by label, then score.
    assert df["id"].tolist() == [1, 7, 3]


def test_synthetic_table_custom_template():
    """A non-default template and verbalizers are honoured."""
    base = Config()
    data = replace(
        base.data, prompt_template="Review: {text}\nSentiment:", verbalizers={"x": " X", "y": " Y"}
    )
    cfg = replace(base, data=data)
    table = synthetic_table([row(0, "y", text="meh")], cfg)
    assert table.column("prompt").to_pylist() == ["Review: meh\nSentiment:"]
    assert table.column("completion").to_pylist() == [" Y"]
