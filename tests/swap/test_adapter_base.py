"""A LoRA output finds the base it was trained on: by absolute path and fingerprint,
from any folder; a moved base through ``base=`` / ``--base``; another model refused."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

import longswap
from longswap.cli import main
from longswap.demo import EMBEDDED_MODEL
from longswap.swap import swap_attention

WINDOW = "sliding_window(window=32, sinks=4)"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """``project/base`` and ``project/lora``, a LoRA output of it saved with the paths typed
    relative to ``project`` (as ``longswap finetune --model base --out lora`` run there
    records them); the test then runs in ``elsewhere/``."""
    root = tmp_path / "project"
    shutil.copytree(EMBEDDED_MODEL, root / "base")
    monkeypatch.chdir(root)
    base = longswap.load(Path("base"))
    swap_attention(base, WINDOW)
    torch.manual_seed(0)
    wrapped = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # LoRA starts as a no-op: make the adapter matter
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    longswap.save(wrapped, Path("lora"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "base" / name, root / "lora" / name)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return root


def another_model(folder):
    """Another model of the same architecture in ``folder``."""
    model = longswap.load(EMBEDDED_MODEL)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    model.save_pretrained(folder)
    return folder


def embeddings(model):
    return model.get_base_model().get_input_embeddings().weight


def original_embeddings():
    return longswap.load(EMBEDDED_MODEL).get_input_embeddings().weight


def test_an_output_loads_its_own_base_from_another_folder_with_a_base_of_its_own(project):
    another_model(Path("base"))  # ./base here is another model
    loaded = longswap.load(project / "lora")
    assert torch.equal(embeddings(loaded), original_embeddings())
    record = json.loads((project / "lora" / "longswap.json").read_text())
    assert record["base_model"] == str(project / "base")


def test_a_base_replaced_by_another_model_is_refused(project):
    shutil.rmtree(project / "base")
    another_model(project / "base")
    with pytest.raises(ValueError, match="is another model") as refused:
        longswap.load(project / "lora")
    assert str(project / "base") in str(refused.value) and "--base PATH" in str(refused.value)
    shutil.copy(EMBEDDED_MODEL / "config.json", project / "base")  # only the weights differ
    with pytest.raises(ValueError, match="fingerprint of its weights"):
        longswap.load(project / "lora")


def test_a_moved_base_is_refused_then_found_through_base(project):
    moved = project / "models" / "base"
    moved.parent.mkdir()
    (project / "base").rename(moved)
    with pytest.raises(ValueError, match="does not exist") as refused:
        longswap.load(project / "lora")
    assert str(project / "base") in str(refused.value) and "--base PATH" in str(refused.value)
    loaded = longswap.load(project / "lora", base=moved)
    assert torch.equal(embeddings(loaded), original_embeddings())
    with pytest.raises(ValueError, match=f"{another_model(Path('other'))} is another model"):
        longswap.load(project / "lora", base="other")
    with pytest.raises(ValueError, match="is no LoRA output"):
        longswap.load(moved, base=moved)


def test_an_output_without_fingerprint_finds_its_base_where_it_was_written(project):
    """Written before the fingerprint: the recorded path, as typed to `longswap finetune`,
    is relative to the folder that command ran in (its record's --out tells which)."""
    record = project / "lora" / "longswap.json"
    swap = json.loads(record.read_text())["swap"]
    record.write_text(json.dumps({"swap": swap, "base_model": "base"}))
    another_model(Path("base"))
    train_record = project / "lora" / "longswap_train.json"
    train_record.write_text(json.dumps({"config": {"model": "base", "out": "lora"}}))
    assert torch.equal(embeddings(longswap.load(project / "lora")), original_embeddings())
    train_record.unlink()  # no record of where it ran: the current folder, as before
    assert not torch.equal(embeddings(longswap.load(project / "lora")), original_embeddings())


def test_merge_generate_and_eval_refuse_another_base_and_take_base(project, capsys):
    expected = longswap.load(project / "lora").merge_and_unload().state_dict()
    moved = project.parent / "moved-base"
    (project / "base").rename(moved)
    another_model(Path("base"))
    assert main(["merge", "--model", str(project / "lora"), "--out", "merged"]) == 2
    assert "does not exist" in capsys.readouterr().err and not Path("merged").exists()
    flags = ["--model", str(project / "lora"), "--base", str(moved)]
    assert main(["merge", *flags, "--out", "merged"]) == 0
    merged = longswap.load(Path("merged")).state_dict()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    prompt = Path("prompt.txt")
    prompt.write_text("def main():\n")
    assert main(["generate", *flags, "--prompt-file", str(prompt), "--max-new-tokens", "2"]) == 0
    wrong = ["--model", str(project / "lora"), "--base", "base", "--prompt-file", str(prompt)]
    assert main(["generate", *wrong]) == 2
    assert "is another model" in capsys.readouterr().err
    evaluated = ["eval", "--model", str(project / "lora"), "--out", "results", "--base", "base"]
    assert main(evaluated) == 2
    assert "is another model" in capsys.readouterr().err and not Path("results").exists()
    assert main(["eval", "--model", str(EMBEDDED_MODEL), "--out", "results", "--base", "base"]) == 2
    assert "--base" in capsys.readouterr().err and not Path("results").exists()
