"""Configuration: defaults, YAML, precedence, ``--set`` parsing, errors and fingerprints."""

from __future__ import annotations

import dataclasses
import json
import math
import typing

import pytest

from gradmm_ray.config import (
    AFFECTS_RESULTS,
    STAGES,
    Config,
    DataConfig,
    PoolConfig,
    build_config,
    load_yaml,
    parse_override,
)
from gradmm_ray.distill import cli
from gradmm_ray.errors import ConfigError


def from_argv(*argv: str) -> Config:
    return cli.config_from_args(cli.parse_args(list(argv)))


def config_error(*layers) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(*layers)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Defaults and YAML


def test_defaults_are_the_embedded_demo():
    """The defaults: bundled sample data, SmolLM2, the documented template, privacy and the
    measured solver settings (README: "Choosing the defaults")."""
    cfg = Config()
    assert cfg.data.source == "sample"
    assert cfg.data.split == "train"
    assert cfg.data.prompt_template == "Review: {text}\nSentiment:"
    assert cfg.data.text_column == "text"
    assert cfg.data.label_column == "label"
    assert cfg.data.label_names is None
    assert cfg.data.verbalizers == {"positive": " positive", "negative": " negative"}
    assert cfg.data.generation_chat == "auto"
    assert cfg.model.name == "smollm2-135m"
    assert cfg.targets.gradient == "label_rows"
    assert (cfg.privacy.epsilon, cfg.privacy.delta, cfg.privacy.clip_norm) == (1.0, 1e-4, "auto")
    assert cfg.privacy.adjacency == "add_remove"
    assert cfg.admm.rho == (1.0,)
    assert (cfg.admm.projection, cfg.admm.topk) == ("paper", 3)
    assert (cfg.admm.outer_iters, cfg.admm.inner_steps) == (5, 10)
    assert cfg.select.label_check is True
    assert (cfg.select.rule, cfg.select.per_class) == ("set_match", 4)
    assert cfg.output == "outputs/demo"
    assert cfg.seed == 0
    assert cfg.stages == STAGES == ("targets", "solve", "select")


def test_no_layers_and_no_arguments_give_the_defaults():
    """build_config() and an empty command line both equal Config() and pass validation."""
    assert build_config() == Config()
    assert from_argv() == Config()


def test_yaml_file_is_loaded(tmp_path):
    """A YAML file sets nested fields, with YAML scalars (.inf, lists, null) coerced."""
    path = tmp_path / "run.yaml"
    path.write_text(
        "data:\n"
        "  source: reviews.csv\n"
        "  text_column: body\n"
        "  label_names: [negative, positive]\n"
        "privacy:\n"
        "  epsilon: .inf\n"
        "  clip_norm: null\n"
        "admm:\n"
        "  rho: [0.5, 2]\n"
        "seed: 7\n"
    )
    cfg = from_argv("--config", str(path))
    assert cfg.data.source == "reviews.csv"
    assert cfg.data.text_column == "body"
    assert cfg.data.label_names == ("negative", "positive")
    assert cfg.privacy.epsilon == math.inf
    assert cfg.privacy.clip_norm is None
    assert cfg.admm.rho == (0.5, 2.0)
    assert cfg.seed == 7
    assert cfg.data.label_column == "label"  # untouched fields keep their defaults


def test_empty_yaml_file_gives_defaults(tmp_path):
    """An empty YAML file is an empty layer."""
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_yaml(path) == {}
    assert from_argv("--config", str(path)) == Config()


