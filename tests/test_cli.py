"""The command line: pattern catalogue and pictures."""

import subprocess
import sys

import pytest

from longswap.cli import main
from longswap.patterns import REGISTRY, parse_pattern
from longswap.patterns.catalogue import CATALOGUE


def test_catalogue_covers_every_pattern_and_round_trips():
    assert set(CATALOGUE) == set(REGISTRY)
    for example, _ in CATALOGUE.values():
        assert parse_pattern(str(example)) == example


def test_patterns_plot_writes_one_png_per_pattern(tmp_path, capsys):
    out = tmp_path / "pictures"
    assert main(["patterns", "--plot", str(out), "--length", "512"]) == 0
    pngs = sorted(p.name for p in out.iterdir())
    assert pngs == sorted(f"{name}.png" for name in REGISTRY)
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in pngs)
    assert "sliding_window" in capsys.readouterr().out


def test_patterns_plot_refuses_a_file(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    assert main(["patterns", "--plot", str(target)]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("length", ["0", "-5"])
def test_patterns_plot_refuses_a_length_below_one(tmp_path, capsys, length):
    assert main(["patterns", "--plot", str(tmp_path / "p"), "--length", length]) == 2
    assert f"--length must be a positive token count, got {length}" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_module_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "longswap", "patterns"], capture_output=True, text=True, check=True
    )
    assert "block_topk" in done.stdout


def test_list_flags_take_spaces_or_commas_in_every_command():
    from longswap.cli import _flat, _parser

    base = ["swap", "--model", "m", "--pattern", "full()", "--out", "o"]
    for words in (
        ["--full-layers", "-1", "-2"],
        ["--full-layers=-1,-2"],  # a comma list starting with "-" needs the = form
        ["--full-layers", "-1", "--full-layers", "-2"],
    ):
        args = _parser().parse_args([*base, *words])
        assert _flat(args.full_layers) == [-1, -2]
    args = _parser().parse_args(["finetune", "--full-layers", "-1", "-2", "--out", "o"])
    assert args.full_layers == [[-1], [-2]]  # flattened by from_arguments


def test_help_text_has_no_markup(capsys):
    from longswap.cli import main

    for command in ("swap", "patterns", "pretrain", "finetune", "eval", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "``" not in capsys.readouterr().out, command
