"""Stage 3 on Ray: score the solved candidates.

Scores per candidate (an actor pool, since they need the LM):
  * ``label_prob``: softmax over labels of the length-normalised completion log-likelihood of
    ``prompt_template(text) + verbalizer(label)``, optionally after user-written few-shot
    demonstrations (paper Sec. 4.4, Appendix B);
  * ``match_loss``: the matching loss of the final training pair, tokenised as fine-tuning will
    see it, against the released target of its label, in the released target's space;
  * ``log_ppl``: mean token NLL of the text under the LM given the label's generation prefix;
  * ``gradient`` (select.rule set_match): that pair's own gradient in the released space, for
    the set matching that follows (float32 bytes: a plain Arrow column, read by ``gradients``).

The selection rules that follow are pure (gradmm_ray.core.selection). Reads the solves and the
released targets only, never real data.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from gradmm_ray.config import Config
from gradmm_ray.core.lm import load_model
from gradmm_ray.core.scoring import completion_logprobs, few_shot_context
from gradmm_ray.core.target_space import target_space
from gradmm_ray.core.text import encode_generation_prefix, encode_pair, format_prompt
from gradmm_ray.distributed.ray_env import StageBar, map_on_actor_pool

# ---------------------------------------------------------------------------------------------
# Scores


class CandidateScorer:
    """Ray Data actor: solved candidates in, the same rows with scores out."""

    def __init__(self, cfg: Config, targets_ref: list):
        import ray

        self.lm = load_model(cfg.model, progress=False)
        self.head = self.lm.head_params_fp32()
        self.space = target_space(
            cfg.targets.gradient, self.lm, cfg.data.verbalizers, head=self.head
        )
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
        self.with_gradients = cfg.select.rule == "set_match"

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
        gen = {
            lab: encode_generation_prefix(
                tok, d.generation_prefix.format(label=lab), d.generation_chat
            )
            for lab in set(labels)
        }
        ppl_pairs = [
            (g + [int(x) for x in ids], len(g))
            for g, ids in zip((gen[lab] for lab in labels), batch["token_ids"], strict=True)
        ]
        total, count = completion_logprobs(self.lm, self.head, ppl_pairs)
        log_ppl = -(total / count)
        # Matching loss of the final training pair.
        final_loss = torch.empty(len(texts))
        grads = torch.empty((len(texts), self.space.dims)) if self.with_gradients else None
        for label in sorted(set(labels)):
            idx = [i for i, lab in enumerate(labels) if lab == label]
            pairs = [
                encode_pair(tok, format_prompt(d.prompt_template, texts[i]), d.verbalizers[label])
                for i in idx
            ]
            states = self.lm.completion_states(pairs)  # A (n, T, d), targets, mask
            final_loss[idx] = self.space.match_loss(*states, *self.targets[label]).cpu()
            if grads is not None:
                grads[idx] = self.space.example_gradients(*states).cpu()
        out = dict(batch)
        if grads is not None:
            out["gradient"] = np.array([g.tobytes() for g in grads.numpy()], dtype=object)
        out["label_prob"] = label_prob.numpy()
        out["predicted_label"] = np.array(top_label, dtype=object)
        out["log_ppl"] = log_ppl.numpy()
        out["solve_match_loss"] = batch["match_loss"]
        out["match_loss"] = final_loss.numpy()
        return out


def score_candidates(solves: pa.Table, targets: dict, cfg: Config) -> pa.Table:
    import ray
    import ray.data

    targets_ref = ray.put(targets)
    s = cfg.select
    scored = map_on_actor_pool(
        solves,
        CandidateScorer,
        constructor_kwargs={"cfg": cfg, "targets_ref": [targets_ref]},
        pool=s,
        batch_size=s.batch_size,
        execution=cfg.execution,
    )
    parts = []
    with StageBar(
        total=solves.num_rows, desc="select: scoring candidates", unit="ex", model=cfg.model.name
    ) as bar:
        for part in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            parts.append(part)
            bar.update(part.num_rows)
    table = pa.concat_tables(parts)
    return table.sort_by([("synthetic_id", "ascending"), ("rho", "ascending")])


def split_gradients(scored: pa.Table) -> tuple[pa.Table, np.ndarray | None]:
    """(the scores without the ``gradient`` column, the gradients as (rows, dims) float32)."""
    if "gradient" not in scored.column_names:
        return scored, None
    raw = b"".join(scored.column("gradient").to_pylist())
    grads = np.frombuffer(raw, dtype=np.float32).reshape(scored.num_rows, -1)
    return scored.drop_columns(["gradient"]), grads