def test_missing_yaml_file_is_a_config_error(tmp_path):
    """A --config path that does not exist is named in a ConfigError."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_yaml(missing)
    assert "nope.yaml" in str(info.value)


def test_invalid_yaml_is_a_one_line_config_error(tmp_path):
    """Unparsable YAML is reported on one line naming the file."""
    path = tmp_path / "bad.yaml"
    path.write_text("data: [unclosed\n  source: x\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    msg = str(info.value)
    assert "bad.yaml" in msg and "not valid YAML" in msg
    assert "\n" not in msg


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    """A YAML list at the top level is refused."""
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_yaml(path)


# ---------------------------------------------------------------------------------------------
# Precedence: defaults < YAML < named flags < --set


def test_precedence_defaults_yaml_flags_set(tmp_path):
    """Each layer overrides only the fields it sets; --set beats flags, flags beat YAML."""
    path = tmp_path / "run.yaml"
    path.write_text(
        "data:\n  source: yaml.jsonl\n  text_column: body\n"
        "model:\n  name: yaml-model\n"
        "privacy:\n  epsilon: 2.0\n"
        "seed: 3\n"
        "output: yaml-out\n"
    )
    cfg = from_argv(
        "--config",
        str(path),
        "--data",
        "flag.jsonl",
        "--seed",
        "5",
        "--set",
        "privacy.epsilon=4",
        "--set",
        "data.source=set.jsonl",
    )
    assert cfg.data.source == "set.jsonl"  # --set > flag > YAML
    assert cfg.seed == 5  # flag > YAML
    assert cfg.privacy.epsilon == 4.0  # --set > YAML
    assert cfg.data.text_column == "body"  # YAML > default
    assert cfg.model.name == "yaml-model"  # YAML, no flag given
    assert cfg.output == "yaml-out"
    assert cfg.privacy.delta == 1e-4  # default


def test_named_flags_override_yaml(tmp_path):
    """--data, --model, --output, --seed and --stages each override the YAML value."""
    path = tmp_path / "run.yaml"
    path.write_text(
        "data: {source: a.jsonl}\nmodel: {name: a-model}\noutput: a-out\nseed: 1\n"
        "stages: [targets]\n"
    )
    cfg = from_argv(
        "--config",
        str(path),
        "--data",
        "b.jsonl",
        "--model",
        "b-model",
        "--output",
        "b-out",
        "--seed",
        "2",
        "--stages",
        "solve, select",
    )
    assert (cfg.data.source, cfg.model.name, cfg.output, cfg.seed) == (
        "b.jsonl",
        "b-model",
        "b-out",
        2,
    )
    assert cfg.stages == ("solve", "select")


def test_set_overrides_named_flag_and_later_set_wins():
    """--set model.name beats --model; of two --set for one key the last wins."""
    cfg = from_argv(
        "--model",
        "flag-model",
        "--set",
        "model.name=set-model",
        "--set",
        "seed=1",
        "--set",
        "seed=9",
    )
    assert cfg.model.name == "set-model"
    assert cfg.seed == 9


def test_set_merges_into_a_yaml_section(tmp_path):
    """--set replaces one key of a section and keeps the section's other YAML keys."""
    path = tmp_path / "run.yaml"
    path.write_text("privacy:\n  epsilon: 3\n  delta: 0.001\n")
    cfg = from_argv("--config", str(path), "--set", "privacy.epsilon=8")
    assert cfg.privacy.epsilon == 8.0
    assert cfg.privacy.delta == 0.001


# ---------------------------------------------------------------------------------------------
# --set values are YAML scalars


def test_set_epsilon_dot_inf_is_infinity():
    """privacy.epsilon=.inf parses to math.inf (no noise)."""
    cfg = from_argv("--set", "privacy.epsilon=.inf")
    assert cfg.privacy.epsilon == math.inf
    assert isinstance(cfg.privacy.epsilon, float)


def test_set_delta_scientific_notation_is_a_float():
    """privacy.delta=1e-4 is the float 0.0001 (PyYAML alone reads '1e-4' as a string)."""
    cfg = from_argv("--set", "privacy.delta=1e-4", "--set", "admm.lr=2e-3")
    assert cfg.privacy.delta == 0.0001
    assert isinstance(cfg.privacy.delta, float)
    assert cfg.admm.lr == 0.002


def test_yaml_file_scientific_notation_is_a_float(tmp_path):
    """delta: 1e-5 in a YAML file is the float 0.00001, as with --set."""
    path = tmp_path / "run.yaml"
    path.write_text("privacy:\n  delta: 1e-5\n")
    assert from_argv("--config", str(path)).privacy.delta == 1e-5


def test_set_bool_false():
    """select.label_check=false is the boolean False."""
    assert from_argv("--set", "select.label_check=false").select.label_check is False


def test_set_rho_list_becomes_tuple_of_floats():
    """admm.rho=[0.1, 1] becomes (0.1, 1.0), every entry a float."""
    rho = from_argv("--set", "admm.rho=[0.1, 1]").admm.rho
    assert rho == (0.1, 1.0)
    assert all(isinstance(r, float) for r in rho)


def test_set_scalar_rho_becomes_tuple_of_one():
    """A scalar where a list is expected is a list of one: admm.rho=2 -> (2.0,)."""
    assert from_argv("--set", "admm.rho=2").admm.rho == (2.0,)


def test_set_label_names_and_null():
    """Lists of strings become tuples; null sets an optional field to None."""
    cfg = from_argv(
        "--set", "data.label_names=[negative, positive]", "--set", "select.per_class=null"
    )
    assert cfg.data.label_names == ("negative", "positive")
    assert cfg.select.per_class is None


