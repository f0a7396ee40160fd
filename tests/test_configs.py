"""Every YAML in configs/ is a valid instance, and its first line is the command that runs it."""

from pathlib import Path

import pytest
import yaml

from longswap.evaluate.run import EvalConfig
from longswap.patterns import parse_pattern
from longswap.train import FinetuneConfig, PretrainConfig

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
KINDS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "eval": EvalConfig}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_a_valid_instance(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# longswap ") and f"--config configs/{path.name}" in first
    kind = first.split()[2]
    config = KINDS[kind](**yaml.safe_load(path.read_text()))
    if getattr(config, "pattern", ""):
        parse_pattern(config.pattern)


def test_there_are_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps: [1, 2\n", "is not valid YAML"),
        ("data: corpus/\n", "data must be a list of str values, got 'corpus/'"),
        ("steps: ten\n", "steps must be int, got 'ten'"),
        ("method: lora\n", "method must be one of"),
        ("- a\n- b\n", "must hold field: value pairs"),
    ],
)
def test_bad_yaml_gets_one_clear_error(tmp_path, capsys, text, message):
    from longswap.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert main(["finetune", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") < 6 and not (tmp_path / "o").exists()


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    import argparse

    from longswap.config import from_arguments

    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 2e-3\n")
    parsed = from_arguments(FinetuneConfig, argparse.Namespace(config=config))
    assert parsed.learning_rate == 0.002
