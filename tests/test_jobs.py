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