def test_parse_override_nests_dotted_keys():
    """'a.b=v' -> {'a': {'b': v}}; a top-level key stays flat."""
    assert parse_override("admm.rho=[0.1, 1]") == {"admm": {"rho": [0.1, 1]}}
    assert parse_override("seed=3") == {"seed": 3}
    assert parse_override("data.source=") == {"data": {"source": ""}}


@pytest.mark.parametrize("text", ["privacy.epsilon", "=3", "privacy..epsilon=1"])
def test_malformed_set_is_a_config_error(text):
    """--set without '=' or with an empty key part is refused, naming the argument."""
    with pytest.raises(ConfigError, match="expected section.key=value") as info:
        parse_override(text)
    assert repr(text) in str(info.value)


def test_set_with_invalid_yaml_value():
    """A --set value that is not valid YAML is a ConfigError naming the argument."""
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_override("admm.rho=[0.1, 1")


# ---------------------------------------------------------------------------------------------
# Unknown keys and type errors


def test_unknown_key_suggests_the_close_one():
    """data.txt_column is refused with a did-you-mean naming text_column."""
    with pytest.raises(ConfigError) as info:
        from_argv("--set", "data.txt_column=body")
    msg = str(info.value)
    assert "unknown config key 'data.txt_column'" in msg
    assert "did you mean 'text_column'?" in msg


def test_unknown_section_suggests_the_close_one():
    """An unknown section (dta) suggests data."""
    msg = config_error({"dta": {"source": "x"}})
    assert "unknown config key 'dta'" in msg
    assert "did you mean 'data'?" in msg


def test_unknown_key_without_close_match_lists_known_keys():
    """With no close match the known keys of that section are listed."""
    msg = config_error({"privacy": {"zzzzzz": 1}})
    assert "unknown config key 'privacy.zzzzzz'" in msg
    assert "known:" in msg and "epsilon" in msg and "clip_norm" in msg


def test_unknown_key_in_yaml_file(tmp_path):
    """Unknown keys in a YAML file get the same did-you-mean as --set."""
    path = tmp_path / "run.yaml"
    path.write_text("privacy:\n  epsilom: 2\n")
    with pytest.raises(ConfigError, match=r"privacy\.epsilom.*did you mean 'epsilon'\?"):
        from_argv("--config", str(path))


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        ({"admm": {"num_tokens": "many"}}, "admm.num_tokens: got 'many', expected int"),
        ({"select": {"label_check": "maybe"}}, "select.label_check: got 'maybe', expected bool"),
        (
            {"privacy": {"clip_norm": [1]}},
            "privacy.clip_norm: got [1], expected float or str or null",
        ),
        ({"admm": {"rho": ["x"]}}, "admm.rho[0]: got 'x', expected float"),
        ({"seed": 1.5}, "seed: got 1.5, expected int"),
        ({"privacy": 3}, "privacy: got 3, expected a mapping of PrivacyConfig"),
        ({"data": {"verbalizers": ["a", "b"]}}, "data.verbalizers: got ['a', 'b']"),
    ],
)
def test_type_errors_name_field_and_value(layer, expected):
    """A value of the wrong type is reported with the field, the value and the expected type."""
    assert expected in config_error(layer)


def test_type_error_through_set():
    """The same type errors come through --set."""
    with pytest.raises(ConfigError, match="admm.outer_iters: got 'ten', expected int"):
        from_argv("--set", "admm.outer_iters=ten")


# ---------------------------------------------------------------------------------------------
# Validation rules


