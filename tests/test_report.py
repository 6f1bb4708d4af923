"""The printed summary."""

from gradmm_ray.pipeline import RunSummary
from gradmm_ray.report import format_summary


def _summary(per_class_last: dict[str, int]) -> RunSummary:
    funnel = [
        {"step": "candidates", "rows": 4, "per_class": {"a": 2, "b": 2}},
        {"step": "label_check", "rows": sum(per_class_last.values()), "per_class": per_class_last},
    ]
    return RunSummary(
        output="out", mode="new", cluster="local", timings={"total": 1.0}, counts={"funnel": funnel}
    )


def test_summary_warns_about_an_empty_class():
    """A class left with no selected example is named with a way out; none, no warning."""
    assert "warning  no example selected for b" in format_summary(_summary({"a": 2, "b": 0}))
    assert "warning" not in format_summary(_summary({"a": 1, "b": 1}))
    assert "candidates 4 -> label_check 2" in format_summary(_summary({"a": 1, "b": 1}))


def _with_privacy(noise_to_signal: dict[str, float]) -> RunSummary:
    summary = _summary({"a": 1, "b": 1})
    summary.privacy = {
        "epsilon": 1.0,
        "delta": 1e-4,
        "clip_norm": 1.0,
        "noise_multiplier": 3.2,
        "adjacency": "add_remove",
        "noise_to_signal_min": noise_to_signal,
    }
    return summary


def test_summary_warns_when_noise_dominates_the_targets():
    """The privacy line gives the worst class's noise-to-signal bound; above 1 a warning names
    the two ways out; at or below 1, and without noise, none."""
    text = format_summary(_with_privacy({"a": 0.5, "b": 4.1}))
    assert "noise/signal >= 4.1" in text
    assert "warning  each class's target carries noise at least 4.1x" in text
    assert "data.per_class" in text and "privacy.epsilon" in text
    assert "warning" not in format_summary(_with_privacy({"a": 0.5, "b": 1.0}))
    quiet = format_summary(_with_privacy({"a": 0.0, "b": 0.0}))
    assert "warning" not in quiet and "noise/signal" not in quiet
