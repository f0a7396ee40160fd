"""Position extension, and bad inputs that must fail before anything changes."""

import pytest
import torch
from torch import nn

import longswap
from longswap.patterns import full, shifted_groups, sliding_window

from .conftest import make_model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_rope_auto_keeps_positions_for_a_short_reach():
    model = make_model("llama")
    report = longswap.swap_attention(model, sliding_window(16), max_length=512)
    assert report.positions["kind"] == "none"
    assert "reaches at most 15" in str(report)
    assert model.config.rope_parameters["rope_type"] == "default"


@pytest.mark.parametrize("rope", ["auto", "linear", "ntk", "yarn"])
def test_rope_scaling_is_written_to_the_config_and_undone(rope):
    model = make_model("llama")
    ids = torch.randint(1, 97, (1, 30), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    report = longswap.swap_attention(model, full(), max_length=256, rope=rope)
    expected = "yarn" if rope == "auto" else rope
    assert report.positions["kind"] == expected
    if rope != "ntk":
        assert model.config.rope_parameters["rope_type"] == expected
        assert model.config.rope_parameters["factor"] == 4.0
    assert not torch.equal(model.model.rotary_emb.inv_freq, inv_freq)
    assert model.config.max_position_embeddings == 256
    longswap.restore(model)
    assert torch.equal(model.model.rotary_emb.inv_freq, inv_freq)
    torch.testing.assert_close(logits(model, ids), before, atol=0, rtol=0)


def test_rope_scaling_the_model_refuses_fails_before_any_change():
    model = make_model("phi3")
    with pytest.raises(ValueError, match="phi3 does not accept RoPE scaling 'yarn'"):
        longswap.swap_attention(model, full(), max_length=256)
    assert untouched(model)


def test_learned_positions_are_tiled_and_undone():
    model = make_model("gpt2")
    ids = torch.randint(1, 97, (1, 30), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    trained = model.transformer.wpe.weight.detach().clone()
    report = longswap.swap_attention(model, sliding_window(16), max_length=150)
    wpe = model.transformer.wpe.weight
    assert wpe.shape[0] == 150 and model.config.n_positions == 150
    assert torch.equal(wpe[:64], trained) and torch.equal(wpe[64:128], trained)
    assert report.added_parameters == (150 - 64) * 32
    long_ids = torch.randint(1, 97, (1, 150), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(logits(model, long_ids)).all()
    longswap.restore(model)
    assert model.transformer.wpe.weight.shape[0] == 64
    torch.testing.assert_close(logits(model, ids), before, atol=0, rtol=0)


def test_attention_dropout_is_turned_off_and_restored():
    model = make_model("gpt2")
    assert model.config.attn_pdrop == 0.1
    report = longswap.swap_attention(model, sliding_window(8))
    assert model.config.attn_pdrop == 0.0
    assert any("dropout" in n for n in report.notes)
    model.train()
    model(torch.ones(1, 10, dtype=torch.long)).logits.sum().backward()  # trains without error
    longswap.restore(model)
    assert model.config.attn_pdrop == 0.1
    assert model.transformer.h[0].attn.attn_dropout.p == 0.1


def untouched(model):
    return model.config._attn_implementation != "longswap" and not hasattr(model.config, "longswap")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pattern": "slidingwindow(4)"}, "unknown pattern 'slidingwindow'"),
        ({"pattern": {5: "full()"}}, "layer index 5 is out of range for a model with 2 layers"),
        ({"pattern": full(), "full_layers": [2]}, "layer index 2 is out of range"),
        ({"pattern": full(), "max_length": 0}, "max_length must be a positive integer, got 0"),
        ({"pattern": full(), "max_length": 12.5}, "max_length must be a positive integer"),
        (
            {"pattern": full(), "max_length": 10**12},
            "max_length 1,000,000,000,000 is beyond 16,777,216 \\(2\\*\\*24\\) tokens",
        ),
        ({"pattern": [full()]}, "needs one per layer: 2, got 1"),
        ({"pattern": full(), "backend": "fast"}, "unknown backend 'fast'"),
        ({"pattern": full(), "rope": "magic"}, "unknown rope 'magic'"),
        (
            {"pattern": sliding_window(4), "layers": [0], "full_layers": [0]},
            "leave every layer dense: nothing would be swapped",
        ),
        ({"pattern": sliding_window(4), "layers": []}, "leave every layer dense"),
    ],
)
def test_bad_arguments_change_nothing(kwargs, message):
    model = make_model("llama")
    with pytest.raises(ValueError, match=message):
        longswap.swap_attention(model, **kwargs)
    assert untouched(model)


def test_per_head_pattern_must_fit_the_head_count():
    model = make_model("llama", num_attention_heads=1, num_key_value_heads=1, head_dim=8)
    with pytest.raises(ValueError, match=r"layer 0: .*num_heads must be an integer >= 2, got 1"):
        longswap.swap_attention(model, shifted_groups(8))
    assert untouched(model)


def test_not_a_causal_lm():
    with pytest.raises(ValueError, match="expected a Hugging Face causal LM"):
        longswap.swap_attention(nn.Linear(2, 2), full())
    from transformers import BertConfig, BertModel

    bert = BertModel(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=50,
        )
    )
    with pytest.raises(ValueError, match="BertModel is not a causal language model"):
        longswap.swap_attention(bert, full())


def test_restore_needs_a_swap():
    with pytest.raises(ValueError, match="is not swapped"):
        longswap.restore(make_model("llama"))


def test_a_window_within_the_trained_length_serves_max_length_without_warnings():
    model = make_model("llama")
    longswap.swap_attention(model, "sliding_window(window=16)", max_length=256)
    assert model.config.max_position_embeddings == 256  # RoPE kept, the limit moved
    assert model.config.longswap["positions"]["kind"] == "none"
    longswap.restore(model)
    assert model.config.max_position_embeddings == 64


def test_a_failed_re_swap_leaves_the_swap_and_its_selectors_as_they_were():
    model = make_model("gpt2")
    longswap.swap_attention(model, "learned_topk(block_size=8, top_k=2)", max_length=150)
    record = dict(model.config.longswap)
    gate = model.transformer.h[0].attn.longswap_selector
    with torch.no_grad():
        for p in gate.parameters():
            p.fill_(0.5)  # stands for trained selector weights
    with pytest.raises(ValueError, match="rope='linear' does not apply"):
        longswap.swap_attention(model, full(), max_length=200, rope="linear")
    assert model.config.longswap == record
    assert model.config._attn_implementation == "longswap"
    assert model.transformer.wpe.weight.shape[0] == 150
    assert model.transformer.h[0].attn.longswap_selector is gate


def test_a_re_swap_plans_positions_from_the_trained_ones():
    model = make_model("llama")
    longswap.swap_attention(model, full(), max_length=256)  # YaRN in the config
    report = longswap.swap_attention(model, full(), max_length=128, rope="linear")
    assert report.positions["original_rope_parameters"]["rope_type"] == "default"
    assert model.config.rope_parameters == {
        "rope_theta": 10000.0,
        "rope_type": "linear",
        "factor": 2.0,
    }
    longswap.restore(model)
    assert model.config.rope_parameters["rope_type"] == "default"
