"""Fine-tuning swapped models: trainable-parameter policies, saving, validation."""

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import Trainer

import longswap
from longswap.train import FinetuneConfig, PretrainConfig, budget, finetune, pretrain
from longswap.train.finetune import problems
from longswap.train.trainable import apply_method, embedding_and_norm_names, projection_names

from ..swap.conftest import make_model


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("ft")
    data = root / "data"
    shutil.copytree(corpus, data)
    pretrain(
        PretrainConfig(
            out=str(root / "base"),
            data=[str(data)],
            seq_len=32,
            steps=10,
            batch_size=8,
            eval_steps=10,
            warmup_steps=2,
        )
    )
    return root


WINDOW = "sliding_window(window=16)"
LEARNED = "learned_topk(block_size=16, top_k=2)"


def run(base, out, **kwargs):
    fields = dict(
        model=str(base / "base"),
        data=[str(base / "data")],
        seq_len=128,
        steps=6,
        batch_size=2,
        eval_steps=6,
        warmup_steps=1,
        learning_rate=1e-3,
        out=str(out),
    )
    fields.update(kwargs)
    return finetune(FinetuneConfig(**fields))


def test_lora_plus_trains_adapter_embeddings_and_norms(base, tmp_path):
    out = tmp_path / "lora"
    record = run(base, out, pattern="sliding_window(window=16)")
    assert "RoPE none to 128" in record["notes"][0]  # a 16-token window never needs scaling
    assert (out / "adapter_config.json").is_file() and (out / "longswap.json").is_file()
    assert (out / "checkpoints").is_dir()  # kept for --resume
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left
    model = longswap.load(out)
    inner = model.get_base_model()
    assert inner.config.longswap["layers"][0] == "sliding_window(window=16, sinks=0)"
    embed = 257 * 128
    assert record["trainable_parameters"] > embed  # LoRA + embeddings + norms
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 256, (1, 128))).logits).all()
    # Every command that takes a model takes this folder: eval reads the adapter on its base.
    from longswap.evaluate.run import EvalConfig, evaluate

    records = evaluate(
        EvalConfig(
            model=[str(out)], out=str(tmp_path / "eval"), tasks=["ppl"], lengths=[64], targets=64
        )
    )
    assert records[0]["model"] == str(out) and records[0]["perplexity"] > 1


def test_merge_writes_a_plain_swapped_checkpoint(base, tmp_path):
    out = tmp_path / "merged"
    run(base, out, pattern="block_topk(block_size=16, top_k=2)", merge=True)
    assert not (out / "adapter_config.json").exists()
    model = longswap.load(out)
    assert model.config.longswap["layers"][0] == "block_topk(block_size=16, top_k=2)"
    assert model.config.rope_parameters["rope_type"] == "yarn"  # top-k reaches everywhere


def test_attention_only_and_full(base, tmp_path):
    record = run(base, tmp_path / "attn", method="attention", pattern="sliding_window(8)")
    hidden, kv = 128, 64
    per_layer = hidden * hidden * 2 + hidden * kv * 2  # q, o and k, v
    assert record["trainable_parameters"] == 4 * per_layer
    record = run(base, tmp_path / "full", method="full")  # dense baseline, no swap
    assert record["trainable_parameters"] == record["parameters"]
    model = longswap.load(tmp_path / "full")
    assert model.config.max_position_embeddings == 128  # positions extended (YaRN)
    assert not hasattr(model.config, "longswap")


def test_max_length_extends_positions_beyond_the_training_length(base, tmp_path):
    """Trained at 32 tokens, used at 128: --max-length sets the positions up for 128 while the
    steps stay at --seq-len; validation scores --validation-sequences sequences."""
    record = run(
        base,
        tmp_path / "ext",
        method="full",
        pattern="block_topk(block_size=16, top_k=2)",  # reaches every distance: RoPE stretched
        seq_len=64,
        max_length=128,
        validation_sequences=3,
    )
    assert record["config"]["seq_len"] == 64 and record["config"]["max_length"] == 128
    model = longswap.load(tmp_path / "ext")
    assert model.config.longswap["positions"]["max_length"] == 128
    assert model.config.rope_parameters["rope_type"] == "yarn"
    for bad, says in (
        ({"max_length": 32}, "--max-length 32 is shorter than --seq-len 64"),
        ({"max_length": -1}, "max_length must be an integer >= 0"),
        ({"validation_sequences": -2}, "validation_sequences must be an integer >= 0"),
    ):
        config = FinetuneConfig(model=str(base / "base"), out=str(tmp_path / "x"), seq_len=64)
        for name, value in bad.items():
            setattr(config, name, value)
        assert any(says in problem for problem in problems(config)), bad


