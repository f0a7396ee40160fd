"""``static | selection``: the selected blocks are spent where the static part sees nothing."""

import pytest
import torch

from longswap.patterns import (
    SelectionUnion,
    block_topk,
    dilated,
    learned_topk,
    parse_pattern,
    sliding_window,
)

UNION = sliding_window(window=96, sinks=4) | block_topk(block_size=32, top_k=2)


def test_the_union_is_a_selection_with_the_parts_properties():
    learned = sliding_window(window=512, sinks=4) | learned_topk(block_size=64, top_k=16)
    assert isinstance(learned, SelectionUnion)
    assert learned.needs_selector and learned.data_dependent
    assert (learned.block_size, learned.top_k) == (64, 16)
    assert not UNION.needs_selector
    text = "sliding_window(window=96, sinks=4) | block_topk(block_size=32, top_k=2)"
    assert str(UNION) == text and parse_pattern(text) == UNION
    # Flattened, whatever the nesting; the selection goes last.
    nested = (sliding_window(96, sinks=4) | block_topk(32, 2)) | dilated(8, 4)
    assert nested == sliding_window(96, sinks=4) | (block_topk(32, 2) | dilated(8, 4))
    assert nested.parts == (sliding_window(96, sinks=4), dilated(8, 4), block_topk(32, 2))
    assert parse_pattern(str(nested)) == nested


def test_candidates_are_the_blocks_the_static_part_does_not_show_in_full():
    candidates = UNION.candidates(320, 320)  # (Lq, n): 10 complete blocks of 32
    # Block 9's last query (319) sees from position 224 on, so blocks 7..8 are shown in full
    # to all of the block; block 6 is cut by the window's edge and block 0 holds only the
    # sinks: candidates are blocks 0..6.
    assert candidates[319].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert candidates[288].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert candidates[100].nonzero().flatten().tolist() == [0]  # block 3: 1 and 2 are shown
    # Exactly the earlier blocks not shown in full to every query of the query's block.
    q = torch.arange(320)[:, None]
    kv = torch.arange(320)[None, :]
    seen = sliding_window(96, sinks=4).mask_fn(320)(q, kv, torch.zeros(1))
    shown = seen.view(10, 32, 10, 32).all(3).all(1)  # (query block, key block)
    earlier = torch.arange(10)[None, :] < torch.arange(10)[:, None]
    expected = (earlier & ~shown).repeat_interleave(32, 0)
    assert torch.equal(candidates, expected)


@pytest.mark.parametrize(("q_len", "kv_len"), [(1, 320), (1, 300), (17, 300), (64, 256)])
def test_candidates_depend_only_on_positions(q_len, kv_len):
    whole = UNION.candidates(kv_len, kv_len)
    assert torch.equal(UNION.candidates(q_len, kv_len), whole[kv_len - q_len :])


def test_the_selection_adds_keys_beyond_the_static_part():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 320, 8, generator=g), torch.randn(1, 1, 320, 8, generator=g)
    selected = UNION.select(q, k)  # (B, Hq, Lq, n)
    assert int(selected[0, :, -1].sum(-1).min()) == 2  # the budget is spent in full
    spread = selected.repeat_interleave(32, -1)
    static = UNION.dense_mask(320, 320)[None]
    added = (spread & ~static).sum(-1)  # every selected block brings keys the window lacks
    assert bool((added[0, :, -1] >= 32 + 28).all())  # block 0 adds 28, any other 32
