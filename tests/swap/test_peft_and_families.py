"""PEFT-wrapped swaps, and families with their own attention features."""

import pytest
import torch

import longswap
from longswap.patterns import full, sliding_window

from .conftest import make_model

peft = pytest.importorskip("peft")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_peft_wrapped_swap_saves_and_loads_adapter_and_swap(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    make_model("llama").save_pretrained(base_dir)
    model = longswap.load(base_dir)
    longswap.swap_attention(model, sliding_window(8, sinks=1), max_length=128)
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8)
    )
    with torch.no_grad():  # LoRA starts as a no-op: make the adapter matter
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.randint(1, 97, (1, 30), generator=torch.Generator().manual_seed(0))
    expected = logits(wrapped.eval(), ids)
    longswap.save(wrapped, adapter_dir)
    assert (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "longswap.json").is_file()
    loaded = longswap.load(adapter_dir).eval()
    base = loaded.get_base_model()
    assert base.config._attn_implementation == "longswap"
    assert base.config.longswap["layers"][0] == "sliding_window(window=8, sinks=1)"
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)


def test_swap_and_restore_work_through_a_peft_wrapper():
    model = make_model("qwen2")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    report = longswap.swap_attention(wrapped, sliding_window(4))
    assert model.config._attn_implementation == "longswap" and report.model_type == "qwen2"
    longswap.restore(wrapped)
    assert model.config._attn_implementation != "longswap"


def test_native_sliding_window_is_kept():
    """Mistral's own window stays in force: swapping in full() changes nothing."""
    model = make_model("mistral", sliding_window=8)
    ids = torch.randint(1, 97, (1, 30), generator=torch.Generator().manual_seed(2))
    before = logits(model, ids)
    report = longswap.swap_attention(model, full())
    assert report.layers == ["sliding_window(window=8, sinks=0)"] * 2
    assert any("own sliding window of 8" in note for note in report.notes)
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=1e-5)
    report = longswap.swap_attention(model, "dilated(4, 3)")
    assert report.layers[0] == "dilated(window=4, dilation=3) & sliding_window(window=8, sinks=0)"
