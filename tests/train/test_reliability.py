"""Resuming gives the same run; data-parallel training on CPU with torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM, TrainerCallback

import longswap
from longswap.data import byte_tokenizer
from longswap.train import PretrainConfig
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


def test_torchrun_data_parallel_on_cpu(corpus, tmp_path):
    base, out = tmp_path / "base", tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--data", str(corpus), "--batch-size", "2", "--warmup-steps", "1"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "longswap",
            "pretrain",
            "--out",
            str(base),
            "--seq-len",
            "32",
            "--steps",
            "2",
            "--eval-steps",
            "2",
            *common,
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "longswap",
            "finetune",
            "--model",
            str(base),
            "--seq-len",
            "64",
            "--steps",
            "3",
            "--eval-steps",
            "3",
            "--pattern",
            "sliding_window(window=16)",
            "--method",
            "full",
            "--out",
            str(out),
            *common,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "longswap_train.json").read_text())
    assert record["world_size"] == 2 and record["config"]["steps"] == 3
    assert longswap.load(out).config.longswap["layers"][0] == "sliding_window(window=16, sinks=0)"
