"""Stage 1's actor (targets.ClippedHeadGradSums), run as Ray runs it but in this process: the
per-class sums it emits equal brute-force autograd clipped per example, and every example's
contribution has joint (weight + bias) norm <= C, on a head with a bias (Phi) and on a head with
a logits tail (Gemma-2's soft-cap). The pure functions are tested in test_headgrad/test_privacy;
this is the path the release actually takes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradmm_ray.bench.references import brute_force_grads, head_only_copy
from gradmm_ray.config import Config, DataConfig, ModelConfig, PrivacyConfig, TargetsConfig
from gradmm_ray.core.text import encode_pair, format_prompt
from gradmm_ray.distributed.targets import ClippedHeadGradSums

TEXTS = [
    ("The plot was dull.", "negative"),
    ("What a charming film with warm and tender moments.", "positive"),
    ("A shrill, exhausting comedy that never stops yelling.", "negative"),
    ("I found the cast very sharp.", "positive"),
    ("Overall a messy comedy.", "negative"),
]
VERBALIZERS = {"positive": " great", "negative": " bad"}
TEMPLATE = "{text} It was"


def _batch(rows: list[tuple[str, str]], first_row: int = 0) -> dict[str, np.ndarray]:
    """Rows as stage 1's stream delivers them: keys, and one fragment holding these rows."""
    labels = np.array([lab for _, lab in rows], dtype=object)
    return {
        "key": np.arange(first_row, first_row + len(rows), dtype=np.uint64),
        "text": np.array([t for t, _ in rows], dtype=object),
        "label": labels,
        "fragment": np.zeros(len(rows), dtype=np.int32),
        "expected": np.array([(labels == lab).sum() for lab in labels], dtype=np.int64),
    }