def test_lora_with_gradient_checkpointing_has_real_gradients():
    grads = []
    for checkpointing in (False, True):
        model = make_model("llama")
        if checkpointing:
            model.activation_checkpointing_enable()
            model.enable_input_require_grads()
        longswap.swap_attention(model, "sliding_window(window=4)", backend="blocks")
        assert projection_names(model) == ["k_proj", "o_proj", "q_proj", "v_proj"]
        assert "embed_tokens" in embedding_and_norm_names(model)
        wrapped = apply_method(model, "lora-plus")
        wrapped.train()
        ids = torch.randint(1, 97, (2, 16), generator=torch.Generator().manual_seed(0))
        wrapped(ids, labels=ids).loss.backward()
        # lora_B starts at zero, so it is lora_B that must receive gradient on the first step.
        grads.append([p.grad for n, p in wrapped.named_parameters() if "lora_B" in n])
    assert grads[1] and all(g is not None and g.abs().sum() > 0 for g in grads[1])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain)


def test_gpt2_lora_targets_conv1d():
    model = make_model("gpt2")
    assert projection_names(model) == ["c_attn", "c_proj"]
    wrapped = apply_method(model, "lora-plus")
    assert any("lora_A" in n for n, _ in wrapped.named_parameters())


def test_invalid_configurations_are_listed_together(base, tmp_path):
    config = FinetuneConfig(
        model=str(tmp_path / "nope"),
        data=[str(tmp_path / "missing")],
        seq_len=64,
        pattern="sliding_window(window=100)",
        method="lora",
        out=str(tmp_path / "o"),
    )
    found = "\n".join(problems(config))
    assert f"data path {tmp_path / 'missing'} does not exist" in found
    assert f"--model {tmp_path / 'nope'} does not exist" in found
    assert "method must be one of" in found and "reaches 99 tokens back" in found
    with pytest.raises(ValueError, match="pass --merge"):
        run(base, tmp_path / "dense-lora")  # dense, LoRA, beyond trained length, no merge
    assert not (tmp_path / "dense-lora").exists()


def test_rope_none_on_a_dense_model_needs_no_merge(base, tmp_path):
    """RoPE kept as trained changes no position: the LoRA adapter carries the whole run."""
    out = tmp_path / "dense-lora"
    run(base, out, rope="none", steps=1, eval_steps=1)
    model = longswap.load(out)
    assert model.get_base_model().config.rope_parameters["rope_type"] == "default"
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 256, (1, 128))).logits).all()


