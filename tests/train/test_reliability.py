"""Resuming gives the same run."""

import pytest
import torch
from transformers import LlamaForCausalLM, TrainerCallback

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
