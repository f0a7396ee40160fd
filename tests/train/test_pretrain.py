"""Pre-training the dense byte-level base on the Trainer (a short pinned run)."""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback

import longswap
from longswap.cli import main
from longswap.data import byte_tokenizer
from longswap.train import PretrainConfig, pretrain
from longswap.train.data import datasets
from longswap.train.pretrain import model_config, problems
from longswap.train.runner import train


def test_short_pretraining_lowers_the_loss_and_saves_a_checkpoint(corpus, tmp_path):
    out = tmp_path / "base"
    record = pretrain(
        PretrainConfig(
            out=str(out),
            data=[str(corpus)],
            seq_len=64,
            steps=40,
            batch_size=8,
            eval_steps=20,
            warmup_steps=5,
        )
    )
    assert record["final_loss"] < record["first_loss"] - 1.0  # from ~5.6 (uniform) downwards
    assert record["eval_bits_per_byte"] < 6.0
    assert 800_000 < record["parameters"] < 900_000
    saved = json.loads((out / "longswap_train.json").read_text())
    assert saved["config"]["seq_len"] == 64 and saved["eval_loss"] == record["eval_loss"]
    assert saved["train_seconds"] > 0 and saved["train_tokens_per_second"] > 0
    model = longswap.load(out).eval()
    assert model.config.use_cache  # training turns the cache off; the saved model decodes
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("def main():", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], 257)


def test_invalid_configuration_lists_every_problem(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    config = PretrainConfig(
        out=str(out), data=[str(tmp_path / "missing")], seq_len=2, size="huge", learning_rate=0
    )
    found = problems(config)
    assert len(found) == 5
    with pytest.raises(ValueError) as err:
        pretrain(config)
    message = str(err.value)
    for part in (
        "not empty",
        "does not exist",
        "seq_len must be",
        "size must be one of",
        "learning_rate must be a positive number",
    ):
        assert part in message
    assert (out / "keep.txt").read_text() == "mine"


def test_too_little_data_is_reported(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("short")
    with pytest.raises(ValueError, match="too few to fill a single sequence"):
        pretrain(
            PretrainConfig(out=str(tmp_path / "o"), data=[str(tmp_path / "d")], seq_len=64, steps=1)
        )


def test_cli_reads_yaml_and_flags_win(corpus, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: [{corpus}]\nseq_len: 32\nsteps: 4\nbatch_size: 4\neval_steps: 4\nwarmup_steps: 1\n"
    )
    out = tmp_path / "o"
    assert main(["pretrain", "--config", str(config), "--steps", "2", "--out", str(out)]) == 0
    saved = json.loads((out / "longswap_train.json").read_text())
    assert saved["config"]["steps"] == 2 and saved["config"]["seq_len"] == 32
    assert "bits per byte" in capsys.readouterr().out
    config.write_text("sequence_length: 3\n")
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "x")]) == 2
    assert "unknown fields ['sequence_length']" in capsys.readouterr().err


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = capsys.readouterr().out
    for flag in ("--seq-len", "--size", "--steps", "--data", "--resume", "--overwrite"):
        assert flag in text
    assert "embedded corpus" in text


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 5:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))

    config = PretrainConfig(
        out=str(tmp_path / "o"),
        data=[str(corpus)],
        seq_len=32,
        steps=12,
        batch_size=4,
        eval_steps=2,
        warmup_steps=1,
    )

    model = LlamaForCausalLM(model_config("tiny", 32, 257))
    train_set, val_set = datasets(config, byte_tokenizer())
    with pytest.raises(RuntimeError, match=r"at step (5|6).*Last good checkpoint: .*checkpoint-4"):
        train(
            model, train_set, val_set, config, tmp_path / "o", callbacks=[Poison()], logging_steps=1
        )
    kept = sorted(p.name for p in (tmp_path / "o" / "checkpoints").glob("checkpoint-*"))
    assert kept[-1] == "checkpoint-4"


def test_one_data_file_holds_out_whole_sequences_for_validation(tmp_path):
    (tmp_path / "d").mkdir()
    text = "".join(f"value_{i} = {i * i}\n" for i in range(80))  # one document
    (tmp_path / "d" / "only.py").write_text(text)
    config = PretrainConfig(out=str(tmp_path / "o"), data=[str(tmp_path / "d" / "only.py")])
    config.seq_len = 100
    n = (len(text) + 1) // 100  # bytes plus the end-of-document token
    with pytest.warns(UserWarning, match=f"validation uses the last 1 of the {n} packed"):
        train_set, val_set = datasets(config, byte_tokenizer())
    assert (len(train_set), len(val_set)) == (n - 1, 1)
    held_out = text.encode()[(n - 1) * 100 : n * 100]
    assert bytes(val_set[0]["input_ids"].tolist()) == held_out  # the last whole sequence
    assert (
        bytes(train_set[n - 2]["input_ids"].tolist())
        == text.encode()[(n - 2) * 100 : (n - 1) * 100]
    )
    config.seq_len = len(text)
    with pytest.raises(ValueError, match=f"fills only 1 sequence of {len(text)} tokens"):
        datasets(config, byte_tokenizer())
