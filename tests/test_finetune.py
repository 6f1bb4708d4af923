"""Fine-tuning core and job: the loss by hand, splits that never overlap, the gradient metric
against autograd, DEV-only selection, the CLI's errors, and 2-step runs through Ray Train with
Accelerate and with DeepSpeed ZeRO-2 on CPU (metrics.json schema)."""

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gradmm_ray.config import DataConfig
from gradmm_ray.core.gradient_error import capped, gradient_errors, head_gradient_sums
from gradmm_ray.core.text import encode_pair
from gradmm_ray.core.training import (
    EvalSets,
    Example,
    PlainBackend,
    RunSpec,
    batch_schedule,
    classification_loss,
    evaluate,
    option_scores,
    run_one,
    sft_loss,
)
from gradmm_ray.distributed.train import finalise_deepspeed_config
from gradmm_ray.errors import ConfigError
from gradmm_ray.finetune import cli
from gradmm_ray.finetune.config import (
    BASELINES,
    FinetuneConfig,
    FinetuneError,
    ProtocolConfig,
    build_finetune_config,
)
from gradmm_ray.finetune.examples import training_examples
from gradmm_ray.finetune.job import manifest_defaults, plan_runs, prepare_job, read_manifest
from gradmm_ray.finetune.report import choose_on_dev, summarise
from gradmm_ray.finetune.splits import class_budget, split_rows
from gradmm_ray.io.real_data import load_real_examples
from gradmm_ray.presets import deepspeed_config_path

ROOT = Path(__file__).parent.parent
JOB = ROOT / "jobs" / "finetune.py"
VERBALIZERS = {"positive": " great", "negative": " bad"}


# ---------------------------------------------------------------------------------------------
# The loss, by hand


