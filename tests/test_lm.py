"""Loading models: what the stage actors load is the same model, without progress bars."""

import torch

from gradmm_ray.core.lm import load_causal_lm


def test_progress_false_loads_the_same_model_without_bars(capfd):
    """progress=False (stage actors) prints no loading bar and restores the bars afterwards;
    progress=True prints transformers' weight-loading bar; both load identical weights."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # whatever the environment says (HF_HUB_DISABLE_PROGRESS_BARS)
    try:
        quiet = load_causal_lm("tiny", dtype="float32", device="cpu", progress=False)
        assert "Loading weights" not in capfd.readouterr().err
        assert hf_logging.is_progress_bar_enabled()
        loud = load_causal_lm("tiny", dtype="float32", device="cpu")
        assert "Loading weights" in capfd.readouterr().err
    finally:
        if not was_on:
            hf_logging.disable_progress_bar()
    for a, b in zip(
        quiet.model.state_dict().values(), loud.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
