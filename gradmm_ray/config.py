"""Typed configuration: frozen dataclasses, YAML loading, dotted overrides, validation.

Precedence, lowest to highest: the defaults below, the YAML file (``--config``), the named CLI
flags (``--data``, ``--model``, ...), then ``--set section.key=value`` (values parsed as YAML
scalars, so ``.inf``, ``1e-4``, ``true`` and ``[0.1, 1.0]`` work). Every problem found is reported
at once, before any cluster work, in a :class:`ConfigError`.

Defaults are the embedded demo (bundled sample data, the tiny offline model) with the method's
settings from the reference implementation where they are affordable on a laptop CPU; see
the presets in ``gradmm_ray/presets/`` for paper-scale settings.

One file over ~400 lines on purpose: a setting's field, default, fingerprint role and
validation rule are read and changed together, so they live together.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gradmm_ray.errors import ConfigError

STAGES = ("targets", "solve", "select")
PROJECTION_RULES = ("paper", "reference")
ADJACENCIES = ("add_remove", "replace_one")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TARGET_SPACES = ("full_head", "label_rows")  # targets.gradient (core.target_space)
SELECT_RULES = ("set_match", "lowest_loss")  # select.rule (core.selection)


T = TypeVar("T")


# Which settings change the results is declared on each field: Config.fingerprint_dict keeps
# the CHANGES_RESULTS ones (a resumed run must match them) and drops the KEEPS_RESULTS ones
# (resources, stage choice, output location: a resumed run may change them). A section field
# marked CHANGES_RESULTS contributes its own marked fields (possibly none, as targets).
AFFECTS_RESULTS = "affects_results"
CHANGES_RESULTS = {AFFECTS_RESULTS: True}
KEEPS_RESULTS = {AFFECTS_RESULTS: False}


def _result(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A field that changes the results (part of the resume fingerprint)."""
    return field(default=default, metadata=CHANGES_RESULTS, **kwargs)


