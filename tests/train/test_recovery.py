"""The recovery objective: a swapped model learns from its dense parent (KL of next-token
distributions mixed with the LM loss), in chunks of positions."""

import math

import pytest
import torch
import torch.nn.functional as F

import longswap
from longswap.train.recovery import DenseParent, causal_lm, recovery_loss
from longswap.train.trainable import apply_method

from ..swap.conftest import make_model
from .test_finetune import base, run  # noqa: F401  (the module-scoped pre-trained base)

SPARSE = "sliding_window(window=8, sinks=2) | block_topk(block_size=8, top_k=1)"


def _inputs(length=60, seed=2):
    ids = torch.randint(1, 97, (2, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def _swapped(pattern, method, seed=0):
    model = make_model("llama", seed=seed, max_position_embeddings=128).train()
    longswap.swap_attention(model, pattern, backend="blocks")
    return apply_method(model, method)


@pytest.mark.parametrize("method", ["lora-plus", "full"])
def test_the_kl_is_zero_when_the_swap_changes_nothing(method):
    model = _swapped("full()", method)
    parent = DenseParent(model)
    assert parent.adapters == (method == "lora-plus")
    same = float(recovery_loss(model, parent, _inputs(), weight=1.0))
    sparse = _swapped(SPARSE, method)
    swapped = float(recovery_loss(sparse, DenseParent(sparse), _inputs(), weight=1.0))
    assert abs(same) < 1e-7 and swapped > 1000 * abs(same) + 1e-6


def test_the_lm_term_is_the_models_own_loss():
    model = _swapped(SPARSE, "full")
    inputs = _inputs()
    inputs["labels"][:, :5] = -100  # not predicted: left out of the mean
    loss = recovery_loss(model, DenseParent(model), inputs, weight=0.0)
    logits = model(inputs["input_ids"]).logits
    expected = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), inputs["labels"][:, 1:].flatten(), ignore_index=-100
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["lora-plus", "full"])
def test_without_a_parent_it_is_the_lm_loss_and_the_trainer_takes_it_in_chunks(method, tmp_path):
    """Plain fine-tuning's loss: the model's own LM loss and gradients, computed without the
    whole sequence's logits (the head sees the predicting positions only, a chunk at a time);
    the Trainer's training step takes it so, and evaluation keeps the model's loss."""
    from transformers import TrainingArguments

    from longswap.train.runner import SignalTrainer

    model = _swapped(SPARSE, method)
    inputs = _inputs()
    inputs["labels"][:, :5] = -100
    loss = recovery_loss(model, None, inputs, weight=0.0, chunk=16)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    expected = model(**inputs).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-6
        )
    with pytest.raises(ValueError, match="needs the dense parent"):
        recovery_loss(model, None, inputs, weight=0.5)
    shapes = []
    head = causal_lm(model).get_output_embeddings()
    head.register_forward_hook(lambda module, args, out: shapes.append(out.shape[1]))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = SignalTrainer(model=model, args=args, chunked=True)
    torch.testing.assert_close(trainer.compute_loss(model.train(), inputs), expected)
    assert shapes == [59]  # the 59 predicting positions of 60, not the whole sequence
    assert trainer.loss_is_scaled_for_ga is False
    shapes.clear()
    trainer.compute_loss(model.eval(), inputs)
    assert shapes == [60]  # evaluation: the model's own loss


@pytest.mark.parametrize("method", ["lora-plus", "full", "attention"])
def test_chunks_give_the_whole_sequences_loss_and_gradients(method):
    model = _swapped(SPARSE, method)
    parent = DenseParent(model)
    results = []
    for chunk in (7, 10_000):
        model.zero_grad()
        loss = recovery_loss(model, parent, _inputs(), weight=0.5, chunk=chunk)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (few, few_grads), (one, one_grads) = results
    torch.testing.assert_close(few, one, rtol=1e-5, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert few_grads.keys() == one_grads.keys() == trainable  # gradients reach only those
    for name, grad in few_grads.items():
        torch.testing.assert_close(grad, one_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    if parent.frozen is not None:
        assert not any(p.requires_grad or p.grad is not None for p in parent.frozen.parameters())


def test_the_parent_stays_the_model_before_training():
    """A full fine-tune's parent is a frozen copy: a step on the model leaves it as it was."""
    model = _swapped(SPARSE, "full")
    parent = DenseParent(model)
    before = recovery_loss(model, parent, _inputs(), weight=1.0)
    before.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    with parent.active(model) as lm:
        assert not any(p.requires_grad for p in lm.parameters())
        dense = lm(_inputs()["input_ids"]).logits
    fresh = make_model("llama", max_position_embeddings=128)
    with torch.no_grad():
        torch.testing.assert_close(dense, fresh(_inputs()["input_ids"]).logits)


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("lora-plus", {}),
        ("full", {"learning_rate": 1e-4}),
        ("attention", {}),
        ("lora-plus", {"gradient_checkpointing": True}),
        ("lora-plus", {"pattern": "sliding_window(window=16) | learned_topk(8, 2)"}),
    ],
)
def test_finetune_learns_from_the_dense_parent(base, tmp_path, method, extra):  # noqa: F811
    fields = {"pattern": "sliding_window(window=16, sinks=2)", "steps": 2, "eval_steps": 2}
    record = run(base, tmp_path / "out", method=method, kl_weight=0.5, **(fields | extra))
    assert any("KL from the dense parent" in note for note in record["notes"])
    assert math.isfinite(record["final_loss"]) and math.isfinite(record["eval_loss"])
    assert record["config"]["kl_weight"] == 0.5


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kl-weight", "1.5"], "kl_weight must be a number in [0, 1]"),
        (["--kl-weight", "nan"], "kl_weight must be a number in [0, 1]"),
        (["--kl-weight", "0.5", "--method", "selector"], "--kl-weight with --method selector"),
        (["--kl-weight", "0.5", "--deepspeed", "zero3"], "--kl-weight runs on one process"),
        (["--kl-weight", "0.5", "--sequence-parallel", "2"], "--kl-weight runs on one process"),
    ],
)
def test_kl_weight_refusals_come_before_any_work(base, tmp_path, capsys, flags, message):  # noqa: F811
    from longswap.cli import main

    out = tmp_path / "out"
    args = ["finetune", "--model", str(base / "base"), "--seq-len", "32", "--out", str(out)]
    assert main([*args, "--pattern", "learned_topk(8, 1)", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
