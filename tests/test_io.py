"""Writing files: every record all at once; ``--overwrite`` replaces only longswap's folders."""

import json
import os

import pytest

from longswap.cli import main
from longswap.io import MARKER, write_atomic, write_json

from .swap.conftest import make_model


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    record = tmp_path / "results.json"
    write_json(record, {"records": [1, 2]})

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        write_json(record, {"records": [1, 2, 3]})
    monkeypatch.undo()
    assert json.loads(record.read_text()) == {"records": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    write_atomic(record, b"{}")
    assert record.read_text() == "{}"


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "base"
    make_model("llama").save_pretrained(folder)
    return folder


def swap(model, out, *flags):
    return main(["swap", "--model", str(model), "--pattern", "full()", "--out", str(out), *flags])


def test_overwrite_refuses_a_folder_longswap_did_not_write(model, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    assert swap(model, notes, "--overwrite") == 2
    err = capsys.readouterr().err
    assert f"--out {notes} holds files that longswap did not write (todo.txt)" in err
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]
    models = tmp_path / "models"  # a folder of models is not itself one
    assert swap(model, models / "a") == 0 and swap(model, models / "b") == 0
    assert swap(model, models, "--overwrite") == 2
    assert "(a, b)" in capsys.readouterr().err
    assert sorted(p.name for p in models.iterdir()) == ["a", "b"]


def test_overwrite_replaces_an_empty_folder_and_longswap_outputs(model, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert swap(model, empty, "--overwrite") == 0
    assert (empty / MARKER).is_file() and (empty / "config.json").is_file()
    assert swap(model, empty, "--overwrite") == 0  # marked: longswap's
    earlier = tmp_path / "earlier"  # written before the marker: its config records a swap
    assert swap(model, earlier) == 0
    (earlier / MARKER).unlink()
    assert swap(model, earlier, "--overwrite") == 0
    plain = tmp_path / "plain"  # a checkpoint without a swap record is not longswap's
    make_model("llama").save_pretrained(plain)
    assert swap(model, plain, "--overwrite") == 2
    assert "did not write" in capsys.readouterr().err


def test_a_folder_holding_only_the_marker_counts_as_empty(model, tmp_path, capsys):
    """What a run that stopped before writing anything leaves (the marker, an empty
    checkpoints folder) takes the next run without --overwrite."""
    left = tmp_path / "left"
    (left / "checkpoints").mkdir(parents=True)
    write_json(left / MARKER, {"written_by": "longswap"})
    assert swap(model, left) == 0 and (left / "config.json").is_file()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    assert swap(model, tmp_path / "kept") == 2
    assert "not empty" in capsys.readouterr().err