@pytest.mark.parametrize(
    ("layer", "parts"),
    [
        ({"privacy": {"epsilon": 0}}, ["privacy.epsilon", "got 0.0", "> 0"]),
        ({"privacy": {"epsilon": -1}}, ["privacy.epsilon", "got -1.0", "> 0"]),
        ({"privacy": {"delta": 0}}, ["privacy.delta", "got 0.0", "(0, 1)"]),
        ({"privacy": {"delta": 1}}, ["privacy.delta", "got 1.0", "(0, 1)"]),
        ({"privacy": {"delta": 1.5}}, ["privacy.delta", "got 1.5", "(0, 1)"]),
        ({"privacy": {"clip_norm": 0}}, ["privacy.clip_norm", "got 0.0", "> 0, auto or null"]),
        ({"privacy": {"clip_norm": -2}}, ["privacy.clip_norm", "got -2.0", "> 0, auto or null"]),
        ({"privacy": {"clip_norm": "big"}}, ["privacy.clip_norm", "got 'big'", "auto"]),
        (
            {"privacy": {"clip_norm": None, "epsilon": 2}},
            ["privacy.clip_norm", "null", "privacy.epsilon = .inf", "epsilon 2.0"],
        ),
        (
            {"privacy": {"adjacency": "swap"}},
            ["privacy.adjacency", "'swap'", "add_remove", "replace_one"],
        ),
        (
            {"admm": {"projection": "nearest"}},
            ["admm.projection", "'nearest'", "paper", "reference"],
        ),
        ({"admm": {"rho": [0.1, 0]}}, ["admm.rho", "[0.1, 0.0]", "> 0"]),
        ({"admm": {"rho": -1}}, ["admm.rho", "[-1.0]", "> 0"]),
        ({"admm": {"rho": []}}, ["admm.rho", "[]", "one or more"]),
        ({"stages": ["targets", "finetune"]}, ["stages", "'finetune'", "targets", "select"]),
        ({"stages": []}, ["stages", "[]", "one or more"]),
        ({"data": {"prompt_template": "no field"}}, ["data.prompt_template", "'no field'"]),
        ({"data": {"generation_chat": "maybe"}}, ["data.generation_chat", "'maybe'", "auto"]),
        ({"select": {"balance_tolerance": -0.1}}, ["select.balance_tolerance", "got -0.1", ">= 0"]),
        ({"data": {"per_class": 1}}, ["data.per_class", "got 1", ">= 2"]),
        ({"data": {"per_class": 8}}, ["data.per_class", "got 8", "privacy.sample_rate", "Poisson"]),
        ({"data": {"max_examples": 8}}, ["data.max_examples", "breaks the privacy guarantee"]),
        ({"privacy": {"sample_rate": 0}}, ["privacy.sample_rate", "got 0", "(0, 1]"]),
        (
            {"privacy": {"sample_rate": 0.5, "adjacency": "replace_one"}},
            ["privacy.sample_rate", "replace_one", "add_remove"],
        ),
        ({"model": {"dtype": "int8"}}, ["model.dtype", "'int8'", "bfloat16"]),
        ({"select": {"rule": "best"}}, ["select.rule", "'best'", "set_match", "lowest_loss"]),
        (
            {"targets": {"gradient": "full_head"}},
            ["select.rule", "set_match", "full_head", "V x d", "lowest_loss"],
        ),
    ],
)
def test_validation_names_field_value_and_allowed_range(layer, parts):
    """Each rule of config.validate names the field, the offending value and what is allowed."""
    msg = config_error(layer)
    for part in parts:
        assert part in msg, (part, msg)


def test_clip_norm_null_is_allowed_with_infinite_epsilon():
    """No clipping is valid when there is no noise (epsilon .inf)."""
    cfg = from_argv("--set", "privacy.epsilon=.inf", "--set", "privacy.clip_norm=null")
    assert cfg.privacy.clip_norm is None
    assert cfg.privacy.epsilon == math.inf


def test_all_validation_problems_reported_at_once():
    """Two bad fields give one ConfigError naming both."""
    msg = config_error({"privacy": {"epsilon": 0, "delta": 2}, "admm": {"projection": "x"}})
    assert "privacy.epsilon" in msg
    assert "privacy.delta" in msg
    assert "admm.projection" in msg
    assert "\n" not in msg


def test_all_key_and_type_problems_reported_at_once():
    """An unknown key and a type error in one config are both reported."""
    msg = config_error({"data": {"txt_column": "x"}, "admm": {"num_tokens": "many"}})
    assert "data.txt_column" in msg
    assert "admm.num_tokens" in msg


def test_all_problems_reported_at_once_through_the_cli():
    """Two bad --set values give one error naming both fields."""
    with pytest.raises(ConfigError) as info:
        from_argv("--set", "privacy.epsilon=-1", "--set", "privacy.clip_norm=0")
    msg = str(info.value)
    assert "privacy.epsilon: got -1.0" in msg
    assert "privacy.clip_norm: got 0.0" in msg


# ---------------------------------------------------------------------------------------------
# Serialisation and fingerprint


def test_to_dict_writes_inf_as_string_and_is_strict_json():
    """to_dict turns inf into "inf" so json.dumps(allow_nan=False) works, and round-trips."""
    cfg = build_config(
        {
            "privacy": {"epsilon": ".inf", "clip_norm": None},
            "admm": {"rho": [0.1, 1]},
            "data": {"label_names": ["negative", "positive"]},
            "select": {"few_shot": [{"text": "Fine.", "label": "positive"}]},
        }
    )
    d = cfg.to_dict()
    assert d["privacy"]["epsilon"] == "inf"
    assert d["admm"]["rho"] == [0.1, 1.0]
    text = json.dumps(d, allow_nan=False)
    assert build_config(json.loads(text)) == cfg


