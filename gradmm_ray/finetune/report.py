"""What a finetune job reports: per method, the (lr, step) chosen on DEV for each seed and its
TEST accuracy and loss, mean and sample standard deviation over seeds, the gradient-error curve;
written as metrics.json, history.json, results.md (a table like the paper's Table 1) and two
plots; and the summary printed at the end."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradmm_ray.core.training import Example, RunSpec
from gradmm_ray.finetune.config import SYNTHETIC, FinetuneConfig
from gradmm_ray.io.storage import OutputDir
from gradmm_ray.provenance import package_versions, png_bytes

METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
RESULTS_FILE = "results.md"
DISPLAY_NAMES = {
    "zero-shot": "Zero-shot (no fine-tuning)",
    SYNTHETIC: "GRADMM synthetic (--train)",
    "random": "Random real",
    "herding": "Herding real",
    "kcenter": "K-center real",
    "full": "Full real train pool",
    "same-real": "Real rows used for generation",
}


# ---------------------------------------------------------------------------------------------
# Choosing on DEV, summarising over seeds


def choose_on_dev(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The record with the best DEV accuracy (then lower DEV loss, then the earlier one) among the
    evaluated ones; TEST is read only here, at the chosen record."""
    evaluated = [r for r in records if "dev_accuracy" in r]
    if not evaluated:
        raise AssertionError("Internal error: a run has no evaluated record")
    return max(evaluated, key=lambda r: (r["dev_accuracy"], -r["dev_loss"]))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    vals = [float(v) for v in values]
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(
    histories: Sequence[dict[str, Any]], n_train: dict[str, int], seeds: Sequence[int]
) -> list[dict[str, Any]]:
    """One entry per method: per seed the (lr, step) chosen on DEV across the lr grid, its TEST
    accuracy/loss, mean and standard deviation over seeds, and the gradient-error curve of the
    chosen learning rates."""
    names: list[str] = []
    for h in histories:
        if h["spec"]["name"] not in names:
            names.append(h["spec"]["name"])
    out = []
    for name in names:
        mine = [h for h in histories if h["spec"]["name"] == name]
        per_seed, curves = [], []
        for seed in sorted({h["spec"]["seed"] for h in mine}):
            candidates = [
                {**r, "lr": h["spec"]["lr"], "_history": h}
                for h in mine
                if h["spec"]["seed"] == seed
                for r in h["records"]
            ]
            best = choose_on_dev(candidates)
            per_seed.append(
                {
                    "seed": seed,
                    "accuracy": best["test_accuracy"],
                    "loss": best["test_loss"],
                    "completion_loss": best["test_completion_loss"],
                    "lr": best["lr"],
                    "step": best["step"],
                    "dev_accuracy": best["dev_accuracy"],
                    "dev_loss": best["dev_loss"],
                }
            )
            curves.append({r["step"]: r for r in best["_history"]["records"] if "grad_error" in r})
        if name == "zero-shot":  # deterministic: one evaluation stands for every seed
            per_seed = [{**per_seed[0], "seed": s} for s in seeds]
        acc_mean, acc_std = mean_std([s["accuracy"] for s in per_seed])
        loss_mean, loss_std = mean_std([s["loss"] for s in per_seed])
        steps = sorted({s for c in curves for s in c})
        curve = []
        for step in steps:
            at = [c[step] for c in curves if step in c]
            point = {"step": step}
            point["mean"], point["std"] = mean_std([r["grad_error"] for r in at])
            classwise = [r["grad_error_classwise"] for r in at if "grad_error_classwise" in r]
            if classwise:
                point["classwise_mean"], point["classwise_std"] = mean_std(classwise)
            curve.append(point)
        out.append(
            {
                "name": name,
                "n_train": n_train.get(name, 0),
                "accuracy_mean": acc_mean,
                "accuracy_std": acc_std,
                "loss_mean": loss_mean,
                "loss_std": loss_std,
                "seeds": per_seed,
                "grad_error": curve,
            }
        )
    return out


def n_train_of(sets: dict[str, list[Example]], runs: Sequence[RunSpec]) -> dict[str, int]:
    return {r.name: len(sets.get(r.set_key, [])) for r in runs}