@pytest.mark.parametrize(
    "pattern", ["sliding_window(window=128)", "block_topk(block_size=16, top_k=8)"]
)
def test_a_pattern_that_skips_nothing_at_the_length_is_refused(base, tmp_path, pattern):
    with pytest.raises(ValueError, match=r"at 128 tokens \(--seq-len\).*: it skips nothing"):
        run(base, tmp_path / "out", pattern=pattern)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--learning-rate", "inf"], "learning_rate must be a positive number, got inf"),
        (["--weight-decay", "-0.1"], "weight_decay must be a number >= 0, got -0.1"),
        (["--warmup-steps", "-1"], "warmup_steps must be an integer >= 0, got -1"),
        (["--save-steps", "-1"], "save_steps must be an integer >= 0, got -1"),
        (["--save-steps", "2", "--no-checkpoints"], "drop one of the two"),
        (["--lora-alpha", "0"], "lora_alpha must be a positive integer, got 0"),
        (["--lora-alpha", "-8"], "lora_alpha must be a positive integer, got -8"),
        (["--method", "full", "--merge"], "--method full trains none: leave out --merge"),
        (["--method", "full", "--full-layers", "-1"], "this model is dense and no --pattern"),
        (["--seed", "-1"], "seed must be an integer in [0, 2**32), got -1"),
        (["--seed", str(2**32)], "seed must be an integer in [0, 2**32)"),
        (["--validation-sequences", "65"], "validation_sequences must be 0"),
    ],
)
def test_bad_training_flags_are_refused_before_any_work(base, tmp_path, capsys, flags, message):
    from longswap.cli import main

    out = tmp_path / "out"
    args = ["finetune", "--model", str(base / "base"), "--seq-len", "32", "--out", str(out)]
    assert main([*args, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_steps_0_is_one_error_about_steps(base, tmp_path, capsys):
    from longswap.cli import main

    out = tmp_path / "out"
    assert main(["finetune", "--model", str(base / "base"), "--out", str(out), "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "steps must be an integer >= 1, got 0" in err and "transfer_steps" not in err


def test_checkpoints_every_save_steps_apart_from_the_evaluations(base, tmp_path):
    from longswap.cli import main

    out = tmp_path / "out"
    flags = ["--model", str(base / "base"), "--data", str(base / "data"), "--seq-len", "32"]
    flags += ["--steps", "4", "--batch-size", "2", "--warmup-steps", "1", "--method", "full"]
    assert (
        main(["finetune", *flags, "--eval-steps", "4", "--save-steps", "2", "--out", str(out)]) == 0
    )
    saved = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert saved == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "eval_loss" in entry] == [4]
    quiet = tmp_path / "quiet"
    args = ["finetune", *flags, "--eval-steps", "2", "--no-checkpoints", "--out", str(quiet)]
    assert main(args) == 0
    assert not list(quiet.rglob("checkpoint-*")) and (quiet / "model.safetensors").is_file()


def test_cli_finetune(base, tmp_path, capsys):
    from longswap.cli import main

    out = tmp_path / "cli"
    code = main(
        [
            "finetune",
            "--model",
            str(base / "base"),
            "--data",
            str(base / "data"),
            "--seq-len",
            "64",
            "--pattern",
            "sliding_window(window=8, sinks=2)",
            "--full-layers",
            "-1",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--eval-steps",
            "2",
            "--method",
            "lora-plus",
            "--merge",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "layers 0-2" in printed and "layer 3" in printed and "trained" in printed
    assert longswap.load(out).config.longswap["layers"][-1] == "full()"
    assert main(["finetune", "--model", str(base / "base"), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_synthetic_mix_and_hybrid_schedule(base, tmp_path):
    from types import SimpleNamespace

    from longswap.train.finetune import DenseFirst

    plain = run(base, tmp_path / "plain", pattern="sliding_window(window=16)")
    mixed = run(
        base,
        tmp_path / "mixed",
        pattern="sliding_window(window=16)",
        synthetic_ratio=0.5,
        dense_fraction=0.5,
    )
    assert mixed["train_sequences"] == 2 * plain["train_sequences"]
    assert any("use full attention" in n for n in mixed["notes"])
    assert longswap.load(tmp_path / "mixed").get_base_model().config._attn_implementation == (
        "longswap"
    )
    model = make_model("llama")
    longswap.swap_attention(model, "sliding_window(window=4)")
    schedule = DenseFirst(model, switch=2)
    seen = []
    for step in range(4):
        schedule.on_step_begin(None, SimpleNamespace(global_step=step), None)
        seen.append(model.config._attn_implementation)
    schedule.on_train_end(None, None, None)
    assert seen == ["sdpa", "sdpa", "longswap", "longswap"]
    assert model.config._attn_implementation == "longswap"


def test_hybrid_schedule_with_joint_selectors_and_on_a_swapped_model(base, tmp_path):
    union = "sliding_window(window=16, sinks=2) | learned_topk(block_size=16, top_k=2)"
    record = run(base, tmp_path / "joint", pattern=union, method="full", dense_fraction=0.5)
    assert any("steps 0-2 use full attention" in n for n in record["notes"])
    # A swapped model carries its pattern: the schedule needs no --pattern.
    swapped = str(tmp_path / "joint")
    again = run(base, tmp_path / "again", model=swapped, method="full", dense_fraction=0.5)
    assert again["final_loss"] is not None


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(dense_fraction=0.5, transfer_steps=1, pattern=WINDOW), "pass one of the two"),
        (dict(dense_fraction=0.5, method="selector", pattern=LEARNED), "warm-up"),
        (dict(transfer_steps=1, method="selector", pattern=LEARNED), "warm-up"),
        (dict(transfer_steps=1, method="full"), "this model is dense: pass --pattern"),
        (dict(dense_fraction=0.5, method="full"), "this model is dense: pass --pattern"),
    ],
)
def test_schedules_that_cannot_run_are_refused_before_any_work(base, tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        run(base, tmp_path / "out", **settings)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "pattern",
    [
        "sliding_window(window=4, sinks=1)",
        "dilated(3, 2)",
        "local_global(window=4, global_tokens=[0])",
        "bigbird(block_size=4, window_blocks=1, global_blocks=1, random_blocks=1)",
        "shifted_groups(group_size=8)",
        "block_topk(block_size=4, top_k=1)",
    ],
)
def test_attention_transfer_teaches_sparse_layers_dense_outputs(pattern):
    from longswap.swap import observe
    from longswap.train.signals import AttentionTransfer

    model = make_model("llama")
    longswap.swap_attention(model, pattern, backend="blocks")
    model.requires_grad_(False)
    trainable = [p for n, p in model.named_parameters() if "q_proj" in n or "k_proj" in n]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(trainable, lr=3e-3)
    ids = torch.randint(1, 97, (2, 32), generator=torch.Generator().manual_seed(0))
    history = []
    for _ in range(30):
        transfer = AttentionTransfer()
        with observe(model, transfer):
            model(ids)
        assert len(transfer.pairs) == model.config.num_hidden_layers
        assert not hasattr(model.model.layers[0].self_attn, "longswap_observer")  # removed
        loss = transfer.loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(loss.item())
    assert min(history[-10:]) < 0.97 * history[0]  # the sparse layers move towards dense


def test_finetune_with_a_transfer_warm_up(base, tmp_path):
    record = run(
        base, tmp_path / "transfer", pattern="sliding_window(window=16)", transfer_steps=3, steps=6
    )
    assert any("attention transfer" in n for n in record["notes"])
    assert record["final_loss"] is not None
    with pytest.raises(ValueError, match="must be fewer than steps"):
        run(base, tmp_path / "bad", pattern="sliding_window(window=16)", transfer_steps=6)


def test_separate_documents_feeds_restarting_positions(base, tmp_path):
    from longswap.data import byte_tokenizer
    from longswap.train.data import datasets

    config = FinetuneConfig(
        data=[str(base / "data")], seq_len=512, separate_documents=True, out=str(tmp_path / "o")
    )
    train_set, _ = datasets(config, byte_tokenizer())
    item = train_set[0]
    assert set(item) == {"input_ids", "labels", "position_ids"}
    positions = train_set.position_ids
    assert positions.shape == train_set.input_ids.shape and bool((positions[:, 0] == 0).all())
    steps = positions[:, 1:] - positions[:, :-1]
    assert bool(((steps == 1) | (positions[:, 1:] == 0)).all())  # +1, or a new document
    record = run(
        base, tmp_path / "sep", pattern="sliding_window(window=16)", separate_documents=True
    )
    assert record["final_loss"] is not None


def test_overwrite_keeps_the_old_out_until_the_new_one_is_complete(base, tmp_path):
    out = tmp_path / "out"
    run(base, out, method="full", steps=2, eval_steps=2)
    before = (out / "model.safetensors").read_bytes()
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "a.txt").write_text("too short for one sequence")
    with pytest.raises(ValueError, match="too few"):
        run(base, out, method="full", data=[str(tiny)], overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before  # a failed run deletes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny"]  # no staging left
    run(base, out, method="full", overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny"]


def test_overwrite_refuses_a_folder_longswap_did_not_write(base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files that longswap did not write"):
        run(base, out, method="full", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_an_interrupted_overwrite_run_keeps_its_checkpoints_for_resume(
    base, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    run(base, out, method="full", steps=6, eval_steps=6)  # the earlier run: checkpoint-6
    before = (out / "model.safetensors").read_bytes()
    save = Trainer._save_checkpoint

    def then_interrupt(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise KeyboardInterrupt  # Ctrl-C (or out of memory) right after a checkpoint

    monkeypatch.setattr(Trainer, "_save_checkpoint", then_interrupt)
    settings = dict(method="full", steps=4, eval_steps=2)
    with pytest.raises(KeyboardInterrupt):
        run(base, out, overwrite=True, **settings)
    monkeypatch.undo()
    said = capsys.readouterr().err.split("checkpoints are kept in ")[-1].split(":")[0]
    assert (Path(said) / "checkpoint-2").is_dir()  # where the last message says
    assert (out / "model.safetensors").read_bytes() == before  # the old out untouched
    with pytest.raises(ValueError, match="unfinished run .* pass --resume to continue it"):
        run(base, out, overwrite=True, **settings)  # the same command: nothing discarded
    run(base, out, resume=True, **settings)
    assert "continuing the run in" in capsys.readouterr().err
    kept = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-2", "checkpoint-4"]  # this run's, not the earlier one's
    assert json.loads((out / "longswap_train.json").read_text())["config"]["steps"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("target", ["model", "data", "inside-model", "around-data"])
def test_out_overlapping_an_input_is_refused_before_anything_is_touched(base, target):
    model, data = base / "base", base / "data"
    out = {
        "model": model,
        "data": data,
        "inside-model": model / "finetuned",
        "around-data": base,
    }[target]
    before = {p: p.stat().st_mtime_ns for p in [*model.iterdir(), *data.iterdir()]}
    with pytest.raises(ValueError, match="--out .* (is the same path as|contains|lies inside)"):
        run(base, out, overwrite=True)
    assert {p: p.stat().st_mtime_ns for p in [*model.iterdir(), *data.iterdir()]} == before
    assert not (model / "finetuned").exists()


def test_an_out_that_cannot_be_written_is_refused_first(base, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="cannot be created: .*a-file is a file"):
        run(base, blocker / "out")


def _full_disk(monkeypatch, owner, name, after_calls=0):
    """Make ``owner.name`` write a stub file and fail as a full disk does, from the call
    after ``after_calls`` good ones on."""
    original, calls = getattr(owner, name), []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) <= after_calls:
            return original(self, *args, **kwargs)
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_bytes(b"\x00" * 10)  # cut short
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(owner, name, failing)


def test_a_full_disk_during_training_leaves_no_half_checkpoint(base, tmp_path, monkeypatch):
    _full_disk(monkeypatch, Trainer, "_save_checkpoint", after_calls=1)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="disk holding .* is full") as caught:
        run(base, out, method="full", steps=4, eval_steps=2)
    assert "checkpoint-2" in str(caught.value) and "--resume" in str(caught.value)
    kept = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-2"]  # the half-written checkpoint-4 is gone
    assert not (out / "config.json").exists()


def test_a_full_disk_while_saving_the_model_keeps_the_old_out(base, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(base, out, method="full", steps=2, eval_steps=2)
    before = sorted(p.name for p in out.iterdir())

    def no_space(model, folder):  # the final save, after training
        (Path(folder) / "model.safetensors").write_bytes(b"\x00" * 10)
        raise RuntimeError("[enforce fail at inline_container.cc] file write failed")

    monkeypatch.setattr("longswap.io.save_weights", no_space)
    with pytest.raises(ValueError, match="disk holding .* is full .* kept in .* --resume"):
        run(base, out, method="full", steps=2, eval_steps=2, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == before
    run(base, out, method="full", steps=2, eval_steps=2, resume=True)  # the saving only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_every_run_states_its_budget_and_a_step_too_large_is_refused(
    base, tmp_path, monkeypatch, capsys
):
    record = run(base, tmp_path / "ok", method="full", steps=2, eval_steps=2)
    line = capsys.readouterr().out
    assert "budget: about" in line and "for a step of 2 x 128 tokens" in line
    assert record["budget"]["probes"][1][0] == 128  # probed at the run's own length
    assert record["budget"]["peak_gb"] > 0 and record["budget"]["step_seconds"] > 0
    monkeypatch.setattr(budget, "available_gb", lambda device: 1e-6)
    out = tmp_path / "too-big"
    with pytest.raises(ValueError, match="needs about .* GB, but 0.0 GB are available"):
        run(base, out, method="full", steps=2, eval_steps=2)
    assert not (out / "config.json").exists() and not list((out / "checkpoints").glob("check*"))
    settings = dict(method="full", steps=2, eval_steps=2)
    with pytest.warns(UserWarning, match="--skip-budget-check: a step's memory was not"):
        record = run(base, tmp_path / "unchecked", **settings, skip_budget_check=True)
    assert record["budget"] is None and (tmp_path / "unchecked" / "config.json").is_file()


def test_the_budget_extrapolates_memory_linearly_and_time_with_the_length():
    estimate = budget.Budget(
        tokens=4096,
        batch_size=8,
        steps=100,
        fixed_gb=1.0,
        per_sequence_gb=2.0,
        available_gb=12.0,
        step_seconds=10.0,
        probes=((512, 0.1, 300.0), (1024, 0.25, 500.0)),
    )
    assert estimate.peak_gb == 17.0 and estimate.fitting_batch() == 5
    assert "--batch-size 5 fits" in estimate.problem()
    assert "17 min for 100 steps" in estimate.summary()


def test_only_the_main_process_checks_the_state_of_out(base, tmp_path, monkeypatch):
    """The main process of a launch starts writing --out while the others may still be
    checking their fields: they leave --out's state to it (a race, seen in CI)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    config = FinetuneConfig(model=str(base / "base"), seq_len=32, out=str(out))
    assert any("is not empty" in p for p in problems(config))
    monkeypatch.setenv("RANK", "1")
    assert not any("is not empty" in p for p in problems(config))
    inside = FinetuneConfig(model=str(base / "base"), seq_len=32, out=str(base / "base" / "x"))
    assert any("--model" in p for p in problems(inside))  # overlaps: every process