class WordTokenizer:
    """Whitespace tokenizer over a fixed vocabulary; BOS (id 1) with special tokens."""

    pad_token_id = 0
    vocab = {"<pad>": 0, "<s>": 1, "x": 2, "It": 3, "was": 4, "great": 5, "bad": 6, "so": 7}

    def __call__(self, text, add_special_tokens=True):
        ids = [self.vocab[w] for w in text.split()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


class BigramModel(torch.nn.Module):
    """Next-token logits depend only on the current token: logits = table[input_ids]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return SimpleNamespace(logits=self.table[input_ids])


def test_classification_loss_hand_computed():
    """Two options with scores s = (-2, -0.5), label 0: -log(e^-2 / (e^-2 + e^-0.5)) = log(1 + e^1.5)."""
    loss = classification_loss(torch.tensor([[-2.0, -0.5]]), torch.tensor([0]))
    assert float(loss) == pytest.approx(math.log(1 + math.exp(1.5)), abs=1e-6)
    # A batch is the mean of its rows.
    both = classification_loss(torch.tensor([[-2.0, -0.5], [0.0, 0.0]]), torch.tensor([0, 1]))
    assert float(both) == pytest.approx((math.log(1 + math.exp(1.5)) + math.log(2)) / 2, abs=1e-6)


def test_option_scores_are_length_normalised_completion_loglikelihoods_by_hand():
    """Options ' great' (1 token) and ' so bad' (2 tokens) after the prompt 'x It was', under a
    bigram model whose probabilities are written out here by hand."""
    V = len(WordTokenizer.vocab)
    table = torch.zeros(V, V)
    table[4, 5] = 2.0  # after "was": "great"
    table[4, 7] = 1.0  # after "was": "so"
    table[7, 6] = 3.0  # after "so": "bad"
    # log p(great | was) = 2 - log(e^2 + e^1 + 6 e^0); log p(so | was) = 1 - (same);
    # log p(bad | so) = 3 - log(e^3 + 7).
    z_was = math.log(math.exp(2) + math.exp(1) + 6)
    s_great = 2 - z_was
    s_so_bad = ((1 - z_was) + (3 - math.log(math.exp(3) + 7))) / 2  # mean over its 2 tokens
    verbalizers = {"positive": " great", "negative": " so bad"}  # sorted: negative, positive
    examples = [Example("x It was", " great", "positive", "t:0")]
    scores = option_scores(
        BigramModel(table), WordTokenizer(), examples, verbalizers, torch.device("cpu")
    )
    assert scores.tolist()[0] == pytest.approx([s_so_bad, s_great], abs=1e-6)
    expected = -math.log(math.exp(s_great) / (math.exp(s_great) + math.exp(s_so_bad)))
    loss = classification_loss(scores, torch.tensor([1]))
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    sft = sft_loss(BigramModel(table), WordTokenizer(), examples, torch.device("cpu"))
    assert float(sft) == pytest.approx(-s_great, abs=1e-6)
    result = evaluate(
        BigramModel(table), WordTokenizer(), examples, verbalizers,
        batch_size=4, device=torch.device("cpu"),
    )  # fmt: skip
    assert result.accuracy == (1.0 if s_great > s_so_bad else 0.0)
    assert result.loss == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Splits


@pytest.mark.parametrize("seed", range(4))
def test_split_rows_are_disjoint_and_keep_generation_rows_out_of_test(seed):
    rng = np.random.default_rng(seed)
    labels = list(rng.choice(["a", "b", "c"], size=120))
    generation = rng.choice(120, size=30, replace=False).tolist()
    rows = split_rows(labels, dev_size=20, test_size=25, seed=seed, generation_rows=generation)
    pool, dev, test = set(rows.pool), set(rows.dev), set(rows.test)
    assert not (pool & dev) and not (pool & test) and not (dev & test)
    assert pool | dev | test == set(range(120))
    assert len(dev) == 20 and len(test) == 25
    assert not (test & set(generation)) and not (dev & set(generation))
    assert rows.dev_generation_overlap == 0
    # Stratified: every class is in dev.
    assert {labels[i] for i in dev} == {"a", "b", "c"}
    # Same seed, same split.
    again = split_rows(labels, dev_size=20, test_size=25, seed=seed, generation_rows=generation)
    assert np.array_equal(again.dev, rows.dev) and np.array_equal(again.test, rows.test)


def test_dev_takes_generation_rows_only_when_nothing_else_is_left():
    labels = ["a", "b"] * 20
    rows = split_rows(labels, dev_size=10, test_size=None, seed=0, generation_rows=range(34))
    assert len(rows.dev) == 10 and rows.dev_generation_overlap == 4
    assert set(range(34, 40)) <= set(rows.dev)
    assert not set(rows.pool) & set(rows.dev) and len(rows.test) == 0
    with pytest.raises(FinetuneError, match="test_size"):
        split_rows(labels, dev_size=4, test_size=10, seed=0, generation_rows=range(31))


def _synthetic_parquet(path: Path, rows: list[tuple[str, str]]) -> Path:
    pq.write_table(
        pa.table(
            {
                "id": list(range(len(rows))),
                "text": [t for t, _ in rows],
                "label": [lab for _, lab in rows],
                "prompt": [f"{t} It was" for t, _ in rows],
                "completion": [VERBALIZERS[lab] for _, lab in rows],
            }
        ),
        path,
    )
    return path


SYNTH = [
    ("What a wonderful and moving film.", "positive"),
    ("The acting was truly brilliant.", "positive"),
    ("The plot was dull and lazy.", "negative"),
    ("A boring, clumsy mess of a movie.", "negative"),
]


@pytest.fixture
def synthetic_dir(tmp_path) -> Path:
    """A --train set beside a manifest.json saying it was generated from 5 rows per class of the
    bundled sample's train split (as distill.py writes it)."""
    d = tmp_path / "gen"
    d.mkdir()
    _synthetic_parquet(d / "synthetic.parquet", SYNTH)
    data = {"source": "sample", "split": "train", "per_class": 5, "verbalizers": VERBALIZERS}
    (d / "manifest.json").write_text(
        json.dumps({"config": {"data": data, "model": {"name": "tiny"}, "seed": 0}})
    )
    return d


def test_dev_and_test_never_overlap_what_a_baseline_trains_on(synthetic_dir, tmp_path):
    """Every set of every baseline (and the generation rows) is disjoint from DEV and TEST, by
    row and by text; DEV and TEST are disjoint from each other."""
    train = str(synthetic_dir / "synthetic.parquet")
    cfg = build_finetune_config(
        manifest_defaults(read_manifest(train)),  # as the CLI layers it: the set's words, model
        {
            "train": train,
            "output": str(tmp_path / "out"),
            "baselines": [b for b in BASELINES],
            "protocol": {"seeds": [0, 1]},
            "splits": {"dev_size": 40},
        },
    )
    prep = prepare_job(cfg, overwrite=False)
    generation = load_real_examples(DataConfig(per_class=5, verbalizers=VERBALIZERS), 0)
    gen_origins = {f"train:{r}" for r in generation.table.column("row").to_pylist()}
    dev_origins = {ex.origin for ex in prep.dev}
    test_origins = {ex.origin for ex in prep.test}
    held_out_text = {ex.prompt for ex in prep.dev} | {ex.prompt for ex in prep.test}
    assert len(prep.dev) == 40 and len(prep.test) == 100 and len(prep.pool) == 360
    assert all(o.startswith("test:") for o in test_origins)
    assert not dev_origins & test_origins and not gen_origins & dev_origins
    assert {ex.origin for ex in prep.generation} == gen_origins
    embeddings = torch.randn(len(prep.pool), 8, generator=torch.Generator().manual_seed(0))
    sets, runs = plan_runs(prep, embeddings)
    assert {r.name for r in runs} == {"synthetic", *BASELINES}
    for key, rows in sets.items():
        if key == "synthetic":
            continue
        origins = {ex.origin for ex in rows}
        assert all(o.startswith("train:") for o in origins), key
        assert not origins & dev_origins and not origins & test_origins, key
        assert not {ex.prompt for ex in rows} & held_out_text, key
        if key not in ("full", "same-real"):  # same size and class counts as the synthetic set
            assert class_budget(rows) == class_budget(prep.train_set), key
    assert sets["random@0"] != sets["random@1"]


def test_training_file_rules(tmp_path):
    data = DataConfig(prompt_template="{text} It was", verbalizers=VERBALIZERS)
    good = pa.table({"prompt": ["a It was"], "completion": [" great"]})
    (ex,) = training_examples(good, data, loss="classification", shown="f")
    assert ex.label == "positive"  # inferred from the label word
    wrong = pa.table({"prompt": ["a It was"], "completion": [" good"], "label": ["positive"]})
    with pytest.raises(FinetuneError, match="not data.verbalizers"):
        training_examples(wrong, data, loss="classification", shown="f")
    assert training_examples(wrong, data, loss="sft", shown="f")[0].completion == " good"
    real = pa.table({"text": ["fine film"], "label": ["negative"]})
    (ex,) = training_examples(real, data, loss="classification", shown="f")
    assert (ex.prompt, ex.completion) == ("fine film It was", " bad")
    with pytest.raises(FinetuneError, match="expected columns prompt and completion"):
        training_examples(pa.table({"sentence": ["x"]}), data, loss="sft", shown="f")


# ---------------------------------------------------------------------------------------------
# Gradient error, schedule, selection


def test_head_gradient_sums_match_autograd(tiny_lm):
    """The closed-form mean head gradient equals autograd's mean over rows of d(completion CE)/dW."""
    rows = [
        Example(f"{t} It was", VERBALIZERS[lab], lab, f"s:{i}") for i, (t, lab) in enumerate(SYNTH)
    ]
    sums = head_gradient_sums(tiny_lm, rows, batch_size=3)
    head = tiny_lm.head.weight
    total = torch.zeros_like(head)
    for ex in rows:
        ids, n_prompt = encode_pair(tiny_lm.tokenizer, ex.prompt, ex.completion)
        with torch.enable_grad():
            w = head.detach().clone().requires_grad_(True)
            hidden = tiny_lm.model.base_model(input_ids=torch.tensor([ids])).last_hidden_state
            logits = hidden[0, n_prompt - 1 : len(ids) - 1] @ w.T
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[n_prompt:]))
            (g,) = torch.autograd.grad(loss, w)
        total += g
    closed = sum(g[0] for g, _ in sums.values()) / len(rows)
    assert torch.allclose(closed, total / len(rows), atol=1e-6, rtol=1e-4)
    assert {lab: n for lab, (_, n) in sums.items()} == {"negative": 2, "positive": 2}
    same = gradient_errors(sums, sums)
    assert same["grad_error"] == pytest.approx(0.0, abs=1e-9)
    assert same["grad_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert same["grad_error_classwise"] == pytest.approx(0.0, abs=1e-9)


def test_batch_schedule_sees_every_row_equally_often():
    sched = batch_schedule(5, 16, 10, seed=3)
    assert sched.shape == (10, 16)
    assert np.bincount(sched.ravel(), minlength=5).tolist() == [32] * 5
    assert np.array_equal(sched, batch_schedule(5, 16, 10, seed=3))


def test_selection_reads_dev_never_test():
    records = [
        {"step": 10, "lr": 1e-3, "dev_accuracy": 0.6, "dev_loss": 0.7, "test_accuracy": 0.9},
        {"step": 20, "lr": 1e-3, "dev_accuracy": 0.8, "dev_loss": 0.5, "test_accuracy": 0.1},
        {"step": 20, "lr": 2e-3, "dev_accuracy": 0.8, "dev_loss": 0.4, "test_accuracy": 0.2},
    ]
    assert choose_on_dev(records)["test_accuracy"] == 0.2  # best dev accuracy, then dev loss


def test_summary_is_mean_and_sample_std_over_seeds():
    def history(seed, test_accuracy):
        record = {
            "step": 2, "dev_accuracy": 0.5, "dev_loss": 0.6, "test_accuracy": test_accuracy,
            "test_loss": 0.7, "test_completion_loss": 0.8, "grad_error": 0.5 + seed,
        }  # fmt: skip
        return {"spec": {"name": "synthetic", "seed": seed, "lr": 1e-3}, "records": [record]}

    (run,) = summarise([history(0, 0.6), history(1, 0.8)], {"synthetic": 4}, [0, 1])
    assert run["accuracy_mean"] == pytest.approx(0.7)
    assert run["accuracy_std"] == pytest.approx(math.sqrt(0.02))
    assert run["grad_error"] == [{"step": 2, "mean": 1.0, "std": pytest.approx(math.sqrt(0.5))}]


def test_plain_training_loop_moves_the_dev_loss(tiny_lm):
    """Two steps without Ray: records at the eval steps, every metric present."""
    import copy

    model = copy.deepcopy(tiny_lm.model).requires_grad_(True).train()
    protocol = ProtocolConfig(steps=2, eval_every=1, lrs=(1e-2,), batch_size=4)
    rows = [
        Example(f"{t} It was", VERBALIZERS[lab], lab, f"s:{i}") for i, (t, lab) in enumerate(SYNTH)
    ]
    records = run_one(
        RunSpec("synthetic", "synthetic", 0, 1e-2, 2),
        PlainBackend(model, 1e-2, protocol, 2),
        tiny_lm.tokenizer, rows, EvalSets(rows, rows, rows),
        data=DataConfig(verbalizers=VERBALIZERS), protocol=protocol, device=torch.device("cpu"),
    )  # fmt: skip
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[0]["grad_error"] == pytest.approx(0.0, abs=1e-9)  # the set is the reference
    assert {"dev_accuracy", "test_loss", "grad_error_classwise"} <= set(records[2])
    assert records[2]["dev_loss"] != records[1]["dev_loss"]


def test_deepspeed_config_follows_the_protocol():
    base = json.loads(deepspeed_config_path("zero2").read_text())
    ds = finalise_deepspeed_config(
        base, ProtocolConfig(batch_size=16), world_size=4, precision="no"
    )
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1 and ds["zero_optimization"]["stage"] == 2
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    zero3 = json.loads(deepspeed_config_path("zero3").read_text())
    assert zero3["zero_optimization"]["stage"] == 3


# ---------------------------------------------------------------------------------------------
# The job: input errors before Ray, then 2-step runs on Ray Train


def _main(argv: list[str]) -> int:
    return cli.main(argv)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train", "missing.parquet"], "--train 'missing.parquet': file does not exist"),
        (["--train", "{bad}", "--baselines", "random,best"], "unknown baseline 'best'"),
        (["--train", "{bad}", "--seeds", "0,one"], "--seeds: got '0,one'"),
        (["--train", "{bad}", "--seeds", "1,1"], "expected distinct seeds"),
        (["--train", "{bad}"], "expected columns prompt and completion, or text and label"),
        (["--train", "{bad}", "--workers", "3"], "multiple of workers.num_workers"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_ray(tmp_path, capsys, args, message):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"sentence": ["x"], "y": [1]}), bad)
    argv = [a.replace("{bad}", str(bad)) for a in args] + ["--output", str(tmp_path / "o")]
    assert _main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("finetune.py: error: ")
    assert message in lines[0]
    assert captured.out == ""
    assert not (tmp_path / "o").exists()


