"""Resuming gives the same run; an interrupted or failed run loses nothing."""

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, TrainerCallback

from longswap.cli import main
from longswap.data import byte_tokenizer
from longswap.io import mark_written
from longswap.train import PretrainConfig, pretrain
from longswap.train.data import datasets
from longswap.train.pretrain import model_config
from longswap.train.runner import train


class StopAfter(TrainerCallback):
    """Simulates a run killed right after the checkpoint of ``step``."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def run(corpus, out, stop_after=None, resume=False):
    config = PretrainConfig(
        out=str(out),
        data=[str(corpus)],
        seq_len=32,
        steps=8,
        batch_size=4,
        eval_steps=4,
        warmup_steps=1,
        resume=resume,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config("tiny", 32, 257))
    callbacks = [StopAfter(stop_after)] if stop_after else []
    sets = datasets(config, byte_tokenizer())
    trainer, record = train(model, *sets, config, out, callbacks=callbacks)
    return model, trainer


def test_resume_ends_where_an_uninterrupted_run_ends(corpus, tmp_path):
    whole, whole_trainer = run(corpus, tmp_path / "whole")
    run(corpus, tmp_path / "cut", stop_after=4)
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-4").is_dir()
    resumed, resumed_trainer = run(corpus, tmp_path / "cut", resume=True)
    assert resumed_trainer.state.global_step == whole_trainer.state.global_step == 8
    # Documented tolerance: CPU, seeded, same thread count: identical to float32 rounding.
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
    loss = [e["loss"] for e in whole_trainer.state.log_history if "loss" in e][-1]
    resumed_loss = [e["loss"] for e in resumed_trainer.state.log_history if "loss" in e][-1]
    assert resumed_loss == pytest.approx(loss, rel=1e-5)


def pretrain_into(corpus, out, **fields):
    settings = dict(data=[str(corpus)], seq_len=32, steps=2, batch_size=2, eval_steps=2)
    settings["warmup_steps"] = 1
    return pretrain(PretrainConfig(out=str(out), **(settings | fields)))


def old_out(tmp_path):
    """An earlier longswap output (marked as longswap's: ``--overwrite`` may replace it)."""
    out = tmp_path / "out"
    out.mkdir()
    mark_written(out)
    (out / "precious.txt").write_text("old run")
    return out


def test_a_stale_old_folder_of_an_interrupted_overwrite_loses_nothing(corpus, tmp_path):
    out = old_out(tmp_path)
    stale = tmp_path / ".out.old"  # what an overwrite interrupted by earlier versions left
    stale.mkdir()
    (stale / "model.safetensors").write_text("an earlier result")
    pretrain_into(corpus, out, overwrite=True)
    assert (out / "config.json").is_file() and (out / "checkpoints").is_dir()
    assert (stale / "model.safetensors").read_text() == "an earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old", "out"]


def test_a_killed_overwrite_run_is_kept_and_resume_continues_it(corpus, tmp_path):
    out = old_out(tmp_path)
    args = ["pretrain", "--out", out, "--data", corpus, "--seq-len", 32, "--steps", 10000]
    args += ["--batch-size", 2, "--eval-steps", 5, "--warmup-steps", 1, "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "-m", "longswap", *map(str, args)], env=env)
    staging = []
    for _ in range(1200):
        staging = [p for p in tmp_path.iterdir() if p.name != "out"]
        saved = any((p / "new/checkpoints/longswap_run.json").is_file() for p in staging)
        if saved or run.poll() is not None:  # once a checkpoint is complete
            break
        time.sleep(0.1)
    run.kill()  # kill -9: no clean-up runs
    run.wait()
    assert staging and (out / "precious.txt").is_file()
    with pytest.raises(ValueError, match="checkpoints of an unfinished run .* --resume"):
        pretrain_into(corpus, out, overwrite=True)  # the same command discards nothing
    killed = {p.name for p in staging[0].rglob("checkpoint-*")}
    pretrain_into(corpus, out, resume=True, steps=10, eval_steps=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "config.json").is_file() and not (out / "precious.txt").exists()
    assert killed & {p.name for p in (out / "checkpoints").glob("checkpoint-*")}


def test_a_folder_in_the_way_of_staging_is_refused_first(corpus, tmp_path, capsys):
    out = old_out(tmp_path)
    foreign = tmp_path / ".out.longswap"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not longswap's")
    with pytest.raises(ValueError, match=r"\.out\.longswap is in the way .* not made by longswap"):
        pretrain_into(corpus, out, overwrite=True)
    assert (foreign / "notes.txt").is_file() and (out / "precious.txt").is_file()
    model = tmp_path / "model"
    pretrain_into(corpus, model)
    args = ["swap", "--model", model, "--pattern", "full()", "--out", out, "--overwrite"]
    assert main([str(a) for a in args]) == 2
    assert "is in the way" in capsys.readouterr().err


def test_a_finished_result_that_cannot_be_published_is_kept(corpus, tmp_path, monkeypatch):
    out = old_out(tmp_path)
    rename = Path.rename

    def failing(self, target):
        if Path(target) == out and self.name == "new":
            raise OSError(errno.EACCES, "Permission denied")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(ValueError, match=r"finished result is in .*new, but moving it to"):
        pretrain_into(corpus, out, overwrite=True)
    monkeypatch.undo()
    result = tmp_path / ".out.longswap" / "new"
    assert (result / "config.json").is_file() and (result / "checkpoints").is_dir()
    assert (out / "precious.txt").read_text() == "old run"  # put back in its place
    with pytest.raises(ValueError, match="holds a finished result"):  # never cleared
        pretrain_into(corpus, out, overwrite=True)
    assert (result / "config.json").is_file()


class Poison(TrainerCallback):
    """Makes the weights NaN after ``step``: the next loss is not finite."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))


def test_a_non_finite_loss_names_the_newest_good_checkpoint(corpus, tmp_path):
    config = PretrainConfig(
        out=str(tmp_path), data=[str(corpus)], seq_len=32, steps=14, batch_size=2, eval_steps=5
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config("tiny", 32, 257))
    sets = datasets(config, byte_tokenizer())
    with pytest.raises(RuntimeError, match=r"nan at step .*checkpoint: \S*checkpoint-10\. Lower"):
        train(model, *sets, config, tmp_path, callbacks=[Poison(11)])


def test_a_resumable_write_keeps_its_staging_folder_until_it_completes(tmp_path):
    """``staged_folder(resume=True)`` (the demo's): an interrupted write leaves its folder
    to be continued and the next write starts from it; a plain write clears it."""
    from longswap.io import MARKER, interrupted_write, staged_folder

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), staged_folder(out, resume=True) as staging:
        (staging / "arm-1").write_text("finished")
        raise KeyboardInterrupt
    assert interrupted_write(out) == staging and not out.exists()
    with staged_folder(out, resume=True) as again:
        assert again == staging and (again / "arm-1").read_text() == "finished"
        (again / "arm-2").write_text("finished")
    assert sorted(p.name for p in out.iterdir()) == ["arm-1", "arm-2", MARKER]
    assert interrupted_write(out) is None and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(RuntimeError), staged_folder(tmp_path / "b", resume=True) as staging:
        (staging / "part").write_text("x")
        raise RuntimeError("failed")
    with staged_folder(tmp_path / "b") as fresh:  # without resume: cleared first
        assert not (fresh / "part").exists()
