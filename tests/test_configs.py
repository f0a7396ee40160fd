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