def test_to_dict_round_trips_the_defaults():
    """build_config(Config().to_dict()) == Config()."""
    assert build_config(Config().to_dict()) == Config()


@pytest.mark.parametrize(
    "layer",
    [
        {"output": "elsewhere"},
        {"stages": ["select"]},
        {"targets": {"min_actors": 2, "max_actors": 4}},
        {"targets": {"num_gpus": 1, "num_cpus": 4}},
        {"targets": {"micro_batch_size": 8, "rows_per_partial": 64}},
        {"solve": {"batch_size": 2, "max_actors": 8, "num_gpus": 0.5}},
        {"select": {"batch_size": 64}},
        {"select": {"min_actors": 2, "max_actors": 3, "num_gpus": 1, "num_cpus": 2}},
        {"execution": {"stall_timeout_s": 60, "max_actor_restarts": 0}},
        {"audit": {"enabled": True}},
    ],
)
def test_fingerprint_ignores_output_stages_and_resources(layer):
    """Output location, stage choice and resource settings do not change the fingerprint."""
    assert build_config(layer).fingerprint_dict() == Config().fingerprint_dict()


@pytest.mark.parametrize(
    "layer",
    [
        {"privacy": {"epsilon": 2.0}},
        {"privacy": {"epsilon": ".inf"}},
        {"seed": 1},
        {"admm": {"rho": [0.5]}},
        {"data": {"source": "other.jsonl"}},
        {"solve": {"candidates_per_class": 3}},
        {"admm": {"lr": 0.01}},
        {"select": {"per_class": 2}},
        {"model": {"dtype": "float32"}},
    ],
)
def test_fingerprint_changes_with_result_settings(layer):
    """Settings that determine the results (privacy.epsilon, seed, ...) change the fingerprint."""
    assert build_config(layer).fingerprint_dict() != Config().fingerprint_dict()


def test_every_config_field_says_whether_it_changes_results():
    """Every field (sections too) declares affects_results in its metadata; the fingerprint
    holds exactly the leaf fields marked True under sections marked True. Pinned here: resource
    fields, output, stages, audit and execution never change results; a new field is a choice."""
    unmarked: list[str] = []
    kept: set[str] = set()

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            name = prefix + f.name
            if AFFECTS_RESULTS not in f.metadata:
                unmarked.append(name)
            elif f.metadata[AFFECTS_RESULTS] and dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], name + ".")
            elif f.metadata[AFFECTS_RESULTS]:
                kept.add(name)

    walk(Config, "")
    assert unmarked == []
    pool = {f.name for f in dataclasses.fields(PoolConfig)}
    assert not {name.rsplit(".", 1)[-1] for name in kept} & pool
    assert not any(name.startswith(("audit.", "execution.")) for name in kept)
    assert {n for n in kept if n.startswith("targets.")} == {"targets.gradient"}
    assert {"output", "stages", "solve.batch_size", "select.batch_size"}.isdisjoint(kept)
    assert {"seed", "admm.lr", "privacy.epsilon", "solve.candidates_per_class"} <= kept
    fingerprint = Config().fingerprint_dict()
    leaves = {
        f"{section}.{key}" if isinstance(value, dict) else section
        for section, value in fingerprint.items()
        for key in (value if isinstance(value, dict) else [None])
    }
    assert leaves == kept
    assert fingerprint["targets"] == {"gradient": "label_rows"}  # the target space only


def test_pool_config_is_shared_by_the_three_stages():
    """targets, solve and select are each a PoolConfig, with their own pool (flat YAML keys)."""
    cfg = build_config({"select": {"max_actors": 5, "num_gpus": 1}, "solve": {"max_actors": 7}})
    assert all(isinstance(getattr(cfg, stage), PoolConfig) for stage in STAGES)
    assert (cfg.select.max_actors, cfg.select.num_gpus, cfg.solve.max_actors) == (5, 1.0, 7)
    msg = config_error({"select": {"min_actors": 0, "num_cpus": 0}})
    assert "select.min_actors: got 0, expected >= 1" in msg
    assert "select.num_cpus: got 0.0, expected > 0" in msg


def test_fingerprint_is_json_serialisable():
    """The fingerprint is stored in run.json: it must be strict JSON, even with epsilon .inf."""
    fp = build_config({"privacy": {"epsilon": ".inf"}}).fingerprint_dict()
    assert json.loads(json.dumps(fp, allow_nan=False)) == fp
    assert "output" not in fp and "stages" not in fp


def test_data_config_is_frozen():
    """Config sections are immutable."""
    with pytest.raises(AttributeError):
        DataConfig().source = "x"  # type: ignore[misc]
