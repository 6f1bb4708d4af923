"""Shared fixtures: offline hub, one tiny model, tiny architectures, one Ray instance."""

from gradmm_ray.env import set_defaults

# Before transformers/datasets are imported anywhere: a hub miss would cost ~25 s each.
set_defaults(offline=True)

import pytest  # noqa: E402
import torch  # noqa: E402

from gradmm_ray.core.lm import CausalLM, load_causal_lm  # noqa: E402


@pytest.fixture(scope="session")
def tiny_lm() -> CausalLM:
    """The project's tiny offline model (built once into the user cache), fp32 on CPU."""
    return load_causal_lm("tiny", dtype="float32", device="cpu")


def _wrap(model, tokenizer, name: str) -> CausalLM:
    model.eval().requires_grad_(False)
    return CausalLM(model, tokenizer, name, None, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def tiny_archs(tiny_lm) -> dict[str, CausalLM]:
    """Randomly initialised architectures sharing the tiny tokenizer: Llama-style (no head bias),
    GPT-2 (tied input/output embeddings), Phi (head with a bias) and Gemma2 (tied, with a logit
    soft-cap small enough that tanh is far from linear on these logits: the autograd-tail path)."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PhiConfig,
        PhiForCausalLM,
    )

    tok = tiny_lm.tokenizer
    V = len(tok)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    )
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128, tie_word_embeddings=True
        )
    )
    phi = PhiForCausalLM(
        PhiConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            tie_word_embeddings=False,
        )
    )
    torch.manual_seed(1)
    gemma2 = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            final_logit_softcapping=0.05,
            tie_word_embeddings=True,
            pad_token_id=tok.pad_token_id,
        )
    )
    models = {"llama": llama, "gpt2": gpt2, "phi": phi, "gemma2": gemma2}
    archs = {name: _wrap(m, tok, name) for name, m in models.items()}
    assert (
        archs["gpt2"].model.get_output_embeddings().weight
        is archs["gpt2"].model.get_input_embeddings().weight
    )
    assert archs["phi"].has_head_bias and not archs["llama"].has_head_bias
    return archs


# Files whose every test runs Ray (a CLI run of the pipeline, a Cluster, Ray Train) or is slow;
# any other test that takes the ray_session fixture is marked `ray` too.
RAY_FILES = {
    "test_pipeline.py",
    "test_faults.py",
    "test_cloud_storage.py",
    "test_stage_failures.py",
    "test_finetune.py",
}
SLOW_FILES = {"test_benchmark.py", "test_smollm2.py", "test_cluster_configs.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        name = item.path.name
        if name in RAY_FILES or "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
        if name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (ray.init costs ~4 s)."""
    import ray

    if not ray.is_initialized():
        # Logical CPUs above the 2 physical ones: two actor pools and their feeding tasks fit.
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
