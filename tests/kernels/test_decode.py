"""Decoding steps of selection patterns: only the static keys and selected blocks, exactly."""

import pytest
import torch

from longswap import sparse_attention
from longswap.kernels.api import resolve_backend
from longswap.kernels.decode import selection_decode
from longswap.patterns import block_topk, learned_topk, sliding_window

PATTERNS = [
    block_topk(16, 3),
    learned_topk(16, 3),
    sliding_window(40, sinks=4) | block_topk(16, 2),
    sliding_window(40, sinks=4) | learned_topk(16, 2),
]


def inputs(q_len, kv_len, heads=(6, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads[0], q_len, 8, generator=g)
    k, v = (torch.randn(2, heads[1], kv_len, 8, generator=g) for _ in "kv")
    return [t.requires_grad_() for t in (q, k, v)]


def scores_for(pattern, q, k, seed=1):
    if not pattern.needs_selector:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q.shape[0], k.shape[1], q.shape[2], k.shape[2] // 16, generator=g)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize(("q_len", "kv_len"), [(1, 300), (5, 300), (16, 256), (1, 17), (1, 15)])
def test_decoding_path_equals_the_oracle_with_gradients(pattern, q_len, kv_len):
    q, k, v = inputs(q_len, kv_len)
    scores = scores_for(pattern, q, k)
    ref = sparse_attention(q, k, v, pattern, backend="reference", block_scores=scores)
    out = sparse_attention(q, k, v, pattern, backend="blocks", block_scores=scores)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    w = torch.randn_like(ref)
    for a, b in zip(
        torch.autograd.grad((out * w).sum(), (q, k, v)),
        torch.autograd.grad((ref * w).sum(), (q, k, v)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_each_head_sees_only_its_own_selection():
    # Head 0 of the group selects block 1, head 1 block 3: a key of block 3 must not reach
    # head 0 although the group gathers both blocks.
    pattern = block_topk(16, 1)
    q, k, v = (t.detach() for t in inputs(1, 80, heads=(2, 1)))
    k[:, :, 16:32], k[:, :, 48:80] = 0.0, 0.0  # the own block (64-79) scores 0
    k[:, :, 16:32, 0], k[:, :, 48:64, 1] = 1.0, 1.0  # block means point along axes 0 and 1
    q[:, 0, :, :2] = torch.tensor([50.0, -50.0])
    q[:, 1, :, :2] = torch.tensor([-50.0, 50.0])
    v[:, :, 48:64] = 100.0  # block 3's values would show in head 0's output
    out = selection_decode(q, k, v, pattern, scale=0.35)
    ref = sparse_attention(q, k, v, pattern, backend="reference")
    torch.testing.assert_close(out, ref)
    assert out[:, 0].abs().max() < 50 < out[:, 1].abs().max()


def test_auto_sends_long_decoding_steps_of_selections_to_the_decoding_path():
    q, k, v = (t.detach() for t in inputs(1, 8192, heads=(2, 1)))
    assert resolve_backend("auto", q, k, v, block_topk(64, 4)) == "blocks"
    short = k[:, :, :512]
    assert resolve_backend("auto", q, short, short, block_topk(64, 4)) == "reference"
