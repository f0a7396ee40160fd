"""Swapping attention into Hugging Face models: identity, oracle, restore, persistence."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import longswap
from longswap.patterns import block_topk, full, shifted_groups, sliding_window

from .conftest import FAMILIES, make_model, swapped_layers


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_full_swap_leaves_logits_unchanged(family, tokens):
    model = make_model(family)
    before = logits(model, tokens)
    report = longswap.swap_attention(model, full())
    assert model.config._attn_implementation == "longswap"
    assert report.layers == swapped_layers(model, "full()")
    torch.testing.assert_close(logits(model, tokens), before, atol=1e-5, rtol=1e-5)
    longswap.restore(model)
    torch.testing.assert_close(logits(model, tokens), before, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "pattern", [sliding_window(8, sinks=2), block_topk(8, 2), shifted_groups(8)], ids=str
)
def test_swapped_model_equals_dense_mask_oracle(family, pattern, tokens):
    model = make_model(family)
    dense = logits(model, tokens)
    longswap.swap_attention(model, pattern, backend="reference", block_size=16)
    oracle = logits(model, tokens)
    longswap.swap_attention(model, pattern, backend="blocks", block_size=16)
    torch.testing.assert_close(logits(model, tokens), oracle, atol=1e-5, rtol=1e-5)
    # The pattern really restricts attention: later positions differ from dense attention.
    assert not torch.allclose(oracle[:, 20:], dense[:, 20:], atol=1e-4)


def test_only_this_instance_is_swapped(tokens):
    a, b = make_model("llama"), make_model("llama")
    before = logits(b, tokens)
    longswap.swap_attention(a, sliding_window(4))
    assert b.config._attn_implementation != "longswap"
    torch.testing.assert_close(logits(b, tokens), before, atol=0, rtol=0)


def test_per_layer_patterns_and_dense_layers(tokens):
    model = make_model("llama", num_hidden_layers=3)
    report = longswap.swap_attention(model, {0: "sliding_window(window=4)", 2: "dilated(2, 2)"})
    assert report.layers == [
        "sliding_window(window=4, sinks=0)",
        "full()",
        "dilated(window=2, dilation=2)",
    ]
    report = longswap.swap_attention(model, sliding_window(4), full_layers=[-1])
    assert report.layers[-1] == "full()" and report.layers[0].startswith("sliding_window")
    report = longswap.swap_attention(model, [full(), sliding_window(2), full()])
    assert report.layers[1] == "sliding_window(window=2, sinks=0)"
    assert "layers 0-0" not in str(report) and "layer 1" in str(report)


def test_swapping_again_replaces_and_restore_returns_the_original(tokens):
    model = make_model("qwen2")
    before = logits(model, tokens)
    longswap.swap_attention(model, sliding_window(4), max_length=256, rope="linear")
    first = logits(model, tokens)
    longswap.swap_attention(model, block_topk(8, 1))
    assert model.config.longswap["layers"][0] == "block_topk(block_size=8, top_k=1)"
    assert model.config.rope_parameters["rope_type"] == "default"
    assert not torch.allclose(logits(model, tokens), first)
    longswap.restore(model)
    torch.testing.assert_close(logits(model, tokens), before, atol=0, rtol=0)
    assert not hasattr(model.config, "longswap")


@pytest.mark.parametrize(("family", "max_length"), [("llama", 128), ("gpt2", 128), ("phi3", None)])
def test_save_and_load_round_trip(family, max_length, tokens, tmp_path):
    model = make_model(family)
    longswap.swap_attention(model, sliding_window(6, sinks=1), max_length=max_length)
    expected = logits(model, tokens)
    model.save_pretrained(tmp_path)
    loaded = longswap.load(tmp_path).eval()
    assert loaded.config._attn_implementation == "longswap"
    torch.testing.assert_close(logits(loaded, tokens), expected, atol=1e-6, rtol=1e-6)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(auto, tokens), expected, atol=1e-6, rtol=1e-6)
    longswap.restore(loaded)
    assert loaded.config._attn_implementation != "longswap"


def test_load_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="neither config.json nor adapter_config.json"):
        longswap.load(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad-config", "no-weights"])
def test_damaged_checkpoints_get_one_clear_error(tmp_path, damage):
    folder = tmp_path / "model"
    make_model("llama").save_pretrained(folder)
    weights = folder / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "garbage":
        weights.write_bytes(b"\x00garbage" * 100)
    elif damage == "bad-config":
        (folder / "config.json").write_text("{not json")
    else:
        weights.unlink()
    with pytest.raises(ValueError, match="could not be loaded .*damaged or incomplete"):
        longswap.load(folder)


def test_a_damaged_selector_file_is_named(tmp_path):
    model = make_model("llama")
    longswap.swap_attention(model, "learned_topk(block_size=8, top_k=2)")
    longswap.save(model, tmp_path / "model")
    selectors = tmp_path / "model" / "longswap_selectors.safetensors"
    selectors.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match=f"{selectors} could not be read"):
        longswap.load(tmp_path / "model")


def test_a_bad_pattern_in_config_json_names_the_file(tmp_path):
    import json

    model = make_model("llama")
    longswap.swap_attention(model, "sliding_window(window=8)")
    longswap.save(model, tmp_path / "model")
    config = tmp_path / "model" / "config.json"
    record = json.loads(config.read_text())
    record["longswap"]["layers"][0] = "slidingwindow(8)"
    config.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=f"{config} records a swap .*unknown pattern"):
        longswap.load(tmp_path / "model")


def test_a_damaged_adapter_config_names_the_file(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json could not be read as JSON"):
        longswap.load(folder)


def test_save_to_an_unwritable_place_names_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for out in (blocker / "model", "/proc/longswap-model"):
        with pytest.raises(ValueError, match=f"--out {out} cannot be "):
            longswap.save(make_model("llama"), out)


def test_a_folder_named_like_a_gguf_file_is_a_model_folder(tmp_path):
    folder = tmp_path / "model.gguf"
    make_model("llama").save_pretrained(folder)
    assert longswap.load(folder).config.model_type == "llama"


def test_observe_hands_each_swapped_call_to_the_observer_and_cleans_up(tokens):
    model = make_model("llama")
    with pytest.raises(ValueError, match="not swapped"):
        longswap.swap.observe(model, lambda call: None)
    longswap.swap_attention(model, "sliding_window(window=8)")
    calls = []
    with longswap.swap.observe(model, calls.append):
        with (
            pytest.raises(RuntimeError, match="already observed"),
            longswap.swap.observe(model, calls.append),
        ):
            pass
        logits = model(tokens).logits
    assert [c.layer for c in calls] == [0, 1]
    assert calls[0].query.shape == (2, 4, 40, 8) and calls[0].key.shape == (2, 2, 40, 8)
    assert str(calls[0].pattern) == "sliding_window(window=8, sinks=0)"
    model(tokens)  # observed no more
    assert len(calls) == 2 and torch.isfinite(logits).all()
