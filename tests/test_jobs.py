"""The shipped job configs validate, and the entry point explains itself."""

import pytest

from gradmm_ray.config import Config, build_config, load_yaml
from gradmm_ray.distill.cli import parse_args
from gradmm_ray.presets import preset_names, resolve_config_path

CONFIGS = preset_names()


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_validate(name):
    """Every YAML preset (gradmm_ray/presets/) builds into a valid Config."""
    assert isinstance(build_config(load_yaml(resolve_config_path(name))), Config)


def test_demo_config_is_the_defaults():
    """The demo preset spells out the defaults: it must not drift from them."""
    assert build_config(load_yaml(resolve_config_path("demo"))) == Config()


def test_help_explains_the_stages_and_examples(capsys):
    """--help names the three stages, resume, and a cluster command."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("targets", "solve", "select", "ray job submit", "resumes", "--set"):
        assert phrase in text


def _help_examples(epilog: str, script: str) -> list[list[str]]:
    """The argv of every example command in an --help epilog: lines joined at a trailing
    backslash, comments dropped, `ray job submit ... --` prefixes removed."""
    import shlex

    commands, pending = [], ""
    for line in epilog.splitlines():
        line = pending + line.split("#")[0].strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        words = shlex.split(line)
        if script in words:
            commands.append(words[words.index(script) + 1 :])
    return commands


@pytest.mark.parametrize("job", ["distill", "finetune"])
def test_help_examples_parse_and_validate(job, tmp_path, monkeypatch):
    """Every example in each job's --help parses and builds a valid config as written (a config
    file it names is created with only what the job requires: the example's own flags are what
    is checked)."""
    import importlib

    cli = importlib.import_module(f"gradmm_ray.{job}.cli")
    examples = _help_examples(cli.EPILOG, f"jobs/{job}.py")
    assert len(examples) >= 3, examples
    monkeypatch.chdir(tmp_path)
    for argv in examples:
        if "--config" in argv and argv[argv.index("--config") + 1].endswith(".yaml"):
            required = "train: synthetic.parquet\n" if job == "finetune" else "{}\n"
            (tmp_path / argv[argv.index("--config") + 1]).write_text(required)
        cli.config_from_args(cli.parse_args(argv))
