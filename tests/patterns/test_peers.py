"""longswap's patterns against the peers' published algorithms, restated from their papers
(MoBA's gate, LongLoRA's roll-based S2-Attn): the conventions the README states."""

import torch

from longswap.patterns import block_topk, shifted_groups


def moba_gate_mask(q, k, block_size, moba_topk):
    """MoBA's gating: per token and head, score every block by q . mean(key block), force
    the token's own block, drop later blocks, keep the ``moba_topk`` best (the own block
    counts as one), then attend causally inside the selected blocks."""
    length = q.shape[2]
    n = length // block_size
    means = k.reshape(*k.shape[:2], n, block_size, -1).mean(3)  # (B, H, n, D)
    gate = q @ means.transpose(-1, -2)  # (B, H, L, n)
    own = torch.arange(length) // block_size
    block = torch.arange(n)
    gate = gate.masked_fill(block[None, :] > own[:, None], float("-inf"))
    gate = gate.masked_fill(block[None, :] == own[:, None], float("inf"))
    chosen = torch.zeros_like(gate, dtype=torch.bool)
    chosen.scatter_(-1, gate.topk(moba_topk, dim=-1).indices, True)
    chosen &= gate > float("-inf")  # early tokens have fewer blocks than moba_topk
    keys = chosen.repeat_interleave(block_size, dim=-1)  # (B, H, L, L)
    return keys & torch.ones(length, length, dtype=torch.bool).tril()


def test_block_topk_k_is_mobas_topk_k_plus_one():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 256, 16, generator=g), torch.randn(1, 2, 256, 16, generator=g)
    ours = block_topk(block_size=32, top_k=3).token_mask(q, k)
    torch.testing.assert_close(ours, moba_gate_mask(q, k, 32, moba_topk=4))


def longlora_roll_mask(length, heads, group):
    """LongLoRA's non-flash S2-Attn: the second half of the heads rolls the sequence by
    ``-group // 2``, attends causally inside groups of the rolled sequence, rolls back."""
    shift = group // 2
    mask = torch.zeros(heads, length, length, dtype=torch.bool)
    index = torch.arange(length)
    for h in range(heads):
        rolled = (index - shift) % length if h >= heads // 2 else index  # position -> slot
        same = (rolled[:, None] // group) == (rolled[None, :] // group)
        mask[h] = same & (rolled[None, :] <= rolled[:, None])
    return mask


def test_shifted_groups_is_longlora_without_the_wrap_around_leak():
    length, heads, group = 64, 4, 16
    ours = shifted_groups(group_size=group).dense_mask(length, length, heads)
    theirs = longlora_roll_mask(length, heads, group)
    torch.testing.assert_close(ours[:2], theirs[:2])  # unshifted heads: identical
    extra = theirs[2:] & ~ours[2:]
    assert not (ours[2:] & ~theirs[2:]).any()  # every pair longswap allows, LongLoRA does
    q, kv = extra.nonzero()[:, 1], extra.nonzero()[:, 2]
    assert (q < group // 2).all() and (kv > q).all()  # the rest: the first half-group
    assert extra.any()  # ... seeing the last tokens of the sequence, i.e. the future
