"""The shipped job configs validate, and the entry point explains itself."""

from pathlib import Path

import pytest

from gradmm_ray.config import Config, build_config, load_yaml
from gradmm_ray.distill.cli import parse_args

CONFIGS = sorted((Path(__file__).parent.parent / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    """Every YAML under jobs/configs builds into a valid Config."""
    assert isinstance(build_config(load_yaml(path)), Config)


def test_demo_config_is_the_defaults():
    """jobs/configs/demo.yaml spells out the defaults: it must not drift from them."""
    assert build_config(load_yaml(Path(CONFIGS[0]).parent / "demo.yaml")) == Config()


def test_help_explains_the_stages_and_examples(capsys):
    """--help names the three stages, resume, and a cluster command."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("targets", "solve", "select", "ray job submit", "resumes", "--set"):
        assert phrase in text
