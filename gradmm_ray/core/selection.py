"""Selection rules: pure functions on plain rows (dicts of scores), each tested with a table of
cases. The order, each step optional, and the counts after each step form the funnel:
label check -> best rho per synthetic id -> dedupe by normalised text -> ``per_class`` rows per
class, by one of two rules (``select.rule``):

  * ``set_match``: the rows whose gradients, summed, point most nearly where the release's
    combined target (the sum of every class's noisy sum) points (``match_set``);
  * ``lowest_loss`` (the paper's): each class's ``per_class`` lowest scores (score = match_loss +
    ppl_weight * log_ppl), then optionally the paper's balancing of the classes' mean scores.

Why set_match: each example is solved against its own class's target by cosine, blind to its
gradient's size (1 − p of its label). Fine-tuning follows the SUM over the set, where the classes'
gradients nearly cancel (on SmolLM2 the two class targets have cosine −0.99) and what is left,
the direction that separates them, depends on those sizes. Rows chosen one class at a time can
leave a set whose summed gradient points away from the real one (measured: README, Quality).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradmm_ray.config import SelectConfig
from gradmm_ray.core.text import normalise_text


def selection_score(row: dict, ppl_weight: float) -> float:
    return row["match_loss"] + ppl_weight * row["log_ppl"]


def passes_label_check(row: dict, min_label_prob: float) -> bool:
    return row["predicted_label"] == row["label"] and row["label_prob"] >= min_label_prob


def best_rho_per_id(rows: list[dict], ppl_weight: float) -> list[dict]:
    best: dict[int, dict] = {}
    for r in rows:
        cur = best.get(r["synthetic_id"])
        if cur is None or selection_score(r, ppl_weight) < selection_score(cur, ppl_weight):
            best[r["synthetic_id"]] = r
    return [best[k] for k in sorted(best)]


def dedupe_text(rows: list[dict], ppl_weight: float) -> list[dict]:
    """One row per normalised text, the lowest score (then lowest id) kept."""
    kept: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: (selection_score(r, ppl_weight), r["synthetic_id"])):
        kept.setdefault(normalise_text(r["text"]), r)
    return sorted(kept.values(), key=lambda r: r["synthetic_id"])


def top_per_class(rows: list[dict], per_class: int, ppl_weight: float) -> list[dict]:
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    out = []
    for label in sorted(by_label):
        out += sorted(
            by_label[label], key=lambda r: (selection_score(r, ppl_weight), r["synthetic_id"])
        )[:per_class]
    return sorted(out, key=lambda r: r["synthetic_id"])


def balance_classes(rows: list[dict], ppl_weight: float, tolerance: float = 0.0) -> list[dict]:
    """Each class whose mean score is above the lowest class mean (times 1 + ``tolerance``)
    drops its worst rows until its mean is at or below it, keeping at least one row (paper
    Sec. 4.4, generalised from two classes to any number; tolerance 0 is the paper's rule: with
    near-equal means it cut a demo's class from 4 rows to 1 over a 2% gap). O(n log n): after
    sorting, the mean of each class's m best rows is a prefix mean, so the rows kept are the
    longest prefix whose mean is at most the floor."""
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    if len(by_label) < 2:
        return rows
    prefix_means = {}
    for label, members in by_label.items():
        members.sort(key=lambda r: (selection_score(r, ppl_weight), r["synthetic_id"]))
        scores = np.array([selection_score(r, ppl_weight) for r in members])  # ascending
        prefix_means[label] = np.cumsum(scores) / np.arange(1, len(scores) + 1)  # (n,)
    floor = min(means[-1] for means in prefix_means.values()) * (1.0 + tolerance)
    kept = []
    for label, members in by_label.items():
        within = np.flatnonzero(prefix_means[label] <= floor)
        kept += members[: int(within[-1]) + 1 if len(within) else 1]
    return sorted(kept, key=lambda r: r["synthetic_id"])


def match_set(rows: list[dict], per_class: int, target: np.ndarray) -> tuple[list[dict], float]:
    """Greedy set matching: in rounds, each class (sorted) adds the row whose gradient
    (``row["gradient"]``, the example's own in the released space) makes the set's summed
    gradient s closest in cosine to ``target``; ties go to the lower synthetic id. Every class
    gets ``per_class`` rows (or all it has). Returns (rows, cos(s, target)).

    O(picks · n · D): per candidate ⟨s, gᵢ⟩ is kept up to date with one matrix-vector product
    per pick, and cos(s + gᵢ, t) = (⟨s, t⟩ + ⟨gᵢ, t⟩) / √(‖s‖² + 2⟨s, gᵢ⟩ + ‖gᵢ‖²)."""
    rows = sorted(rows, key=lambda r: r["synthetic_id"])
    if not rows:
        return [], float("nan")
    grads = np.stack([np.asarray(r["gradient"], dtype=np.float64) for r in rows])  # (n, D)
    t = np.asarray(target, dtype=np.float64)
    g_t, g_sq = grads @ t, np.einsum("nd,nd->n", grads, grads)  # (n,), (n,)
    s_g = np.zeros(len(rows))  # ⟨s, gᵢ⟩
    s_t = s_sq = 0.0
    labels = np.array([r["label"] for r in rows], dtype=object)
    free = np.ones(len(rows), dtype=bool)
    chosen: list[int] = []
    for _ in range(per_class):
        for label in sorted(set(labels)):
            candidates = np.flatnonzero(free & (labels == label))
            if not len(candidates):
                continue
            norm = np.sqrt(np.maximum(s_sq + 2 * s_g[candidates] + g_sq[candidates], 1e-300))
            pick = int(candidates[np.argmax((s_t + g_t[candidates]) / norm)])
            chosen.append(pick)
            free[pick] = False
            s_t, s_sq = s_t + g_t[pick], s_sq + 2 * s_g[pick] + g_sq[pick]
            s_g += grads @ grads[pick]
    kept = sorted((rows[i] for i in chosen), key=lambda r: r["synthetic_id"])
    return kept, summed_gradient_cosine(kept, target)


def summed_gradient_cosine(rows: list[dict], target: np.ndarray) -> float:
    """cos(Σ row["gradient"], target); nan for no rows."""
    if not rows:
        return float("nan")
    s = np.sum([np.asarray(r["gradient"], dtype=np.float64) for r in rows], axis=0)
    t = np.asarray(target, dtype=np.float64)
    return float(s @ t / max(np.linalg.norm(s) * np.linalg.norm(t), 1e-300))


@dataclass
class Selection:
    rows: list[dict]
    funnel: list[dict]  # [{"step": ..., "rows": ..., "per_class": {...}}]
    set_cosine: float | None = None  # set_match: cos(the set's summed gradient, the target)
    # set_match: the same cosine for the rows the paper's rule (lowest loss) would have kept
    lowest_loss_cosine: float | None = None


def _count(step: str, rows: list[dict], labels: list[str]) -> dict:
    per = {label: 0 for label in labels}
    for r in rows:
        per[r["label"]] += 1
    return {"step": step, "rows": len(rows), "per_class": per}


def select_rows(
    rows: list[dict], cfg: SelectConfig, labels: list[str], target: np.ndarray | None = None
) -> Selection:
    """The funnel. ``target`` (set_match): the release's combined target, flattened as the rows'
    ``gradient`` values."""
    w = cfg.ppl_weight
    funnel = [_count("candidates", rows, labels)]
    if cfg.label_check:
        rows = [r for r in rows if passes_label_check(r, cfg.min_label_prob)]
        funnel.append(_count("label_check", rows, labels))
    rows = best_rho_per_id(rows, w)
    funnel.append(_count("best_rho", rows, labels))
    if cfg.dedupe:
        rows = dedupe_text(rows, w)
        funnel.append(_count("dedupe", rows, labels))
    set_cosine = lowest_loss_cosine = None
    if cfg.rule == "set_match" and cfg.per_class is not None:
        if target is None:
            raise AssertionError("Internal error: select.rule set_match without a target")
        lowest_loss_cosine = summed_gradient_cosine(top_per_class(rows, cfg.per_class, w), target)
        rows, set_cosine = match_set(rows, cfg.per_class, target)
        funnel.append(_count("set_match", rows, labels))
    elif cfg.per_class is not None:
        rows = top_per_class(rows, cfg.per_class, w)
        funnel.append(_count("top_per_class", rows, labels))
    if cfg.rule == "lowest_loss" and cfg.balance:
        rows = balance_classes(rows, w, cfg.balance_tolerance)
        funnel.append(_count("balance", rows, labels))
    return Selection(rows, funnel, set_cosine, lowest_loss_cosine)
