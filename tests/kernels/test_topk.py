"""``block_topk`` through ``blocks``: the own-block view path and the per-key-block tiles."""

import pytest
import torch

from longswap.kernels.topk import group_by_block, own_block_plan
from longswap.patterns import block_topk
from tests.kernels.test_backends import assert_matches_reference
from tests.kernels.test_band import assert_low_precision_matches, inputs

CPU = torch.device("cpu")


def test_own_block_plan_needs_block_aligned_queries():
    assert own_block_plan(32, 4, 2, 200, 200, CPU) is not None
    assert own_block_plan(32, 4, 2, 200, 264, CPU) is not None  # cache of two whole blocks
    assert own_block_plan(32, 4, 2, 200, 237, CPU) is None  # queries start mid-block
    assert own_block_plan(32, 4, 2, 20, 20, CPU) is None  # shorter than a block


@pytest.mark.parametrize(
    ("batch", "heads", "q_len", "kv_len", "pattern"),
    [
        (2, (2, 2), 1000, 1000, block_topk(64, 3)),  # a short last block
        (1, (4, 2), 704, 960, block_topk(64, 2)),  # decoding offset of four blocks
        (2, (4, 1), 500, 500, block_topk(32, 4)),  # four query heads per key head
        (2, (2, 2), 256, 256, block_topk(128, 4)),  # fewer earlier blocks than top_k
        (1, (2, 1), 300, 300, block_topk(16, 0)),  # own block only
    ],
    ids=str,
)
@pytest.mark.parametrize("force_math", [False, True], ids=["cpu-flash", "portable"])
def test_topk_view_path_equals_reference(batch, heads, q_len, kv_len, pattern, force_math):
    assert own_block_plan(pattern.block_size, *heads, q_len, kv_len, CPU) is not None
    q, k, v = inputs(batch, *heads, q_len, kv_len)
    assert_matches_reference(pattern, q, k, v, None, 2e-5, force_math=force_math)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_topk_view_path_ties_and_low_precision(dtype):
    """Equal keys everywhere: every selection is a tie, settled toward recent blocks."""
    q, k, v = inputs(1, 4, 2, 512, 512, dtype=dtype)
    k = torch.ones_like(k, requires_grad=True)
    assert_low_precision_matches(block_topk(64, 2), q, k, v)


def test_group_by_block_keeps_every_pair_once():
    g = torch.Generator().manual_seed(0)
    key_block = torch.randint(0, 40, (3000,), generator=g) ** 2 // 40  # skewed counts
    row = torch.randperm(3000, generator=g)
    sentinel = 3000
    seen = []
    for rows, blocks in group_by_block(row, key_block, 40, sentinel):
        assert rows.shape[0] == blocks.shape[0]
        counts = (rows != sentinel).sum(1)
        assert (counts > 0).all()
        assert counts.min() * 2**0.25 >= rows.shape[1] - 1e-6  # similar counts share a bucket
        for r, b in zip(rows, blocks, strict=True):
            seen += [(int(x), int(b)) for x in r[r != sentinel]]
    assert sorted(seen) == sorted(zip(row.tolist(), key_block.tolist(), strict=True))
