"""Swapped models under padding and generation with a KV cache."""

import pytest
import torch

import longswap
from longswap.patterns import bigbird, block_topk, dilated, learned_topk, sliding_window
from longswap.swap.attention import CACHE_LAYER_ATTR
from longswap.swap.cache import BlockSummaryLayer

from .conftest import assert_generate_equals_recomputation, make_model


def last_logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("pattern", [sliding_window(6, sinks=2), block_topk(8, 2)], ids=str)
def test_right_padding_matches_each_input_alone(family, pattern):
    model = make_model(family)
    longswap.swap_attention(model, pattern, backend="blocks", block_size=16)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(1, 97, (1, 37), generator=g), torch.randint(1, 97, (1, 21), generator=g)
    batch = torch.zeros(2, 37, dtype=torch.long)
    mask = torch.zeros(2, 37, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, :21], mask[1, :21] = b[0], 1
    out = last_logits(model, batch, mask)
    torch.testing.assert_close(out[0], last_logits(model, a)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :21], last_logits(model, b)[0], atol=1e-5, rtol=1e-5)


def test_left_padding_with_a_distance_only_pattern_matches():
    model = make_model("llama")
    longswap.swap_attention(
        model, sliding_window(5) | dilated(3, 7), backend="blocks", block_size=16
    )
    g = torch.Generator().manual_seed(4)
    b = torch.randint(1, 97, (1, 25), generator=g)
    batch = torch.cat([torch.zeros(1, 12, dtype=torch.long), b], 1)
    mask = torch.cat([torch.zeros(1, 12, dtype=torch.long), torch.ones(1, 25, dtype=torch.long)], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = model(batch, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(out[0, 12:], last_logits(model, b)[0], atol=1e-5, rtol=1e-5)


def test_left_padding_with_absolute_positions_is_refused():
    model = make_model("llama")
    longswap.swap_attention(model, sliding_window(5, sinks=2))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="pad on the right"):
        last_logits(model, torch.ones(2, 6, dtype=torch.long), mask)


def test_generating_from_a_batch_padded_on_the_right_is_refused_as_such():
    """generate continues each row after its padding: padding between real tokens, which a
    pattern of absolute positions cannot read (dense attention, too, predicts from a pad)."""
    model = make_model("llama")
    longswap.swap_attention(model, sliding_window(5, sinks=2))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    settings = dict(attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    with torch.no_grad(), pytest.raises(ValueError, match="padding between real tokens") as err:
        model.generate(torch.ones(2, 6, dtype=torch.long), **settings)
    assert "left padding" not in str(err.value)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
@pytest.mark.parametrize(
    "pattern", [sliding_window(6, sinks=2), block_topk(4, 2), bigbird(4, 1, 1, 1)], ids=str
)
def test_generate_with_cache_equals_recomputing(family, pattern):
    model = make_model(family)
    longswap.swap_attention(model, pattern, backend="blocks", block_size=16)
    prompt = torch.randint(1, 97, (1, 5), generator=torch.Generator().manual_seed(5))
    assert_generate_equals_recomputation(model, prompt, 25)  # 30 tokens: beyond the window


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("pattern", [sliding_window(6, sinks=2), sliding_window(5)], ids=str)
def test_sparse_cache_gives_the_same_tokens_and_stays_bounded(family, pattern):
    model = make_model(family)
    longswap.swap_attention(model, [pattern, "full()"], backend="blocks", block_size=16)
    prompt = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(6))
    cache = longswap.swap.sparse_cache(model)
    steps = 150  # the window layer's spare room (64) fills twice: its keys move down twice
    with torch.no_grad():
        plain = model.generate(
            prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0
        )
        bounded = model.generate(
            prompt,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
            cache=cache,
        )
    assert torch.equal(bounded, plain)
    window = cache.layers[0]
    kept = pattern.sinks + pattern.window - 1
    assert kept <= window.keys.shape[-2] <= kept + window.spare  # it stopped growing
    assert window._buffers[0].shape[-2] <= window.get_max_length() == kept + 64
    assert cache.layers[1].keys.shape[-2] == 9 + steps - 1  # the dense layer keeps everything
    assert cache.get_seq_length() == 9 + steps - 1


@pytest.mark.parametrize("pattern", [sliding_window(6, sinks=2), block_topk(4, 2)], ids=str)
def test_a_used_sparse_cache_refuses_a_batch_of_another_size(pattern):
    model = make_model("llama")
    longswap.swap_attention(model, pattern, backend="blocks", block_size=16)
    cache = longswap.swap.sparse_cache(model)
    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, cache=cache)
    with torch.no_grad():
        model.generate(torch.randint(1, 97, (1, 9)), **settings)
        with pytest.raises(ValueError, match="batch of 1 sequences and cannot continue a batch"):
            model.generate(torch.randint(1, 97, (2, 9)), **settings)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_packed_documents_do_not_see_each_other(family):
    """Positions that restart mark documents: each one attends only inside itself."""
    model = make_model(family)
    longswap.swap_attention(
        model, sliding_window(8) | dilated(3, 5), backend="blocks", block_size=16
    )
    g = torch.Generator().manual_seed(9)
    a, b = torch.randint(1, 97, (1, 23), generator=g), torch.randint(1, 97, (1, 17), generator=g)
    packed = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(23), torch.arange(17)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=positions).logits
        alone = model(b).logits
    torch.testing.assert_close(out[:, 23:], alone, atol=1e-5, rtol=1e-5)


