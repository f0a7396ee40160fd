"""``longswap swap``: convert a local checkpoint; refuse to clobber."""

import torch

import longswap
from longswap.cli import main

from .conftest import make_model


def test_swap_command_writes_a_loadable_checkpoint(tmp_path, capsys):
    source, out = tmp_path / "base", tmp_path / "swapped"
    model = make_model("llama")
    model.save_pretrained(source)
    code = main(
        [
            "swap",
            "--model",
            str(source),
            "--pattern",
            "sliding_window(window=8, sinks=2)",
            "--max-length",
            "256",
            "--full-layers",
            "-1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "layer 0" in printed and "sliding_window(window=8, sinks=2)" in printed
    assert "RoPE yarn" in printed  # sinks reach arbitrarily far back
    loaded = longswap.load(out)
    assert loaded.config.longswap["layers"] == ["sliding_window(window=8, sinks=2)", "full()"]
    ids = torch.randint(1, 97, (1, 20))
    longswap.swap_attention(
        model, "sliding_window(window=8, sinks=2)", full_layers=[-1], max_length=256
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging left


def test_swap_command_refuses_a_non_empty_out_and_bad_patterns(tmp_path, capsys):
    source, out = tmp_path / "base", tmp_path / "out"
    make_model("llama").save_pretrained(source)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["swap", "--model", str(source), "--pattern", "full()", "--out", str(out)]
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert main([*args[:4], "dense()", "--out", str(tmp_path / "new")]) == 2
    assert "unknown pattern 'dense'" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 2  # not longswap's to replace
    assert "did not write (notes.txt)" in capsys.readouterr().err
    (out / "notes.txt").unlink()
    assert main([*args, "--overwrite"]) == 0  # an empty folder
    assert main([*args, "--overwrite"]) == 0  # longswap's own output
    assert (out / "config.json").exists()


def test_swap_command_reports_a_missing_model(tmp_path, capsys):
    assert (
        main(
            [
                "swap",
                "--model",
                str(tmp_path / "nope"),
                "--pattern",
                "full()",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_swap_command_refuses_an_out_that_overlaps_the_model(tmp_path, capsys):
    source = tmp_path / "base"
    make_model("llama").save_pretrained(source)
    before = sorted(p.name for p in source.iterdir())
    for out in (source, source / "inner", tmp_path):
        args = ["swap", "--model", str(source), "--pattern", "full()", "--out", str(out)]
        assert main([*args, "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "--out" in err and "--model" in err and "pick" in err
    assert sorted(p.name for p in source.iterdir()) == before  # nothing touched
    assert longswap.load(source) is not None


def test_overwrite_refuses_the_folder_it_runs_in(tmp_path, monkeypatch, capsys):
    model = tmp_path / "model"
    make_model("llama").save_pretrained(model)
    here = tmp_path / "here"
    here.mkdir()
    (here / "notes.txt").write_text("keep")
    monkeypatch.chdir(here)
    args = ["swap", "--model", str(model), "--pattern", "full()", "--out", ".", "--overwrite"]
    assert main(args) == 2
    assert "--out . holds the current folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "model"]
