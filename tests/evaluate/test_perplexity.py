"""Perplexity against length: known answers and the scoring convention."""

import math

import pytest
import torch

import longswap
from longswap.evaluate import perplexity

from ..swap.conftest import make_model


def test_uniform_model_has_the_vocabulary_size_as_perplexity():
    model = make_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: the uniform distribution
    tokens = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(0))
    for length in (16, 64):
        record = perplexity(model, tokens, length=length, targets=100)
        assert record["perplexity"] == pytest.approx(97, rel=1e-4)
        assert record["bits_per_token"] == pytest.approx(math.log2(97), rel=1e-4)
        assert record["target_tokens"] == 100


def test_every_length_scores_the_same_targets_once():
    model = make_model("qwen2")
    tokens = torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(1))
    whole = model(tokens[None]).logits[0, :-1]
    direct = torch.nn.functional.cross_entropy(whole[-50:], tokens[1:][-50:]).item()
    # With windows as long as the text, the strided score is the plain one-pass score.
    record = perplexity(model, tokens, length=200, targets=50, stride=50)
    assert record["nll"] == pytest.approx(direct, rel=1e-5)
    assert "at least 150 tokens of context" in record["convention"]
    for length, stride in ((20, 7), (64, 32)):
        assert perplexity(model, tokens, length, 50, stride)["target_tokens"] == 50


def test_swapped_model_and_errors():
    model = make_model("llama")
    longswap.swap_attention(model, "sliding_window(window=8)")
    tokens = torch.randint(0, 97, (120,), generator=torch.Generator().manual_seed(2))
    assert math.isfinite(perplexity(model, tokens, 32, 40)["perplexity"])
    with pytest.raises(ValueError, match="need at least 121 tokens"):
        perplexity(model, tokens, 32, 120)
    with pytest.raises(ValueError, match="needs 16 tokens of context but the text has 10"):
        perplexity(model, tokens, 32, 110)
    with pytest.raises(ValueError, match="1-D tensor"):
        perplexity(model, tokens[None], 32, 10)