SELECTIONS = [
    block_topk(4, 2),
    learned_topk(4, 2),
    sliding_window(8, sinks=2) | block_topk(4, 2),
    sliding_window(8, sinks=2) | learned_topk(4, 2),
]


@pytest.mark.parametrize("backend", ["blocks", "auto"])
@pytest.mark.parametrize("pattern", SELECTIONS, ids=str)
def test_selection_decodes_from_block_summaries(pattern, backend):
    model = make_model("llama")
    longswap.swap_attention(model, [pattern, "full()"], backend=backend)
    with torch.no_grad():  # trained-looking gates: not the MoBA start
        for name, p in model.named_parameters():
            if "selector" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
    prompt = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(6))
    cache = longswap.swap.sparse_cache(model)
    assert isinstance(cache.layers[0], BlockSummaryLayer)
    assert_generate_equals_recomputation(model, prompt, 25, cache=cache)
    # The summaries grew with the blocks: one per complete block of the 33 cached tokens
    # (the last token is generated, not cached); the dense layer keeps plain keys.
    assert cache.layers[0]._summaries.shape[:3] == (2, 2, 32 // 4)
    assert cache.layers[1].keys.shape[-2] == 33
    assert not hasattr(model.model.layers[0].self_attn, CACHE_LAYER_ATTR)  # handed back


@pytest.mark.parametrize("pattern", [sliding_window(6, sinks=2), bigbird(4, 1, 1, 1)], ids=str)
def test_native_window_cache_keeps_absolute_positions(pattern):
    """transformers' cache drops keys beyond a model's own window; patterns that depend on
    absolute positions still see each key where it was (Mistral, window 8, 30 tokens)."""
    model = make_model("mistral", sliding_window=8)
    longswap.swap_attention(model, pattern, backend="blocks", block_size=16)
    prompt = torch.randint(1, 97, (1, 5), generator=torch.Generator().manual_seed(5))
    assert_generate_equals_recomputation(model, prompt, 25)


def test_autocast_runs_the_swap_in_autocasts_dtype():
    """Under autocast RoPE leaves q and k in float32 beside a bfloat16 v (TRL's bf16
    training): the swap computes in autocast's dtype, as SDPA does, close to dense."""
    model = make_model("llama")
    tokens = torch.randint(1, 97, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dense = model(tokens).logits.float()
        longswap.swap_attention(model, sliding_window(64), backend="blocks")
        swapped = model(tokens).logits.float()
    torch.testing.assert_close(swapped, dense, atol=0.05, rtol=0.05)
