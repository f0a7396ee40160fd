"""Families whose attention is more than softmax(QK^T)V: Gemma 2 soft-caps its logits,
gpt-oss adds a learned sink per head. Both swap, train, save, load, restore and generate
like the other families."""

import pytest
import torch

import longswap
from longswap.patterns import block_topk, full, sliding_window

from .conftest import assert_generate_equals_recomputation, make_model

FAMILIES = ["gemma2", "gpt_oss"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def without_the_term(model):
    """Switch the family's extra term off in every attention module."""
    for m in model.modules():
        if hasattr(m, "attn_logit_softcapping"):
            m.attn_logit_softcapping = None
        if isinstance(getattr(m, "sinks", None), torch.nn.Parameter):
            m.sinks.data.fill_(-1e4)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_swap_applies_the_familys_term(family, tokens):
    model = make_model(family)
    before = logits(model, tokens)
    longswap.swap_attention(model, full())
    torch.testing.assert_close(logits(model, tokens), before, atol=1e-5, rtol=1e-5)
    without_the_term(model)  # the term matters here, so the equality above means something
    assert (logits(model, tokens) - before).abs().max() > 1e-2


def loss_and_grads(model, ids):
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_equal_the_unswapped_model_and_the_oracle(family, tokens):
    """Every parameter's gradient (gpt-oss's sinks included) through a full() swap equals
    the family's own attention; through a window swap, the blocks backend equals the oracle."""
    model = make_model(family).train()
    expected = loss_and_grads(model, tokens)
    longswap.swap_attention(model, full(), backend="blocks")
    got = loss_and_grads(model, tokens)
    assert got.keys() == expected.keys()
    if family == "gpt_oss":
        assert any(name.endswith("sinks") for name in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    longswap.swap_attention(model, sliding_window(8, sinks=2), backend="reference")
    oracle = loss_and_grads(model, tokens)
    longswap.swap_attention(model, sliding_window(8, sinks=2), backend="blocks", block_size=16)
    got = loss_and_grads(model, tokens)
    for name in oracle:
        torch.testing.assert_close(got[name], oracle[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_restore_round_trip(family, tokens, tmp_path):
    model = make_model(family)
    original = logits(model, tokens)
    report = longswap.swap_attention(model, sliding_window(8, sinks=2), backend="blocks")
    assert any("own sliding window of 16" in note for note in report.notes)
    swapped = logits(model, tokens)
    longswap.save(model, tmp_path)
    loaded = longswap.load(tmp_path).eval()
    torch.testing.assert_close(logits(loaded, tokens), swapped, atol=1e-5, rtol=1e-5)
    longswap.restore(loaded)
    torch.testing.assert_close(logits(loaded, tokens), original, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", [sliding_window(6, sinks=2), block_topk(4, 2)], ids=str)
def test_generate_with_cache_equals_recomputing(family, pattern):
    model = make_model(family)
    report = longswap.swap_attention(model, pattern, backend="blocks", block_size=16)
    if pattern.data_dependent:  # native-window layers keep their window alone
        assert report.layers[0] == "sliding_window(window=16, sinks=0)"
        assert any("cannot be intersected" in note for note in report.notes)
    prompt = torch.randint(1, 97, (1, 5), generator=torch.Generator().manual_seed(5))
    assert_generate_equals_recomputation(model, prompt, 25)  # 30 tokens: beyond the windows
