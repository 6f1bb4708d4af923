"""The printed summary."""

import math

from gradmm_ray.config import PrivacyConfig
from gradmm_ray.core.privacy import privacy_record
from gradmm_ray.distill.pipeline import RunSummary
from gradmm_ray.distill.report import format_summary, privacy_paragraph


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


def _with_privacy(noise_to_signal: dict[str, float], **privacy) -> RunSummary:
    summary = _summary({"a": 1, "b": 1})
    record = privacy_record(
        PrivacyConfig(**({"clip_norm": 1.0} | privacy)),
        deterministic_caps=False,
        target_space="full_head",
        target_dims=100,
        noise_to_signal=noise_to_signal,
    )
    summary.privacy = record.to_dict()
    return summary


def test_summary_warns_when_noise_dominates_the_targets():
    """The privacy line gives the worst class's noise-to-signal estimate; above 1 a warning names
    the two ways out; at or below 1, and without noise, none. No count is shown."""
    text = format_summary(_with_privacy({"a": 0.5, "b": 4.1}))
    assert "noise/signal ~4.1" in text and "no count of real rows is published" in text
    assert "warning  each class's target carries noise about 4.1x" in text
    assert "privacy.sample_rate" in text and "privacy.epsilon" in text
    assert "warning" not in format_summary(_with_privacy({"a": 0.5, "b": 1.0}))
    quiet = format_summary(_with_privacy({"a": 0.0, "b": 0.0}))
    assert "warning" not in quiet and "noise/signal" not in quiet


def test_summary_and_report_say_not_private():
    """Reproducible noise or epsilon inf: the summary's WARNING line and the report's privacy
    paragraph say NOT private; a private release says neither."""
    for settings in ({"insecure_reproducible_noise": True}, {"epsilon": math.inf}):
        summary = _with_privacy({"a": 0.0, "b": 0.0}, **settings)
        assert "WARNING  this output is NOT private" in format_summary(summary)
        assert privacy_paragraph(summary.privacy).startswith("**NOT PRIVATE.**")
    private = _with_privacy({"a": 0.5, "b": 0.5})
    assert "NOT private" not in format_summary(private)
    paragraph = privacy_paragraph(private.privacy)
    assert (
        "NOT PRIVATE" not in paragraph and "one row" in paragraph and "never recorded" in paragraph
    )
