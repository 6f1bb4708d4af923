"""What a run leaves for people: manifest.json, report.md with PNG plots, the printed summary."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from gradmm_ray.config import Config
from gradmm_ray.provenance import package_versions, png_bytes

MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.md"
NOISE_WARNING_RATIO = 1.0  # estimated noise norm / clean sum norm above which the summary warns


def _noise_to_signal_sentence(p: dict) -> str:
    ratios = ", ".join(f"{k}: {v:.3g}" for k, v in p["noise_to_signal"].items())
    return (
        f"Over the {p['target_dims']} entries of a class's target (target space "
        f"{p.get('target_space', 'full_head')}), the noise's norm is about "
        f"{ratios} times the clean sum's (estimated from the release itself); above 1, matching "
        "mostly fits noise. For the sum over classes, which select.rule set_match matches and "
        "in which the classes' sums largely cancel: "
        f"{p.get('noise_to_signal_combined', float('nan')):.3g}. "
    )


def privacy_paragraph(p: dict) -> str:
    """What the release protects, in words, from the record."""
    head = "" if p["private"] else "**NOT PRIVATE.** "
    return (
        head + f"(epsilon, delta) = ({p['epsilon']}, {p['delta']}), clip norm C = {p['clip_norm']} "
        f"({p.get('clip_norm_source', 'set in the config')}), noise multiplier z = {p['noise_multiplier']:.4g}, {p['adjacency']} adjacency; unit of "
        f"privacy: {p['unit_of_privacy']}. Sampling: {p['sampling']} (rate {p['sample_rate']:g}). "
        f"Noise: {p['noise_source']}, std {p['noise_std_of_sum']:.3g} on every entry of each "
        f"class's sum. Released: {p['released']}. Counts: {p['counts']}. "
        + (_noise_to_signal_sentence(p) if p["noise_std_of_sum"] > 0 else "")
        + p["note"]
    )


# SmolLM2-135M's mean log-perplexity of real movie-review sentences (rt-snippets' pool; README,
# Quality): the readability reference for the default model, measured on public data.
SMOLLM2_REAL_TEXT_LOG_PPL = 5.19


def at_a_glance(cfg: Config, scored: pa.Table, selection, p: dict) -> list[str]:
    """How good the result is, for a newcomer: each figure beside a reference that needs no
    real data (the rows' own pre-ADMM start, every candidate, the paper's rule)."""
    import numpy as np

    rows = selection.rows
    median = lambda key, rs: float(np.median([r[key] for r in rs]))  # noqa: E731
    lines = ["## At a glance", ""]
    lines.append(
        f"* **Gradient match** (matching loss 1 - cosine between a row's gradient and its class's "
        f"released target: 0 = the same direction, 1 = unrelated): the {len(rows)} selected rows "
        f"median {median('match_loss', rows):.3f}; the same rows before ADMM (the model's own "
        f"continuation of the generation prefix, public) {median('initial_match_loss', rows):.3f}; "
        f"all {scored.num_rows} candidates {float(np.median(scored.column('match_loss').to_numpy())):.3f}."
    )
    if selection.set_cosine is not None:
        lines.append(
            f"* **The set as a whole**: its summed gradient has cosine {selection.set_cosine:.3f} "
            f"with the combined target (1 = fine-tuning starts along the real data's gradient; "
            f"the paper's lowest-loss rows: {selection.lowest_loss_cosine:.3f})."
        )
    passed = selection.funnel[1]["rows"] if len(selection.funnel) > 1 else scored.num_rows
    lines.append(
        f"* **Label**: the model gives the selected rows' own label a median probability of "
        f"{median('label_prob', rows):.2f} among the label options; {passed} of "
        f"{selection.funnel[0]['rows']} candidates passed the label check "
        f"(select.min_label_prob = {cfg.select.min_label_prob:g})."
    )
    reference = (
        f" (the same model on real movie-review sentences: {SMOLLM2_REAL_TEXT_LOG_PPL})"
        if cfg.model.name == "smollm2-135m"
        else ""
    )
    lines.append(
        f"* **Readability**: median log-perplexity of the selected texts under the model "
        f"{median('log_ppl', rows):.2f}{reference}; lower reads more fluently."
    )
    if p["noise_std_of_sum"] > 0:
        worst = max(p["noise_to_signal"].values())
        verdict = (
            "mostly noise: the rows match noise more than the data"
            if worst > 1
            else "mostly signal"
        )
        lines.append(
            f"* **Privacy**: (epsilon, delta) = ({p['epsilon']}, {p['delta']}): including or "
            f"leaving out any one real row changes the probability of anything computed from this "
            f"output by at most a factor e^{p['epsilon']:g} (= {np.exp(p['epsilon']):.3g}), except "
            f"with probability {p['delta']:g}. The price: each class's target is {verdict} "
            f"(noise/signal up to {worst:.2f})."
        )
    else:
        lines.append("* **Privacy**: none (epsilon = inf): the targets carry no noise.")
    return lines + [""]


def write_manifest(out, cfg: Config, summary, record: dict) -> None:
    previous = out.read_json(MANIFEST_FILE) if out.exists(MANIFEST_FILE) else {}
    timings = {
        **previous.get("timings_seconds", {}),
        **{k: round(v, 3) for k, v in summary.timings.items()},
    }
    counts = {**previous.get("counts", {}), **summary.counts}
    out.write_json(
        MANIFEST_FILE,
        {
            "config": cfg.to_dict(),
            "versions": package_versions(),
            "model": record.get("model"),
            "privacy": record.get("privacy"),
            "timings_seconds": timings,
            "counts": counts,
            "cluster": summary.cluster,
            "command": " ".join(sys.argv),
        },
    )


# ---------------------------------------------------------------------------------------------
# Plots


def plot_loss_distribution(scored: pa.Table, selected_ids: set[tuple[int, float]]):
    import matplotlib.pyplot as plt

    labels = sorted(set(scored.column("label").to_pylist()))
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.2), squeeze=False)
    rows = scored.to_pylist()
    all_losses = [r["match_loss"] for r in rows]
    bins = np.linspace(min(all_losses), max(all_losses) + 1e-9, 16)
    for ax, label in zip(axes[0], labels, strict=True):
        cand = [r["match_loss"] for r in rows if r["label"] == label]
        kept = [
            r["match_loss"]
            for r in rows
            if r["label"] == label and (r["synthetic_id"], r["rho"]) in selected_ids
        ]
        ax.hist(cand, bins=bins, alpha=0.5, label=f"candidates ({len(cand)})")
        ax.hist(kept, bins=bins, alpha=0.8, label=f"selected ({len(kept)})")
        ax.set_title(f"label: {label}")
        ax.set_xlabel("matching loss (1 - cos)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("examples")
    return fig


def plot_admm_curves(scored: pa.Table):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, column, title in (
        (axes[0], "projected_loss_curve", "matching loss of the projection Z"),
        (axes[1], "residual_curve", "primal residual ||X - Z||"),
    ):
        curves = scored.column(column).to_pylist()
        width = min(len(c) for c in curves)
        arr = np.array([c[:width] for c in curves])  # (examples, iterations)
        x = np.arange(width)
        med, lo, hi = np.median(arr, 0), np.percentile(arr, 25, 0), np.percentile(arr, 75, 0)
        ax.plot(x, med, label="median")
        ax.fill_between(x, lo, hi, alpha=0.3, label="25-75%")
        ax.set_title(title)
        ax.set_xlabel("outer iteration")
        ax.legend(fontsize=8)
    return fig


def plot_funnel(funnel: list[dict]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    steps = [f["step"] for f in funnel]
    labels = sorted(funnel[0]["per_class"])
    bottom = np.zeros(len(steps))
    for label in labels:
        vals = np.array([f["per_class"][label] for f in funnel])
        ax.bar(steps, vals, bottom=bottom, label=label)
        bottom += vals
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # rows are counted, not measured
    ax.set_ylabel("rows")
    ax.set_title("selection funnel")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    return fig


def plot_audit_distances(audit: pa.Table):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(audit.column("nearest_distance").to_pylist(), bins=15)
    ax.set_xlabel("L2 distance to the nearest real example (mean-pooled hidden states)")
    ax.set_ylabel("selected examples")
    return fig


def audit_section(audit: pa.Table) -> list[str]:
    rows = sorted(audit.to_pylist(), key=lambda r: r["nearest_distance"])
    lines = [
        "## Privacy audit (outside the DP guarantee)",
        "",
        "This section reads the real data after the release, so it is NOT covered by the privacy "
        "guarantee above. Real examples are shown only as a file and a row in it.",
        "",
        "![audit](plots/audit_distances.png)",
        "",
        "Closest pairs:",
        "",
        "| synthetic id | label | nearest real row (file:row) | distance | longest shared token run |",
        "|---|---|---|---|---|",
    ]
    for r in rows[:5]:
        lines.append(
            f"| {r['id']} | {r['label']} | {Path(r['nearest_real_file']).name}:{r['nearest_real_row']} "
            f"| {r['nearest_distance']:.4f} | {r['longest_common_ngram']} |"
        )
    return lines


def write_report(
    out, cfg: Config, scored: pa.Table, selection, record: dict, audit: pa.Table | None = None
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    selected_ids = {(r["synthetic_id"], r["rho"]) for r in selection.rows}
    plots = {
        "plots/match_loss.png": plot_loss_distribution(scored, selected_ids),
        "plots/admm_curves.png": plot_admm_curves(scored),
        "plots/funnel.png": plot_funnel(selection.funnel),
    }
    if audit is not None:
        plots["plots/audit_distances.png"] = plot_audit_distances(audit)
    for rel, fig in plots.items():
        out.write_bytes(rel, png_bytes(fig))

    p = record["privacy"]
    lines = [
        "# gradmm-ray report",
        "",
        f"Model `{cfg.model.name}`; the real examples distilled into {len(selection.rows)} "
        "synthetic examples.",
        "",
        *at_a_glance(cfg, scored, selection, p),
        "## Privacy",
        "",
        privacy_paragraph(p),
        "",
        "## Selection funnel",
        "",
        "Rows of synthetic candidates after each step. " + selection_rule_sentence(cfg, selection),
        "",
        "| step | rows | " + " | ".join(sorted(selection.funnel[0]["per_class"])) + " |",
        "|---|---|" + "---|" * len(selection.funnel[0]["per_class"]),
    ]
    for f in selection.funnel:
        lines.append(
            f"| {f['step']} | {f['rows']} | "
            + " | ".join(str(f["per_class"][k]) for k in sorted(f["per_class"]))
            + " |"
        )
    lines += [
        "",
        "![funnel](plots/funnel.png)",
        "",
        "## Matching loss before and after selection",
        "",
        "![matching loss](plots/match_loss.png)",
        "",
        "## ADMM convergence",
        "",
        "Median and interquartile range over all candidates, per outer iteration.",
        "",
        "![ADMM curves](plots/admm_curves.png)",
        "",
        "## Selected examples",
        "",
        "| label | text | matching loss | log-ppl | label prob |",
        "|---|---|---|---|---|",
    ]
    by_label: dict[str, list[dict]] = {}
    for r in sorted(selection.rows, key=lambda r: r["match_loss"]):
        by_label.setdefault(r["label"], []).append(r)
    for label in sorted(by_label):
        for r in by_label[label][:5]:
            text = r["text"].replace("|", "\\|")
            lines.append(
                f"| {label} | {text} | {r['match_loss']:.4f} | {r['log_ppl']:.3f} | {r['label_prob']:.3f} |"
            )
    if audit is not None:
        lines += ["", *audit_section(audit)]
    out.write_text(REPORT_FILE, "\n".join(lines) + "\n")
    return [REPORT_FILE, *plots]


def selection_rule_sentence(cfg: Config, selection) -> str:
    if selection.set_cosine is not None:
        return (
            "`set_match` chose the rows, class by class in rounds, whose gradients summed point "
            "most nearly where the release's combined target (all classes' noisy sums) points: "
            f"cosine {selection.set_cosine:.3f} for the selected set (1 = the same direction; "
            "fine-tuning on the set then starts along the real data's gradient), against "
            f"{selection.lowest_loss_cosine:.3f} for the rows the paper's rule (each class's "
            "lowest matching losses) would have kept."
        )
    if cfg.select.rule == "lowest_loss" and cfg.select.balance:
        return (
            "`balance` equalises quality, not counts: each class drops its worst rows until its "
            "mean score is at or below the lowest class mean, so the classes can end with "
            "different numbers of rows."
        )
    return ""


def format_summary(summary) -> str:
    lines = [
        f"gradmm-ray: done ({summary.mode} run, {summary.cluster})",
        f"  output   {summary.output}",
    ]
    for f in summary.files:
        lines.append(f"           {f}")
    c = summary.counts
    if "solve" in c:
        s = c["solve"]
        first = s.get("first_result_seconds")
        lines.append(
            f"  solve    {s['work_items']} work items: {s['solved_now']} solved now, {s['already_done']} already done"
            + (f" (first result after {first:.1f}s)" if first is not None else "")
        )
    if "funnel" in c:
        lines.append(
            "  select   "
            + " -> ".join(f"{f['step']} {f['rows']}" for f in c["funnel"])
            + (
                f" (the set's gradient vs the target: cosine {c['set_cosine']:.3f}; the paper's "
                f"lowest-loss rows: {c['lowest_loss_cosine']:.3f})"
                if "set_cosine" in c
                else ""
            )
        )
        empty = [label for label, n in c["funnel"][-1]["per_class"].items() if n == 0]
        if empty:
            lines.append(
                f"  warning  no example selected for {', '.join(empty)}: generate more candidates "
                "(solve.candidates_per_class) or relax the label check (select.min_label_prob)"
            )
    if summary.privacy:
        p = summary.privacy
        ratio = max(p["noise_to_signal"].values(), default=0.0)
        lines.append(
            f"  privacy  epsilon={p['epsilon']} delta={p['delta']} C={p['clip_norm']} "
            f"z={p['noise_multiplier']:.4g} ({p['adjacency']}, sample rate {p['sample_rate']:g})"
            + (
                f", noise/signal ~{ratio:.3g} per class, "
                f"~{p.get('noise_to_signal_combined', float('nan')):.3g} over all classes"
                if ratio > 0
                else ""
            )
            + "; no count of real rows is published"
        )
        if not p["private"]:
            lines.append(f"  WARNING  this output is NOT private: {p['note']}")
        if ratio > NOISE_WARNING_RATIO:
            lines.append(
                f"  warning  each class's target carries noise about {ratio:.3g}x the norm of "
                "its clean gradient sum: matching will mostly fit noise; use more real rows "
                "(a larger privacy.sample_rate) or a larger privacy.epsilon where acceptable"
            )
    lines.append("  timings  " + ", ".join(f"{k} {v:.1f}s" for k, v in summary.timings.items()))
    return "\n".join(lines)
