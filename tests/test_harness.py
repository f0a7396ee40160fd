"""`longswap harness`: lm-evaluation-harness on a longswap model, offline."""

import json

import pytest

from longswap.cli import main
from longswap.demo import EMBEDDED_MODEL
from longswap.harness import HarnessConfig, harness_problems, task_names

pytest.importorskip("lm_eval")

from tests.conftest import SWAPPED_WINDOW as WINDOW


def test_a_swapped_model_runs_the_passkey_and_a_ruler_task_offline(swapped, tmp_path, capsys):
    """Two prompts each of longswap's passkey and RULER's niah_single_1 at 512 tokens,
    through the swapped model: the record names the pattern and holds lm-eval's scores."""
    out = tmp_path / "harness.json"
    flags = ["--model", str(swapped), "--tasks", "longswap_passkey,niah_single_1"]
    flags += ["--lengths", "512", "--limit", "2", "--out", str(out)]
    assert main(["harness", *flags]) == 0
    record = json.loads(out.read_text())
    assert record["pattern"] == WINDOW and record["lengths"] == [512]
    assert record["longswap_harness"]  # longswap's version
    for task in ("longswap_passkey", "niah_single_1"):
        assert 0 <= record["results"][task]["512,none"] <= 1
        assert record["n_samples"][task]["effective"] == 2
    assert record["results"]["longswap_passkey"]["4096,none"] == -1  # not asked for
    assert "longswap_passkey: 512 " in capsys.readouterr().out
    # Again without --overwrite: refused; with it, the record is replaced.
    assert main(["harness", *flags]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["harness", *flags, "--tasks", "longswap_passkey", "--overwrite"]) == 0
    assert json.loads(out.read_text())["tasks"] == ["longswap_passkey"]


def test_the_preset_names_the_offline_suite():
    config = HarnessConfig(EMBEDDED_MODEL, tasks=["long-context", "niah_single_1"])
    names = task_names(config)
    assert names[:2] == ["niah_single_1", "niah_multikey_2"] and "longswap_passkey" in names
    assert names.count("niah_single_1") == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "no/such/model"}, "no/such/model"),
        ({"lengths": [32]}, "--lengths must be token counts of at least 64"),
        ({"limit": 0.0}, "--limit must be positive"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"include_path": "no/such/folder"}, "not a folder of task YAML files"),
    ],
)
def test_bad_settings_are_refused_before_any_model_loads(change, message, tmp_path):
    from pathlib import Path

    fields = {"model": EMBEDDED_MODEL, "out": tmp_path / "h.json"} | change
    for name in ("model", "include_path"):
        if isinstance(fields.get(name), str):
            fields[name] = Path(fields[name])
    assert any(message in p for p in harness_problems(HarnessConfig(**fields)))


def test_an_unknown_task_or_a_foreign_out_file_is_refused(tmp_path, capsys):
    flags = ["--model", str(EMBEDDED_MODEL), "--lengths", "512", "--out", str(tmp_path / "h.json")]
    assert main(["harness", *flags, "--tasks", "no_such_task"]) == 2
    assert "lm-eval knows no task no_such_task" in capsys.readouterr().err
    theirs = tmp_path / "theirs.json"
    theirs.write_text('{"mine": true}')
    flags = ["--model", str(EMBEDDED_MODEL), "--out", str(theirs), "--overwrite"]
    assert main(["harness", *flags]) == 2
    assert "not written by longswap harness" in capsys.readouterr().err
    assert theirs.read_text() == '{"mine": true}'