def test_relative_output_refused_under_ray_job_submit(tmp_path, capsys, monkeypatch):
    """As for distill.py: in a submitted Ray job a relative --output is one line, exit 2."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert _main(["--train", "missing.parquet", "--output", "ft"]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "'ft' is relative" in line and "s3://" in line
    assert not any(tmp_path.iterdir())


def test_the_entry_point_exits_2_as_a_process(tmp_path):
    result = subprocess.run(
        [sys.executable, str(JOB), "--train", str(tmp_path / "none.parquet")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"finetune.py: error: --train {str(tmp_path / 'none.parquet')!r}: file does not exist"
    ]


def test_help_explains_protocol_splits_and_cluster(capsys):
    job = cli
    with pytest.raises(SystemExit) as exit_info:
        job.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("200 steps", "DEV", "TEST", "ray job submit", "zero3", "--set", "herding"):
        assert phrase in text
    with pytest.raises(ConfigError, match="protocol.eval_every"):
        build_finetune_config({"train": "x", "protocol": {"steps": 2, "eval_every": 5}})
    assert FinetuneConfig().protocol.lrs == (7e-6, 1e-5, 1.5e-5)  # the paper's grid


TINY_RUN = [
    "--model", "tiny", "--eval-data", "sample", "--steps", "2", "--eval-every", "1",
    "--lrs", "1e-3", "--seeds", "0", "--set", "splits.dev_size=20",
    "--set", "protocol.eval_batch_size=64", "--set", "splits.grad_error_rows=64",
]  # fmt: skip


def _check_metrics(out: Path, names: list[str]) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["name"] for r in metrics["runs"]] == names
    for run in metrics["runs"]:
        assert set(run) >= {
            "name",
            "n_train",
            "accuracy_mean",
            "accuracy_std",
            "loss_mean",
            "seeds",
        }
        assert 0.0 <= run["accuracy_mean"] <= 1.0 and run["loss_mean"] > 0
        assert isinstance(run["n_train"], int)
        assert [s["seed"] for s in run["seeds"]] == [0]
        for s in run["seeds"]:
            assert {"seed", "accuracy", "loss", "lr", "step", "dev_accuracy"} <= set(s)
    assert metrics["splits"]["test"] == 100 and metrics["splits"]["dev"] == 20
    assert "| method |" in (out / "results.md").read_text()
    for png in ("accuracy.png", "grad_error.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return metrics


def test_two_steps_with_accelerate_on_ray_train(ray_session, synthetic_dir, tmp_path):
    out = tmp_path / "acc"
    rc = _main(
        ["--train", str(synthetic_dir / "synthetic.parquet"), "--output", str(out), *TINY_RUN,
         "--baselines", "zero-shot,random,herding,kcenter,full,same-real"]
    )  # fmt: skip
    assert rc == 0
    metrics = _check_metrics(
        out, ["zero-shot", "synthetic", "random", "herding", "kcenter", "full", "same-real"]
    )
    by_name = {r["name"]: r for r in metrics["runs"]}
    assert by_name["synthetic"]["n_train"] == 4 and by_name["random"]["n_train"] == 4
    assert by_name["same-real"]["n_train"] == 10 and by_name["zero-shot"]["n_train"] == 0
    assert [p["step"] for p in by_name["synthetic"]["grad_error"]] == [0, 1, 2]
    assert metrics["workers"]["strategy"] == "accelerate"
    history = json.loads((out / "history.json").read_text())
    assert len(history["runs"]) == 7
    # A second run on the same output is refused without --overwrite.
    assert _main(["--train", str(synthetic_dir / "synthetic.parquet"), "--output", str(out)]) == 2


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_steps_with_deepspeed_on_two_ray_train_workers(
    ray_session, synthetic_dir, tmp_path, tiny_lm, zero
):
    """DeepSpeed ZeRO-2 and ZeRO-3 (parameters partitioned too) over 2 CPU workers (gloo), each
    taking half of every batch, give the records of a plain single-process torch run of the same
    protocol."""
    import copy

    out = tmp_path / "ds"
    argv = ["--train", str(synthetic_dir / "synthetic.parquet"), "--output", str(out), *TINY_RUN,
            "--strategy", "deepspeed", "--deepspeed-config", zero, "--workers", "2"]  # fmt: skip
    assert _main(argv) == 0
    metrics = _check_metrics(out, ["synthetic"])
    assert metrics["workers"]["strategy"] == "deepspeed" and metrics["workers"]["num_workers"] == 2
    (run,) = json.loads((out / "history.json").read_text())["runs"]
    assert [r["step"] for r in run["records"]] == [0, 1, 2]

    job = cli
    cfg = job.config_from_args(job.parse_args([*argv, "--output", str(tmp_path / "plain")]))
    prep = prepare_job(cfg, overwrite=False)
    model = copy.deepcopy(tiny_lm.model).requires_grad_(True).train()
    p = cfg.protocol
    plain = run_one(
        RunSpec("synthetic", "synthetic", 0, 1e-3, p.steps),
        PlainBackend(model, 1e-3, p, p.steps),
        tiny_lm.tokenizer, prep.train_set,
        EvalSets(prep.dev, prep.test, capped(prep.pool, cfg.splits.grad_error_rows, seed=0)),
        data=cfg.data, protocol=p, device=torch.device("cpu"),
        grad_error_rows=cfg.splits.grad_error_rows,
    )  # fmt: skip
    for ours, ref in zip(run["records"], plain, strict=True):
        for key in ("dev_loss", "test_loss", "grad_error", "train_loss"):
            if ref.get(key) is not None:
                assert ours[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), (ref["step"], key)
