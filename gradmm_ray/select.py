"""Stage 3: score the solved candidates and select the synthetic dataset.

Scores per candidate (an actor pool, since they need the LM):
  * ``label_prob``: softmax over labels of the length-normalised completion log-likelihood of
    ``prompt_template(text) + verbalizer(label)``, optionally after user-written few-shot
    demonstrations (paper Sec. 4.4, Appendix B);
  * ``match_loss``: the matching loss of the final training pair, tokenised as fine-tuning will
    see it, against the released target of its label;
  * ``log_ppl``: mean token NLL of the text under the LM given the label's generation prefix.

Selection (pure functions, each rule can be turned off; counts after each rule form the funnel):
label check -> best rho per synthetic id -> dedupe by normalised text -> per class the
``per_class`` lowest scores (score = match_loss + ppl_weight * log_ppl) -> balance classes.
Reads the solves and the released targets only, never real data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from gradmm_ray.config import Config, SelectConfig
from gradmm_ray.data import encode_pair, format_prompt
from gradmm_ray.headgrad import head_logits, logits_grad, match_loss
from gradmm_ray.lm import CausalLM, load_model
from gradmm_ray.ray_env import map_on_actor_pool
from gradmm_ray.targets import blocks_of

SYNTHETIC_FILE = "synthetic.parquet"
OUTPUT_COLUMNS = (
    "id",
    "text",
    "label",
    "prompt",
    "completion",
    "match_loss",
    "log_ppl",
    "label_prob",
    "rho",
    "seed",
)


# ---------------------------------------------------------------------------------------------
# Scores


@torch.inference_mode()
def completion_logprobs(
    lm: CausalLM, head: tuple[torch.Tensor, torch.Tensor | None], pairs: list[tuple[list[int], int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: the summed log-likelihood of its completion tokens and their count. ``head``:
    ``lm.head_params_fp32()``, made once by the caller (a V x d copy on a bf16 model)."""
    A, targets, mask = lm.completion_states(pairs)
    logits = head_logits(A, *head)
    tail = lm.logits_tail()
    logp = torch.log_softmax(tail(logits) if tail else logits, dim=-1)
    tok = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask  # (N, T)
    return tok.sum(1).cpu(), mask.sum(1).cpu()


def few_shot_context(
    demos: tuple[dict[str, str], ...], template: str, verbalizers: dict[str, str]
) -> str:
    return "".join(
        f"{format_prompt(template, d['text'])}{verbalizers[d['label']]}\n" for d in demos
    )


class CandidateScorer:
    """Ray Data actor: solved candidates in, the same rows with scores out."""

    def __init__(self, cfg: Config, targets_ref: list):
        import ray

        self.lm = load_model(cfg.model, progress=False)
        self.head = self.lm.head_params_fp32()
        self.targets = {
            label: (
                t["weight"].to(self.lm.device),
                t["bias"].to(self.lm.device) if "bias" in t else None,
            )
            for label, t in ray.get(targets_ref[0]).items()
        }
        self.data = cfg.data
        self.context = few_shot_context(
            cfg.select.few_shot, cfg.data.prompt_template, cfg.data.verbalizers
        )
        self.labels = sorted(cfg.data.verbalizers)

    # no_grad, not inference_mode: a model with a logits tail (Gemma-2's soft-cap) takes B by
    # autograd through that tail, which inference tensors refuse.
    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tok, d = self.lm.tokenizer, self.data
        texts = [str(t) for t in batch["text"]]
        labels = [str(x) for x in batch["label"]]
        # Label check: every text under every label.
        scores = []
        for label in self.labels:
            pairs = [
                encode_pair(
                    tok, self.context + format_prompt(d.prompt_template, t), d.verbalizers[label]
                )
                for t in texts
            ]
            total, count = completion_logprobs(self.lm, self.head, pairs)
            scores.append(total / count)
        probs = torch.softmax(torch.stack(scores, dim=1), dim=1)  # (N, K)
        own = torch.tensor([self.labels.index(lab) for lab in labels], dtype=torch.long)
        label_prob = probs.gather(1, own.unsqueeze(1)).squeeze(1)
        top_label = [self.labels[i] for i in probs.argmax(dim=1).tolist()]
        # Perplexity of the text given its label's generation prefix.
        gen = [
            list(tok(d.generation_prefix.format(label=lab), add_special_tokens=True)["input_ids"])
            for lab in labels
        ]
        ppl_pairs = [
            (g + [int(x) for x in ids], len(g))
            for g, ids in zip(gen, batch["token_ids"], strict=True)
        ]
        total, count = completion_logprobs(self.lm, self.head, ppl_pairs)
        log_ppl = -(total / count)
        # Matching loss of the final training pair.
        final_loss = torch.empty(len(texts))
        for label in sorted(set(labels)):
            idx = [i for i, lab in enumerate(labels) if lab == label]
            pairs = [
                encode_pair(tok, format_prompt(d.prompt_template, texts[i]), d.verbalizers[label])
                for i in idx
            ]
            A, targets, mask = self.lm.completion_states(pairs)
            B = logits_grad(head_logits(A, *self.head), targets, mask, self.lm.logits_tail())
            final_loss[idx] = match_loss(A, B, *self.targets[label]).cpu()
        out = dict(batch)
        out["label_prob"] = label_prob.numpy()
        out["predicted_label"] = np.array(top_label, dtype=object)
        out["log_ppl"] = log_ppl.numpy()
        out["solve_match_loss"] = batch["match_loss"]
        out["match_loss"] = final_loss.numpy()
        return out