# ---------------------------------------------------------------------------------------------
# Reports: metrics.json, results.md, plots


def plot_accuracy(runs: Sequence[dict[str, Any]], title: str = "test accuracy (chosen on dev)"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(runs) + 1.4))
    y = np.arange(len(runs))
    acc = [100 * r["accuracy_mean"] for r in runs]
    err = [100 * r["accuracy_std"] for r in runs]
    ax.barh(y, acc, xerr=err, color="tab:blue", alpha=0.8, capsize=3)
    ax.set_yticks(y, [f"{r['name']} (n={r['n_train']})" for r in runs])
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (%), mean ± std over seeds")
    lo = max(0.0, min(acc) - max(err + [0]) - 10)
    ax.set_xlim(lo, 100)
    ax.set_title(title)
    for yi, a, e in zip(y, acc, err, strict=True):
        ax.text(a + e + 0.8, yi, f"{a:.1f}", va="center", fontsize=8)
    return fig


def plot_grad_error(runs: Sequence[dict[str, Any]], title: str = "last-layer gradient error"):
    """Left: the error of the set's mean gradient; right: the mean per-class error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    panels = (
        ("mean", "std", "all rows"),
        ("classwise_mean", "classwise_std", "per class, averaged"),
    )
    for ax, (key, spread, what) in zip(axes, panels, strict=True):
        for r in runs:
            points = [c for c in r["grad_error"] if key in c]
            if not points:
                continue
            steps = [c["step"] for c in points]
            mean = np.array([c[key] for c in points])
            std = np.array([c[spread] for c in points])
            ax.plot(steps, mean, marker="o", ms=3, label=f"{r['name']} (n={r['n_train']})")
            ax.fill_between(steps, np.maximum(mean - std, 0.0), mean + std, alpha=0.15)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("‖G(set) − G(real)‖ / ‖G(real)‖")
        ax.set_yscale("symlog", linthresh=0.01)  # spans 0 (full) to >10 (step 0)
        ax.set_title(f"{title}: {what}", fontsize=10)
    axes[0].legend(fontsize=7)
    return fig


def results_table(runs: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| method | # train | test accuracy (%) | test loss | chosen lr (per seed) | chosen step (per seed) | final gradient error (per class) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lrs = ", ".join(f"{s['lr']:g}" for s in r["seeds"]) if r["name"] != "zero-shot" else "-"
        steps = ", ".join(str(s["step"]) for s in r["seeds"]) if r["name"] != "zero-shot" else "-"
        last = r["grad_error"][-1] if r["grad_error"] else None
        final = f"{last['mean']:.3f}" if last else "-"
        if last and "classwise_mean" in last:
            final += f" ({last['classwise_mean']:.3f})"
        lines.append(
            f"| {DISPLAY_NAMES.get(r['name'], r['name'])} | {r['n_train']} | "
            f"{100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f} | "
            f"{r['loss_mean']:.3f} ± {r['loss_std']:.3f} | {lrs} | {steps} | {final} |"
        )
    return lines


def _listed(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def results_markdown(metrics: dict[str, Any]) -> str:
    p, s = metrics["protocol"], metrics["splits"]
    lines = [
        "# Fine-tuning results",
        "",
        f"Model `{metrics['model']}`, trained on `{metrics['train']}`; real data `{s['source']}`.",
        "",
        *results_table(metrics["runs"]),
        "",
        "Accuracy and loss are on the TEST split, at the learning rate and checkpoint with the best "
        "DEV accuracy for each seed (TEST never takes part in the choice); ± is the sample standard "
        f"deviation over seeds {_listed(p['seeds'])}. Zero-shot is one deterministic evaluation. The "
        "gradient error is ‖G(set) − G(real)‖ / ‖G(real)‖ of the LM head's completion cross-entropy "
        "gradient at the current parameters, at the chosen learning rates, at the last step; in "
        "brackets the mean over classes of the per-class error (GRADMM matches one gradient per "
        "class, so a set whose class balance differs from the real data's has a large overall "
        "error even when each class matches). `full` is the gradient reference itself (error 0) "
        "when the pool fits `splits.grad_error_rows`.",
        "",
        "![accuracy](accuracy.png)",
        "",
        "![gradient error](grad_error.png)",
        "",
        "## Protocol",
        "",
        f"* {p['steps']} steps, global batch {p['batch_size']}, AdamW (weight decay "
        f"{p['weight_decay']}), linear decay to 0, learning rates {_listed(p['lrs'])}, evaluation every "
        f"{p['eval_every']} steps, gradient clipping {p['max_grad_norm']}, loss `{p['loss']}`.",
        f"* Workers: {metrics['workers']['num_workers']} x ({metrics['workers']['strategy']}"
        + (
            f", DeepSpeed `{metrics['workers']['deepspeed_config']}`"
            if metrics["workers"]["strategy"] == "deepspeed"
            else ""
        )
        + ").",
        f"* Splits: TEST = {s['test_split']} ({s['test']} rows); DEV = {s['dev']} seeded rows of "
        f"`{s['train_split']}`; real baselines draw from the remaining {s['pool']} rows "
        f"({s['pool_rows_dropped_as_duplicates_of_held_out_text']} dropped as duplicates of a "
        "DEV/TEST text). Random, herding and k-center match the training set's per-class counts; "
        "herding and k-center run on mean-pooled hidden states of the pretrained model.",
    ]
    if s.get("generation_rows_known"):
        overlap = s["dev_rows_used_by_generation"]
        lines.append(
            f"* The --train set was generated from {s['generation_rows']} rows of "
            f"`{s['train_split']}`: none is in TEST"
            + (
                f"; {overlap} are in DEV, since generation used (nearly) every row (DEV only "
                "chooses lr and checkpoint)."
                if overlap
                else " or DEV."
            )
        )
    else:
        lines.append(
            "* Which real rows the --train set was generated from is unknown (no manifest.json "
            "beside it naming this source and split): make sure TEST was not among them."
        )
    for note in metrics.get("notes", []):
        lines.append(f"* {note}")
    return "\n".join(lines) + "\n"


def metrics_document(
    runs: list[dict[str, Any]],
    *,
    cfg: FinetuneConfig,
    split_info: dict[str, Any],
    seconds: float,
    notes: Sequence[str] = (),
) -> dict[str, Any]:

    return {
        "runs": runs,
        "model": cfg.model.name,
        "train": cfg.train,
        "protocol": dataclasses.asdict(cfg.protocol),
        "splits": split_info,
        "workers": dataclasses.asdict(cfg.workers),
        "config": cfg.to_dict(),
        "versions": package_versions(),
        "seconds": round(seconds, 1),
        "notes": list(notes),
    }


def write_outputs(
    out: OutputDir, metrics: dict[str, Any], histories: Sequence[dict[str, Any]]
) -> list[str]:
    out.write_json(METRICS_FILE, metrics)
    out.write_json(HISTORY_FILE, {"runs": list(histories)})
    out.write_bytes("accuracy.png", png_bytes(plot_accuracy(metrics["runs"])))
    out.write_bytes("grad_error.png", png_bytes(plot_grad_error(metrics["runs"])))
    out.write_text(RESULTS_FILE, results_markdown(metrics))
    return [METRICS_FILE, HISTORY_FILE, RESULTS_FILE, "accuracy.png", "grad_error.png"]


# ---------------------------------------------------------------------------------------------
# The summary printed at the end


@dataclass
class FinetuneSummary:
    output: str
    cluster: str
    files: list[str]
    runs: list[dict[str, Any]]
    seconds: float


def format_finetune_summary(summary: FinetuneSummary) -> str:
    """The lines printed at the end of a job (distill's is ``distill.report.format_summary``)."""
    lines = [
        f"finetune: done ({summary.cluster}, {summary.seconds:.0f} s)",
        f"  output   {summary.output}",
    ]
    for r in summary.runs:
        name = "synthetic (--train)" if r["name"] == SYNTHETIC else r["name"]
        lines.append(
            f"  {name:<22} n={r['n_train']:<6} test accuracy {100 * r['accuracy_mean']:.1f} ± "
            f"{100 * r['accuracy_std']:.1f}  loss {r['loss_mean']:.3f}"
        )
    lines.append(f"  files    {', '.join(summary.files)}")
    return "\n".join(lines)