def _resource(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A field that does not change the results (left out of the resume fingerprint)."""
    return field(default=default, metadata=KEEPS_RESULTS, **kwargs)


@dataclass(frozen=True)
class DataConfig:
    source: str = _result("sample")  # path / URI / hub id; "sample" = the bundled movie reviews
    split: str = _result("train")  # split for hub datasets, save_to_disk folders and "sample"
    text_column: str = _result("text")
    label_column: str = _result("label")
    label_names: tuple[str, ...] | None = _result(None)  # names for integer labels 0..K-1
    # The defaults suit SmolLM2-135M-Instruct and reviews (chosen by measurement: README, issue 12).
    prompt_template: str = _result("Review: {text}\nSentiment:")
    verbalizers: dict[str, str] = _result(
        default_factory=lambda: {"positive": " positive", "negative": " negative"}
    )
    # Conditions the LM during projection only; never part of the training pair.
    generation_prefix: str = _result("Write one sentence of a {label} movie review.")
    # auto: the prefix becomes a user turn of the tokenizer's chat template when it has one
    # (instruction-tuned models), plain text otherwise; true / false force it.
    generation_chat: bool | str = _result("auto")
    # Longest real training pair (prompt + completion) in tokens; a longer one is cut at the end
    # of its text, keeping the template's other parts and the completion. null = the model's
    # max positions, at most 512: the tiny model takes 256, SmolLM2 8192, and stage 1 pads each
    # micro-batch to its longest pair: one 8,000-token row would make all 32 rows 8,000 wide
    # (16x the activations of 512, 250x the attention scores), while review- or sentence-length
    # texts need < 200 tokens. Always capped at the model's max positions.
    max_tokens: int | None = _result(None)
    # Deterministic caps (seeded, stratified): adding one row changes which others are kept, so
    # they break the DP guarantee and are allowed only with privacy.epsilon = .inf. Private runs
    # subsample with privacy.sample_rate instead.
    max_examples: int | None = _result(None)
    per_class: int | None = _result(None)


@dataclass(frozen=True)
class ModelConfig:
    # "smollm2-135m" (converted offline into the cache), "tiny" (the test suite's 2-layer model),
    # a Hugging Face hub id, or a local folder
    name: str = _result("smollm2-135m")
    revision: str | None = _result(None)
    dtype: str = _result("auto")  # auto: bfloat16 on a GPU that supports it, else float32
    device: str = _result("auto")  # auto: cuda when the actor has a GPU, else cpu
    trust_remote_code: bool = _result(False)


@dataclass(frozen=True)
class PrivacyConfig:
    epsilon: float = _result(1.0)  # .inf = no noise
    delta: float = _result(1e-4)
    # C, in the units of one example's gradient (model-dependent: ‖p − onehot‖·‖h‖, h the head's
    # input). About the median norm keeps the weight (1 − p) fine-tuning gives each row; at C 1
    # SmolLM2's rows are all clipped to unit vectors and the classes' sum points elsewhere (cos
    # 0.3 with the real gradient; 0.99 at its median, ~20: README, Quality). auto: half the
    # model's head-input norm on public text (core.target_space.public_clip_norm), set once
    # before stage 1 and recorded. null = no clipping (only with epsilon .inf).
    clip_norm: float | str | None = _result("auto")
    adjacency: str = _result("add_remove")  # or replace_one (sensitivity 2C)
    # Poisson sampling of the real rows (each kept with this probability, secure randomness);
    # the accountant credits the amplification. 1 = every row.
    sample_rate: float = _result(1.0)
    # Testing and debugging ONLY: noise and sampling drawn from `seed`, so anyone who knows the
    # seed can subtract the noise. The record says private: false; every run warns.
    insecure_reproducible_noise: bool = _result(False)


@dataclass(frozen=True)
class PoolConfig:
    """A stage's autoscaling pool of Ray Data actors, each holding the model: it starts
    `min_actors` and grows to `max_actors` while work is queued; each actor asks Ray for
    `num_gpus` GPUs and `num_cpus` CPUs. Shared by the three stages (flat keys in each stage's
    section: targets.max_actors, solve.num_gpus, select.num_cpus, ...)."""

    min_actors: int = _resource(1)
    max_actors: int = _resource(2)
    num_gpus: float | str = _resource("auto")  # auto: 1 when the cluster has GPUs, else 0 (CPU)
    num_cpus: float = _resource(1.0)


@dataclass(frozen=True)
class TargetsConfig(PoolConfig):
    """Stage 1: its pool, and how much each actor call takes. The stream is cut into 4 calls per
    actor (`max_actors`), each of at most `rows_per_partial` rows; a call runs its rows through
    the model `micro_batch_size` at a time and emits one per-class partial sum, so the driver
    receives 4 x max_actors partials per class up to 4 x max_actors x rows_per_partial rows
    (32 M with 8 actors), then one per rows_per_partial rows. `gradient` is the released target's space: full_head (the whole
    LM head's next-token gradient, V x d) or label_rows (the label-option cross-entropy's
    gradient on the verbalizer tokens' head rows, |S| x d; single-token verbalizers only)."""

    gradient: str = _result("label_rows")
    micro_batch_size: int = _resource(32)
    rows_per_partial: int = _resource(1_048_576)


@dataclass(frozen=True)
class AdmmConfig:
    num_tokens: int = _result(12)  # free positions per synthetic example (public, not data-derived)
    # Few, short outer iterations: with a tight top-k most examples reach their best projection in
    # the first 1-4 (measured on SmolLM2: README); the paper's 30 x 50 suit a GPU.
    outer_iters: int = _result(5)
    inner_steps: int = _result(10)
    lr: float = _result(0.008)
    grad_clip: float = _result(1.0)
    rho: tuple[float, ...] = _result((1.0,))  # each value is its own work item
    init_candidates: int = _result(8)
    # paper: the k most probable next tokens, the nearest to X; with a small k the text reads as
    # the LM's own (k 3: log-perplexity 4.9 nats vs real reviews' 5.3; reference rule k 200: 7.5).
    projection: str = _result("paper")  # paper | reference
    topk: int = _result(3)
    # true: alphabetic tokens only (the paper's setting); auto: true for real vocabularies (over
    # core.projection.AUTO_WORD_LIKE_MIN_VOCAB tokens, where byte fragments would decode to U+FFFD)
    word_like_only: bool | str = _result("auto")


@dataclass(frozen=True)
class SolveConfig(PoolConfig):
    """Stage 2: its pool, the number of work items, examples solved side by side per call."""

    candidates_per_class: int = _result(8)
    batch_size: int = _resource(8)  # examples solved side by side on one actor


@dataclass(frozen=True)
class SelectConfig(PoolConfig):
    """Stage 3: its pool (scoring candidates with the model), the rules, rows per call."""

    label_check: bool = _result(True)
    min_label_prob: float = _result(0.0)
    dedupe: bool = _result(True)
    per_class: int | None = _result(4)  # null = keep every candidate that passes
    # set_match: the rows whose summed gradient best matches the combined target (label_rows
    # only); lowest_loss: the paper's per-class lowest scores, then balance (core.selection).
    rule: str = _result("set_match")
    ppl_weight: float = _result(0.0)  # lowest_loss's score: match_loss + ppl_weight * log_ppl
    balance: bool = _result(True)  # lowest_loss only
    # balance leaves a class alone while its mean score is within this fraction above the lowest
    # class mean (0: the paper's strict rule; scores a few % apart are not told apart by it).
    balance_tolerance: float = _result(0.05)
    few_shot: tuple[dict[str, str], ...] = _result(())  # user-written {text, label} demonstrations
    batch_size: int = _resource(16)


@dataclass(frozen=True)
class ExecutionConfig:
    """How long to wait and how often to retry before a stage fails with a clear error."""

    stall_timeout_s: float = _resource(
        1800.0
    )  # no progress this long (e.g. no GPU node comes up): fail
    # An actor that keeps dying ends the stage after this many restarts (raise it for long runs
    # on spot/preemptible nodes: each reclaimed node costs its actor one restart).
    max_actor_restarts: int = _resource(3)


@dataclass(frozen=True)
class AuditConfig:
    # Reads the real data again after the DP release: its output is outside the guarantee.
    enabled: bool = _resource(False)


@dataclass(frozen=True)
class Config:
    data: DataConfig = _result(default_factory=DataConfig)
    model: ModelConfig = _result(default_factory=ModelConfig)
    privacy: PrivacyConfig = _result(default_factory=PrivacyConfig)
    targets: TargetsConfig = _result(default_factory=TargetsConfig)
    admm: AdmmConfig = _result(default_factory=AdmmConfig)
    solve: SolveConfig = _result(default_factory=SolveConfig)
    select: SelectConfig = _result(default_factory=SelectConfig)
    audit: AuditConfig = _resource(default_factory=AuditConfig)
    execution: ExecutionConfig = _resource(default_factory=ExecutionConfig)
    output: str = _resource("outputs/demo")
    seed: int = _result(0)
    stages: tuple[str, ...] = _resource(STAGES)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    def fingerprint_dict(self) -> dict[str, Any]:
        """The settings that determine the results (the fields marked CHANGES_RESULTS), so that
        a resumed run may use a different cluster or run a later stage."""
        return _jsonable(results_only(self))


def results_only(cfg: Any) -> dict[str, Any]:
    """The CHANGES_RESULTS fields of a config dataclass, sections recursively."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if AFFECTS_RESULTS not in f.metadata:
            raise AssertionError(
                f"Internal error: {type(cfg).__name__}.{f.name} does not say whether it "
                "changes results (use _result or _resource)"
            )
        if not f.metadata[AFFECTS_RESULTS]:
            continue
        value = getattr(cfg, f.name)
        out[f.name] = results_only(value) if dataclasses.is_dataclass(value) else value
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Building a Config from nested dicts, with type coercion and collected errors.


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        for candidate in non_none:
            trial: list[str] = []
            out = _coerce(value, candidate, where, trial)
            if not trial:
                return out
        errors.append(f"{where}: got {value!r}, expected {_type_name(tp)}")
        return None
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value.strip().lower() in ("inf", ".inf", "+inf"):
            return math.inf
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value.strip())
            except ValueError:
                number = math.nan
            if not math.isnan(number):
                return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, int | float | str | dict) and not isinstance(value, bool):
            value = [value]  # a scalar where a list is expected: a list of one
        if isinstance(value, list | tuple):
            inner = args[0]
            return tuple(_coerce(v, inner, f"{where}[{i}]", errors) for i, v in enumerate(value))
    elif origin is dict and isinstance(value, Mapping):
        kt, vt = args
        return {
            _coerce(k, kt, f"{where} key", errors): _coerce(v, vt, f"{where}.{k}", errors)
            for k, v in value.items()
        }
    errors.append(f"{where}: got {value!r}, expected {_type_name(tp)}")
    return None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _did_you_mean(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(options))})"


def _build(cls: type, raw: Mapping[str, Any], prefix: str, errors: list[str]) -> Any:
    hints = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in hints:
            errors.append(f"unknown config key {where!r}{_did_you_mean(key, list(hints))}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                errors.append(f"{where}: got {value!r}, expected a mapping of {tp.__name__}")
                continue
            kwargs[key] = _build(tp, value, f"{where}.", errors)
        else:
            kwargs[key] = _coerce(value, tp, where, errors)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"admm.rho=[0.1, 1]"`` -> ``{"admm": {"rho": [0.1, 1]}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    dotted, _, raw_value = text.partition("=")
    keys = [k.strip() for k in dotted.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(
            f"--set {text!r}: value is not valid YAML ({e.__class__.__name__})"
        ) from None
    nested: dict[str, Any] = {keys[-1]: value}
    for k in reversed(keys[:-1]):
        nested = {k: nested}
    return nested


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(
            f"config file {str(p)!r} is not valid YAML: {e}".splitlines()[0]
        ) from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config file {str(p)!r}: expected a mapping at the top level")
    return dict(raw)


def build_typed(
    cls: type[T], layers: Sequence[Mapping[str, Any]], validator: Callable[[T], list[str]]
) -> T:
    """Merge raw layers (later wins) onto the defaults of the dataclass ``cls``, coerce types,
    run ``validator``; raise one ConfigError listing every problem."""
    raw: dict[str, Any] = {}
    for layer in layers:
        raw = _merge(raw, layer)
    errors: list[str] = []
    cfg = _build(cls, raw, "", errors)
    if not errors:
        errors.extend(validator(cfg))
    if errors:
        raise ConfigError("; ".join(errors))
    return cfg


def build_config(*layers: Mapping[str, Any]) -> Config:
    """The distill job's Config from raw layers (later wins), validated."""
    return build_typed(Config, layers, validate)


# ---------------------------------------------------------------------------------------------
# Validation: every rule names the field, the value and what is allowed.


def validate(cfg: Config) -> list[str]:
    errors: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    d, p, a = cfg.data, cfg.privacy, cfg.admm
    need(bool(d.source), "data.source: must not be empty")
    need(
        "{text}" in d.prompt_template,
        f"data.prompt_template: got {d.prompt_template!r}, expected a template containing {{text}}",
    )
    need(
        len(d.verbalizers) >= 2,
        f"data.verbalizers: got {len(d.verbalizers)} label(s), expected at least 2",
    )
    for label, completion in d.verbalizers.items():
        need(
            bool(completion.strip()),
            f"data.verbalizers.{label}: got {completion!r}, expected a non-empty completion",
        )
    if d.label_names is not None:
        missing = [n for n in d.label_names if n not in d.verbalizers]
        need(not missing, f"data.label_names: {missing} have no entry in data.verbalizers")
    need(
        d.max_examples is None or d.max_examples >= 2,
        f"data.max_examples: got {d.max_examples}, expected >= 2 or null",
    )
    need(
        d.per_class is None or d.per_class >= 2,
        f"data.per_class: got {d.per_class}, expected >= 2 or null",
    )
    need(
        d.max_tokens is None or d.max_tokens >= 8,
        f"data.max_tokens: got {d.max_tokens}, expected >= 8 or null (the model's max positions, at most 512)",
    )
    try:
        d.generation_prefix.format(label="x")
    except (KeyError, IndexError, ValueError):
        errors.append(
            f"data.generation_prefix: got {d.generation_prefix!r}, expected a template whose only field is {{label}}"
        )
    if d.generation_chat not in (True, False, "auto"):
        errors.append(
            f"data.generation_chat: got {d.generation_chat!r}, expected true, false or auto"
        )
    try:
        d.prompt_template.format(text="x")
    except (KeyError, IndexError, ValueError):
        errors.append(
            f"data.prompt_template: got {d.prompt_template!r}, expected a template whose only field is {{text}}"
        )

    need(
        cfg.model.dtype in DTYPES, f"model.dtype: got {cfg.model.dtype!r}, expected one of {DTYPES}"
    )
    need(
        cfg.model.device in ("auto", "cpu", "cuda") or cfg.model.device.startswith("cuda:"),
        f"model.device: got {cfg.model.device!r}, expected auto, cpu or cuda",
    )

    need(p.epsilon > 0, f"privacy.epsilon: got {p.epsilon}, expected > 0 (.inf for no noise)")
    need(0 < p.delta < 1, f"privacy.delta: got {p.delta}, expected a value in (0, 1)")
    need(
        p.clip_norm is None
        or p.clip_norm == "auto"
        or (isinstance(p.clip_norm, float | int) and p.clip_norm > 0),
        f"privacy.clip_norm: got {p.clip_norm!r}, expected > 0, auto or null",
    )
    need(
        not (p.clip_norm is None and math.isfinite(p.epsilon)),
        f"privacy.clip_norm: null (no clipping) is only allowed with privacy.epsilon = .inf, got epsilon {p.epsilon}",
    )
    need(
        p.adjacency in ADJACENCIES,
        f"privacy.adjacency: got {p.adjacency!r}, expected one of {ADJACENCIES}",
    )
    need(
        0 < p.sample_rate <= 1,
        f"privacy.sample_rate: got {p.sample_rate}, expected a value in (0, 1]",
    )
    need(
        p.sample_rate == 1 or p.adjacency == "add_remove",
        f"privacy.sample_rate: got {p.sample_rate} with privacy.adjacency replace_one; Poisson "
        "sampling is accounted under add_remove adjacency only (set sample_rate 1 or adjacency add_remove)",
    )
    for name in ("per_class", "max_examples"):
        need(
            getattr(d, name) is None or math.isinf(p.epsilon),
            f"data.{name}: got {getattr(d, name)} with privacy.epsilon {p.epsilon}; a deterministic "
            "cap changes which rows are used when one row is added, which breaks the privacy "
            "guarantee: use privacy.sample_rate (Poisson sampling) or privacy.epsilon .inf",
        )

    for name in STAGES:  # each stage's PoolConfig
        s = getattr(cfg, name)
        need(s.min_actors >= 1, f"{name}.min_actors: got {s.min_actors}, expected >= 1")
        need(
            s.max_actors >= s.min_actors,
            f"{name}.max_actors: got {s.max_actors}, expected >= {name}.min_actors ({s.min_actors})",
        )
        need(
            s.num_gpus == "auto" or (isinstance(s.num_gpus, float | int) and s.num_gpus >= 0),
            f"{name}.num_gpus: got {s.num_gpus!r}, expected auto or a number >= 0",
        )
        need(s.num_cpus > 0, f"{name}.num_cpus: got {s.num_cpus}, expected > 0")
    need(
        cfg.targets.gradient in TARGET_SPACES,
        f"targets.gradient: got {cfg.targets.gradient!r}, expected one of {TARGET_SPACES}",
    )
    need(
        cfg.targets.micro_batch_size >= 1,
        f"targets.micro_batch_size: got {cfg.targets.micro_batch_size}, expected >= 1",
    )
    need(
        cfg.targets.rows_per_partial >= cfg.targets.micro_batch_size,
        f"targets.rows_per_partial: got {cfg.targets.rows_per_partial}, expected >= targets.micro_batch_size",
    )

    need(a.num_tokens >= 1, f"admm.num_tokens: got {a.num_tokens}, expected >= 1")
    need(a.outer_iters >= 1, f"admm.outer_iters: got {a.outer_iters}, expected >= 1")
    need(a.inner_steps >= 1, f"admm.inner_steps: got {a.inner_steps}, expected >= 1")
    need(a.lr > 0, f"admm.lr: got {a.lr}, expected > 0")
    need(a.grad_clip > 0, f"admm.grad_clip: got {a.grad_clip}, expected > 0")
    need(
        len(a.rho) >= 1 and all(r > 0 for r in a.rho),
        f"admm.rho: got {list(a.rho)}, expected one or more values > 0",
    )
    need(a.init_candidates >= 1, f"admm.init_candidates: got {a.init_candidates}, expected >= 1")
    need(
        a.projection in PROJECTION_RULES,
        f"admm.projection: got {a.projection!r}, expected one of {PROJECTION_RULES}",
    )
    need(a.topk >= 1, f"admm.topk: got {a.topk}, expected >= 1")
    need(
        isinstance(a.word_like_only, bool) or a.word_like_only == "auto",
        f"admm.word_like_only: got {a.word_like_only!r}, expected true, false or auto",
    )
    need(
        cfg.solve.candidates_per_class >= 1,
        f"solve.candidates_per_class: got {cfg.solve.candidates_per_class}, expected >= 1",
    )
    need(cfg.solve.batch_size >= 1, f"solve.batch_size: got {cfg.solve.batch_size}, expected >= 1")

    s = cfg.select
    need(
        0 <= s.min_label_prob <= 1,
        f"select.min_label_prob: got {s.min_label_prob}, expected a value in [0, 1]",
    )
    need(
        s.per_class is None or s.per_class >= 1,
        f"select.per_class: got {s.per_class}, expected >= 1 or null",
    )
    need(s.ppl_weight >= 0, f"select.ppl_weight: got {s.ppl_weight}, expected >= 0")
    need(s.rule in SELECT_RULES, f"select.rule: got {s.rule!r}, expected one of {SELECT_RULES}")
    need(
        s.rule != "set_match" or cfg.targets.gradient == "label_rows",
        "select.rule: set_match sums each candidate's own gradient, which under targets.gradient "
        f"{cfg.targets.gradient} has V x d entries; use targets.gradient label_rows or "
        "select.rule lowest_loss",
    )
    need(
        s.balance_tolerance >= 0,
        f"select.balance_tolerance: got {s.balance_tolerance}, expected >= 0",
    )
    need(s.batch_size >= 1, f"select.batch_size: got {s.batch_size}, expected >= 1")
    for i, demo in enumerate(s.few_shot):
        ok = set(demo) == {"text", "label"} and demo.get("label") in d.verbalizers
        need(
            ok,
            f"select.few_shot[{i}]: got {demo!r}, expected {{text, label}} with a label from data.verbalizers",
        )

    e = cfg.execution
    need(
        e.stall_timeout_s > 0 or e.stall_timeout_s == -1,
        f"execution.stall_timeout_s: got {e.stall_timeout_s}, expected > 0 or -1 (never)",
    )
    need(
        e.max_actor_restarts >= 0,
        f"execution.max_actor_restarts: got {e.max_actor_restarts}, expected >= 0",
    )
    need(bool(cfg.output), "output: must not be empty")
    need(
        len(cfg.stages) >= 1 and all(st in STAGES for st in cfg.stages),
        f"stages: got {list(cfg.stages)}, expected one or more of {STAGES}",
    )
    return errors
