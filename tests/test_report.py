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