def score_candidates(solves: pa.Table, targets: dict, cfg: Config, *, num_gpus: float) -> pa.Table:
    import ray
    import ray.data

    targets_ref = ray.put(targets)
    s = cfg.select
    ds = ray.data.from_arrow(blocks_of(solves, s.batch_size, cfg.solve.max_actors))
    scored = map_on_actor_pool(
        ds,
        CandidateScorer,
        constructor_kwargs={"cfg": cfg, "targets_ref": [targets_ref]},
        batch_size=s.batch_size,
        min_actors=1,
        max_actors=cfg.solve.max_actors,
        num_gpus=num_gpus,
        num_cpus=cfg.solve.num_cpus,
        execution=cfg.execution,
    )
    table = pa.concat_tables(list(scored.iter_batches(batch_size=None, batch_format="pyarrow")))
    return table.sort_by([("synthetic_id", "ascending"), ("rho", "ascending")])


# ---------------------------------------------------------------------------------------------
# Selection rules: pure functions on plain rows


def normalise_text(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def selection_score(row: dict, ppl_weight: float) -> float:
    return row["match_loss"] + ppl_weight * row["log_ppl"]


def passes_label_check(row: dict, min_label_prob: float) -> bool:
    return row["predicted_label"] == row["label"] and row["label_prob"] >= min_label_prob


def best_rho_per_id(rows: list[dict], ppl_weight: float) -> list[dict]:
    best: dict[int, dict] = {}
    for r in rows:
        cur = best.get(r["synthetic_id"])
        if cur is None or selection_score(r, ppl_weight) < selection_score(cur, ppl_weight):
            best[r["synthetic_id"]] = r
    return [best[k] for k in sorted(best)]


def dedupe_text(rows: list[dict], ppl_weight: float) -> list[dict]:
    """One row per normalised text, the lowest score (then lowest id) kept."""
    kept: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: (selection_score(r, ppl_weight), r["synthetic_id"])):
        kept.setdefault(normalise_text(r["text"]), r)
    return sorted(kept.values(), key=lambda r: r["synthetic_id"])


def top_per_class(rows: list[dict], per_class: int, ppl_weight: float) -> list[dict]:
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    out = []
    for label in sorted(by_label):
        out += sorted(
            by_label[label], key=lambda r: (selection_score(r, ppl_weight), r["synthetic_id"])
        )[:per_class]
    return sorted(out, key=lambda r: r["synthetic_id"])


def balance_classes(rows: list[dict], ppl_weight: float) -> list[dict]:
    """Each class whose mean score is above the lowest class mean drops its worst rows until its
    mean is at or below that lowest mean, keeping at least one row (paper Sec. 4.4, generalised
    from two classes to any number)."""
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    if len(by_label) < 2:
        return rows
    for label in by_label:
        by_label[label].sort(key=lambda r: (selection_score(r, ppl_weight), r["synthetic_id"]))

    def mean(label: str) -> float:
        return float(np.mean([selection_score(r, ppl_weight) for r in by_label[label]]))

    floor = min(mean(label) for label in by_label)
    for label, members in by_label.items():
        while len(members) > 1 and mean(label) > floor:
            members.pop()
    return sorted(
        (r for members in by_label.values() for r in members), key=lambda r: r["synthetic_id"]
    )


@dataclass
class Selection:
    rows: list[dict]
    funnel: list[dict]  # [{"step": ..., "rows": ..., "per_class": {...}}]


def _count(step: str, rows: list[dict], labels: list[str]) -> dict:
    per = {label: 0 for label in labels}
    for r in rows:
        per[r["label"]] += 1
    return {"step": step, "rows": len(rows), "per_class": per}


def select_rows(rows: list[dict], cfg: SelectConfig, labels: list[str]) -> Selection:
    w = cfg.ppl_weight
    funnel = [_count("candidates", rows, labels)]
    if cfg.label_check:
        rows = [r for r in rows if passes_label_check(r, cfg.min_label_prob)]
        funnel.append(_count("label_check", rows, labels))
    rows = best_rho_per_id(rows, w)
    funnel.append(_count("best_rho", rows, labels))
    if cfg.dedupe:
        rows = dedupe_text(rows, w)
        funnel.append(_count("dedupe", rows, labels))
    if cfg.per_class is not None:
        rows = top_per_class(rows, cfg.per_class, w)
        funnel.append(_count("top_per_class", rows, labels))
    if cfg.balance:
        rows = balance_classes(rows, w)
        funnel.append(_count("balance", rows, labels))
    return Selection(rows, funnel)


def synthetic_table(rows: list[dict], cfg: Config) -> pa.Table:
    """The output contract: one row per selected example, the exact training pair included."""
    d = cfg.data
    rows = sorted(
        rows,
        key=lambda r: (r["label"], selection_score(r, cfg.select.ppl_weight), r["synthetic_id"]),
    )
    return pa.table(
        {
            "id": pa.array([int(r["synthetic_id"]) for r in rows], pa.int64()),
            "text": pa.array([r["text"] for r in rows], pa.string()),
            "label": pa.array([r["label"] for r in rows], pa.string()),
            "prompt": pa.array(
                [format_prompt(d.prompt_template, r["text"]) for r in rows], pa.string()
            ),
            "completion": pa.array([d.verbalizers[r["label"]] for r in rows], pa.string()),
            "match_loss": pa.array([float(r["match_loss"]) for r in rows], pa.float64()),
            "log_ppl": pa.array([float(r["log_ppl"]) for r in rows], pa.float64()),
            "label_prob": pa.array([float(r["label_prob"]) for r in rows], pa.float64()),
            "rho": pa.array([float(r["rho"]) for r in rows], pa.float64()),
            "seed": pa.array([int(r["seed"]) for r in rows], pa.int64()),
        }
    )
