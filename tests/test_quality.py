"""The quality benchmark's protocol (a) and set construction (gradmm_ray/bench/last_layer.py,
gradmm_ray/bench/quality.py) against brute force: the fine-tuning job's own classification loss
through the whole model, a literal per-example loop, and hand-built cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gradmm_ray.bench import last_layer
from gradmm_ray.bench.quality import GenerationRun, candidate_gradients, compare, gradmm_groups
from gradmm_ray.core.selection import match_set
from gradmm_ray.core.target_space import target_space
from gradmm_ray.core.text import encode_pair, format_prompt
from gradmm_ray.core.training import Example, classification_loss, label_targets, option_scores

TEMPLATE = "{text} It was"
VERBALIZERS = {"positive": " great", "negative": " bad"}  # one token each under tiny
ROWS = [
    ("The plot was dull.", "negative"),
    ("What a charming film with warm and tender moments.", "positive"),
    ("A shrill, exhausting comedy that never stops yelling.", "negative"),
    ("I found the cast very sharp.", "positive"),
    ("Overall a messy comedy.", "positive"),
]


@pytest.fixture(scope="module", params=["llama", "gpt2", "phi", "gemma2"])
def lm(request, tiny_archs):
    return tiny_archs[request.param]


def features(lm, batch_size=2):
    return last_layer.label_position_states(
        lm,
        [t for t, _ in ROWS],
        [lab for _, lab in ROWS],
        template=TEMPLATE,
        verbalizers=VERBALIZERS,
        max_tokens=64,
        batch_size=batch_size,
    )


def test_two_way_loss_on_features_is_the_finetune_jobs_classification_loss(lm):
    """The protocol's claim: on single-token verbalizers the fine-tuning job's loss (whole model,
    log-likelihood over the vocabulary, per option) equals the two-way cross-entropy on W_S h."""
    feats = features(lm)
    head = last_layer.LabelHead.of(lm, VERBALIZERS)
    examples = [
        Example(format_prompt(TEMPLATE, t), VERBALIZERS[lab], lab, f"test:{i}")
        for i, (t, lab) in enumerate(ROWS)
    ]
    with torch.no_grad():
        scores = option_scores(lm.model, lm.tokenizer, examples, VERBALIZERS, lm.device)
        expected = classification_loss(scores, label_targets(examples, VERBALIZERS, lm.device))
        got = torch.nn.functional.cross_entropy(
            last_layer.option_logits(head.W, head.b, head.tail, feats.h), feats.y
        )
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)
    # and the decision: accuracy from the scores == accuracy from the features
    assert last_layer.accuracy(head.W, head.b, head.tail, feats) == pytest.approx(
        float((scores.argmax(-1) == feats.y).float().mean())
    )


def test_features_do_not_depend_on_batching(tiny_lm):
    one = features(tiny_lm, batch_size=1)
    many = features(tiny_lm, batch_size=4)
    torch.testing.assert_close(one.h, many.h, rtol=1e-5, atol=1e-5)
    assert one.y.tolist() == [0, 1, 0, 1, 1]  # sorted labels: negative, positive


def test_mean_gradient_is_the_mean_of_per_example_gradients():
    g = torch.Generator().manual_seed(0)
    data = last_layer.Features(torch.randn(7, 5, generator=g), torch.tensor([0, 1, 1, 0, 1, 0, 0]))
    W, b = torch.randn(2, 5, generator=g), torch.randn(2, generator=g)
    per = []
    for i in range(7):
        Wi = W.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(
            (data.h[i] @ Wi.T + b).unsqueeze(0), data.y[i : i + 1]
        )
        per.append(torch.autograd.grad(loss, Wi)[0])
    torch.testing.assert_close(last_layer.mean_gradient(W, b, None, data), torch.stack(per).mean(0))
    err = last_layer.gradient_error(torch.stack(per).mean(0) * 2, torch.stack(per).mean(0))
    assert err["relative"] == pytest.approx(1.0) and err["cosine_distance"] == pytest.approx(
        0.0, abs=1e-6
    )


def test_training_fits_a_separable_set_and_lr_zero_changes_nothing():
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0, 1] * 20)
    h = torch.randn(40, 6, generator=g) + 3.0 * torch.stack(
        [y * 2.0 - 1.0] + [torch.zeros(40)] * 5, 1
    )
    data = last_layer.Features(h, y)
    head = last_layer.LabelHead(torch.zeros(2, 6), None, None)
    run = last_layer.train(
        head, data, lr=0.05, steps=50, eval_every=10, dev=data, test=data, reference=data
    )
    assert run.steps == [0, 10, 20, 30, 40, 50]
    assert run.dev[0] == 0.5 and run.test[-1] == 1.0  # all-zero head: ties go to class 0
    assert run.grad_error[0]["relative"] == pytest.approx(0.0, abs=1e-6)  # the set IS the reference
    frozen = last_layer.train(head, data, lr=0.0, steps=20, eval_every=10, dev=data, test=data)
    assert frozen.test == [0.5, 0.5, 0.5] and frozen.grad_error == []


def test_best_on_dev_averages_seeds_and_breaks_ties_to_the_smaller_lr_and_earlier_step():
    def run(dev):
        return last_layer.Trajectory(lr=0.0, steps=list(range(len(dev))), dev=dev, test=dev)

    runs = [
        [run([0.5, 0.7, 0.7]), run([0.5, 0.5, 0.7])],  # lr 0: best mean 0.7 at step 2
        [run([0.5, 0.9, 0.5]), run([0.5, 0.5, 0.5])],  # lr 1: best mean 0.7 at step 1 (a tie)
        [run([0.6, 0.6, 0.6]), run([0.6, 0.6, 0.6])],
    ]
    assert last_layer.best_on_dev(runs) == (0, 2)
    runs[2][0].dev[0] = 0.9  # lr 2 step 0: mean 0.75
    assert last_layer.best_on_dev(runs) == (2, 0)


def candidate_rows(n: int = 30) -> list[dict]:
    return [
        {"id": i, "label": "positive" if i % 2 else "negative", "match_loss": (i * 37 % 11) / 10}
        for i in range(n)
    ]


def test_gradmm_groups_are_disjoint_and_keep_the_k_lowest_losses_per_class():
    rows = candidate_rows()
    groups = gradmm_groups(rows, 2, 3, None, np.zeros(4))
    ids = [r["id"] for g in groups for r in g]
    assert len(ids) == len(set(ids)) == 12
    for gi, group in enumerate(groups):
        for label in ("negative", "positive"):
            mine = [r for r in rows if r["label"] == label and r["id"] % 3 == gi]
            want = sorted(mine, key=lambda r: (r["match_loss"], r["id"]))[:2]
            assert [r for r in group if r["label"] == label] == want


def test_gradmm_groups_with_gradients_are_the_pipelines_set_matching_per_group():
    """Each group is what core.selection.match_set (the pipeline's select.rule set_match)
    chooses from that group's rows, not the lowest losses."""
    rows = candidate_rows()
    rng = np.random.default_rng(0)
    grads, target = rng.normal(size=(len(rows), 4)), rng.normal(size=4)
    groups = gradmm_groups(rows, 2, 3, grads, target)
    for gi, group in enumerate(groups):
        mine = [
            {"synthetic_id": r["id"], "label": r["label"], "gradient": grads[i]}
            for i, r in enumerate(rows)
            if r["id"] % 3 == gi
        ]
        want = [r["synthetic_id"] for r in match_set(mine, 2, target)[0]]
        assert [r["id"] for r in group] == want
    lowest = gradmm_groups(rows, 2, 3, None, target)
    assert [[r["id"] for r in g] for g in groups] != [[r["id"] for r in g] for g in lowest]


def test_candidate_gradients_are_the_scorers_from_the_same_states(lm):
    """The benchmark's gradients (from cached features) equal stage 3's (the label_rows space
    on the training pairs' completion states), row by row."""
    feats = features(lm)
    got = candidate_gradients(lm, VERBALIZERS, feats)
    space = target_space("label_rows", lm, VERBALIZERS)
    pairs = [
        encode_pair(lm.tokenizer, format_prompt(TEMPLATE, t), VERBALIZERS[lab]) for t, lab in ROWS
    ]
    want = space.example_gradients(*lm.completion_states(pairs))
    torch.testing.assert_close(torch.from_numpy(got), want.float(), rtol=1e-4, atol=1e-5)


def test_compare_and_run_specs():
    a = {"test_accuracy": 0.80, "test_accuracy_se": 0.03}
    b = {"test_accuracy": 0.75, "test_accuracy_se": 0.04}
    assert compare(a, b) == {"diff": 0.05, "se": 0.05, "in_se": 1.0}
    assert compare(a, {"test_accuracy": 0.7, "test_accuracy_se": None}) is None
    assert GenerationRun.parse("label_rows:50:inf").name == "label_rows/m50/epsinf"
    with pytest.raises(SystemExit, match="SPACE:M:EPSILON"):
        GenerationRun.parse("label_rows:fifty:inf")


def test_the_command_line_is_recorded_as_given_flags_and_all():
    """results.md names the command: with flags, the grid's name alone says little."""
    from gradmm_ray.bench.quality import parse_args

    argv = ["--json", "q.json", "--runs", "full_head:all:1", "--candidates", "128"]
    args = parse_args(argv)
    assert args.command == "python jobs/quality.py " + " ".join(argv)
    assert args.candidates == 128 and args.grid == "quick"


def test_solver_settings_reach_every_run_and_name_its_folder(monkeypatch, tmp_path):
    """--set admm.*: checked before any work, passed to distill.py, and part of the run folder's
    name (a run with other solver settings must not resume this one)."""
    from gradmm_ray.bench import quality
    from gradmm_ray.distill import cli

    args = quality.parse_args(["--json", "q.json", "--set", "admm.topk=5"])
    assert args.admm_settings == ["admm.topk=5"]
    for bad, says in (
        ("select.rule=lowest_loss", "only admm.* settings"),
        ("admm.topk=many", "admm.topk"),
        ("admm.top_k=5", "admm.top_k"),
    ):
        with pytest.raises(SystemExit, match=says):
            quality.parse_args(["--json", "q.json", "--set", bad])

    seen = []
    monkeypatch.setattr(cli, "main", lambda argv: seen.append(argv) or 1)
    run = GenerationRun.parse("label_rows:50:inf")
    with pytest.raises(SystemExit, match="distill.py failed"):
        quality.generate(run, tmp_path / "m50.jsonl", tmp_path, 8, args.admm_settings)
    (argv,) = seen
    folder = Path(argv[argv.index("--output") + 1])
    assert folder == tmp_path / "runs" / "label_rows_m50_epsinf_admm.topk=5"
    assert argv[-2:] == ["--set", "admm.topk=5"]


def test_protocol_b_zero_shot_and_lr_zero_agree_and_training_moves_the_model(tiny_lm):
    """Protocol (b) through the fine-tuning job's loop: with lr 0 a trained run scores exactly
    the pretrained model (zero-shot); with a large lr on the negative rows only, the pretrained
    model's "positive" everywhere turns into "negative" everywhere (it trains the given rows)."""
    from gradmm_ray.bench.quality import protocol_b
    from gradmm_ray.config import build_config, load_yaml
    from gradmm_ray.presets import resolve_config_path

    cfg = build_config(load_yaml(resolve_config_path("tiny")))
    rows = [{"text": t, "label": lab} for t, lab in ROWS]
    negatives = [r for r in rows if r["label"] == "negative"]
    frozen = protocol_b(
        tiny_lm, cfg, {"zero-shot": [[]], "same": [rows]}, rows, rows, steps=2, lrs=(0.0,), k=1
    )
    assert frozen["same"]["test_accuracy"] == frozen["zero-shot"]["test_accuracy"]
    assert frozen["zero-shot"]["test_accuracy"] == pytest.approx(3 / 5)  # says "positive"
    pushed = protocol_b(tiny_lm, cfg, {"neg": [negatives]}, rows, rows, steps=6, lrs=(0.05,), k=1)
    assert pushed["neg"]["step"] in (3, 6)
    assert pushed["neg"]["per_seed_test_accuracy"] == [pytest.approx(2 / 5)]  # all "negative"


def test_verdict_reads_runs_whose_sets_do_not_spread():
    """Two methods with identical per-seed accuracies (SE 0) are reported, not a crash."""
    from gradmm_ray.bench.quality import verdict

    same = {"test_accuracy": 0.8, "test_accuracy_se": 0.0}
    q = {
        "settings": {"runs": ["label_rows/m5/epsinf"]},
        "protocol_a": {"k4/GRADMM label_rows/m5/epsinf": same, "k4/random real": same},
    }
    assert (
        verdict(q, [4]) == "GRADMM label_rows/m5/epsinf vs random real: k=4: +0.0 pts (no spread)"
    )


def test_verdict_compares_the_two_target_spaces_from_the_same_rows_and_epsilon():
    """Issue 17's comparison: label_rows against full_head of the same m and epsilon only."""
    from gradmm_ray.bench.quality import verdict

    def acc(a, se):
        return {"test_accuracy": a, "test_accuracy_se": se}

    runs = ["label_rows/m500/eps1", "full_head/m500/eps1", "full_head/m500/epsinf"]
    q = {
        "settings": {"runs": runs},
        "protocol_a": {
            "k8/random real": acc(0.83, 0.004),
            "k8/GRADMM label_rows/m500/eps1": acc(0.844, 0.004),
            "k8/GRADMM full_head/m500/eps1": acc(0.803, 0.003),
            "k8/GRADMM full_head/m500/epsinf": acc(0.70, 0.001),
        },
    }
    twin = verdict(q, [8]).split("; ")[-1]
    assert twin == "GRADMM label_rows/m500/eps1 vs full_head/m500/eps1: k=8: +4.1 pts (+8.2 SE)"


def test_releases_table_reads_each_runs_privacy_record():
    from gradmm_ray.bench.quality import RELEASE_KEYS, releases_table

    record = {
        "epsilon": 1.0,
        "noise_multiplier": 3.1857,
        "clip_norm": 22.06,
        "target_space": "label_rows",
        "target_dims": 1152,
        "noise_to_signal": {"positive": 0.376, "negative": 0.253},
        "noise_to_signal_combined": 1.075,
        "sensitivity": 22.06,  # not repeated
    }
    lines = releases_table({"label_rows/m500/eps1": {k: record[k] for k in RELEASE_KEYS}})
    assert lines[-2] == (
        "| label_rows/m500/eps1 | label_rows, 1,152 | 1.0 | 3.19 | 22.06 | "
        "negative 0.25, positive 0.38 | 1.07 |"
    )
    assert releases_table({}) == []