@pytest.fixture(scope="module", params=["phi", "gemma2"])
def saved_arch(request, tiny_archs, tmp_path_factory):
    """(CausalLM, folder): the architecture saved as a normal model folder, as a user's is."""
    lm = tiny_archs[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return lm, str(folder)


def _actor(
    folder: str, clip_norm: float, micro: int = 2, gradient: str = "full_head"
) -> ClippedHeadGradSums:
    cfg = Config(
        data=DataConfig(prompt_template=TEMPLATE, verbalizers=VERBALIZERS),
        model=ModelConfig(name=folder, dtype="float32", device="cpu"),
        privacy=PrivacyConfig(clip_norm=clip_norm),
        targets=TargetsConfig(micro_batch_size=micro, gradient=gradient),
    )
    return ClippedHeadGradSums(cfg)


def _brute_force(lm) -> list[torch.Tensor]:
    """Each example's head gradient, weight and bias flattened jointly, by full autograd."""
    model = head_only_copy(lm)
    out = []
    for text, label in TEXTS:
        pair = encode_pair(lm.tokenizer, format_prompt(TEMPLATE, text), VERBALIZERS[label])
        g_w, g_b = brute_force_grads(model, pair)
        out.append(torch.cat([g_w.flatten(), g_b.flatten() if g_b is not None else g_w[:0, 0]]))
    return out


def _flat(out: dict[str, np.ndarray], i: int) -> torch.Tensor:
    parts = [torch.from_numpy(np.asarray(out["weight_sum"][i])).flatten()]
    if "bias_sum" in out:
        parts.append(torch.from_numpy(np.asarray(out["bias_sum"][i])).flatten())
    return torch.cat(parts).double()


def test_actor_clips_each_example_jointly_to_c(saved_arch):
    """One row per call: the emitted sum IS that row's clipped gradient: norm C (all are
    clipped at this C) and equal to the brute-force gradient scaled to C."""
    lm, folder = saved_arch
    grads = _brute_force(lm)
    norms = torch.stack([g.double().norm() for g in grads])
    C = 0.5 * float(norms.min())  # every example is clipped
    actor = _actor(folder, C)
    assert (actor.space.b is not None) == lm.has_head_bias
    for i, (row, g) in enumerate(zip(TEXTS, grads, strict=True)):
        out = actor(_batch([row], first_row=i))
        assert list(out["label"]) == [row[1]] and list(out["rows_seen"]) == [1]
        emitted = _flat(out, 0)
        assert emitted.norm().item() == pytest.approx(C, rel=1e-5)
        expected = g.double() * (C / g.double().norm())
        torch.testing.assert_close(emitted, expected, rtol=1e-4, atol=1e-6 * C)


def test_actor_sums_per_class_over_micro_batches(saved_arch):
    """All rows in one call, micro-batches of 2 that mix labels: each class's sum equals the
    sum of its rows' brute-force clipped gradients; rows_seen counts every row."""
    lm, folder = saved_arch
    grads = _brute_force(lm)
    C = float(torch.stack([g.double().norm() for g in grads]).median())  # some clipped, some not
    out = _actor(folder, C, micro=2)(_batch(TEXTS))
    for i, label in enumerate(out["label"]):
        members = [j for j, (_, lab) in enumerate(TEXTS) if lab == label]
        expected = sum(grads[j].double() * min(1.0, C / float(grads[j].norm())) for j in members)
        torch.testing.assert_close(_flat(out, i), expected, rtol=1e-4, atol=1e-6 * C)
        assert out["rows_seen"][i] == len(members)


def _brute_force_label_rows(lm) -> list[torch.Tensor]:
    """Each example's label-rows gradient (rows S = sorted labels' verbalizer tokens), weight
    and bias flattened jointly: autograd of the cross-entropy over the model's own logits at the
    predicting position restricted to S."""
    model = head_only_copy(lm)
    head = model.get_output_embeddings()
    params = [head.weight] + ([head.bias] if head.bias is not None else [])
    labels = sorted(VERBALIZERS)
    S = [lm.tokenizer(VERBALIZERS[lab], add_special_tokens=False)["input_ids"][0] for lab in labels]
    out = []
    for text, label in TEXTS:
        ids, n = encode_pair(lm.tokenizer, format_prompt(TEMPLATE, text), VERBALIZERS[label])
        logits = model(input_ids=torch.tensor([ids])).logits[0, n - 1, S].float()  # (K,)
        loss = torch.nn.functional.cross_entropy(
            logits.unsqueeze(0), torch.tensor([labels.index(label)])
        )
        out.append(torch.cat([g[S].flatten() for g in torch.autograd.grad(loss, params)]))
    return out


def test_actor_label_rows_clips_each_example_jointly_to_c(saved_arch):
    """targets.gradient label_rows, one row per call: the emitted sum has shape (|S|, d)
    (+ (|S|,)), norm C, and equals the brute-force label-rows gradient scaled to C; all rows in
    one call: each class's sum is the sum of its rows' clipped gradients, every row's
    contribution of norm <= C."""
    lm, folder = saved_arch
    grads = _brute_force_label_rows(lm)
    norms = torch.stack([g.double().norm() for g in grads])
    C = 0.5 * float(norms.min())
    actor = _actor(folder, C, gradient="label_rows")
    K, d = len(VERBALIZERS), lm.head.weight.shape[1]
    for i, (row, g) in enumerate(zip(TEXTS, grads, strict=True)):
        out = actor(_batch([row], first_row=i))
        assert np.asarray(out["weight_sum"]).shape == (1, K, d)
        assert ("bias_sum" in out) == lm.has_head_bias
        emitted = _flat(out, 0)
        assert emitted.norm().item() == pytest.approx(C, rel=1e-5)
        torch.testing.assert_close(
            emitted, g.double() * (C / g.double().norm()), rtol=1e-4, atol=1e-6 * C
        )
    C = float(norms.median())
    out = _actor(folder, C, gradient="label_rows")(_batch(TEXTS))
    for i, label in enumerate(out["label"]):
        members = [j for j, (_, lab) in enumerate(TEXTS) if lab == label]
        expected = sum(grads[j].double() * min(1.0, C / float(grads[j].norm())) for j in members)
        torch.testing.assert_close(_flat(out, i), expected, rtol=1e-4, atol=1e-6 * C)


def test_select_scorer_runs_on_these_heads(saved_arch, ray_session):
    """Stage 3's actor on the same heads: it took B by autograd through Gemma-2's tail under
    inference_mode and crashed; its matching loss equals 1 - cos against a target that IS one
    candidate's own gradient (so that candidate scores ~0)."""
    from gradmm_ray.distributed.select import CandidateScorer

    lm, folder = saved_arch
    actor = _actor(folder, clip_norm=1e6)  # no clipping: the sum is the gradient itself
    row = TEXTS[1]
    own = actor(_batch([row]))
    targets = {row[1]: {"weight": torch.from_numpy(np.asarray(own["weight_sum"][0]))}}
    if "bias_sum" in own:
        targets[row[1]]["bias"] = torch.from_numpy(np.asarray(own["bias_sum"][0]))
    other = "negative" if row[1] == "positive" else "positive"
    targets[other] = {k: torch.randn_like(v) for k, v in targets[row[1]].items()}
    cfg = Config(
        data=DataConfig(prompt_template=TEMPLATE, verbalizers=VERBALIZERS),
        model=ModelConfig(name=folder, dtype="float32", device="cpu"),
        targets=TargetsConfig(gradient="full_head"),  # the space of _actor's sums
    )
    scorer = CandidateScorer(cfg, [ray_session.put(targets)])
    ids = lm.tokenizer(row[0], add_special_tokens=False)["input_ids"]
    scored = scorer(
        {
            "text": np.array([row[0]], dtype=object),
            "label": np.array([row[1]], dtype=object),
            "token_ids": np.array([np.asarray(ids)], dtype=object),
            "match_loss": np.array([0.5]),
        }
    )
    assert scored["match_loss"][0] == pytest.approx(0.0, abs=1e-4)
    assert 0 <= scored["label_prob"][0] <= 1 and np.isfinite(scored["log_ppl"][0])
