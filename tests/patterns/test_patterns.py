"""Pattern definitions: hand-checked cases, validation, and the block view's soundness."""

import functools
import operator
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from longswap import sparse_attention
from longswap.patterns import (
    REGISTRY,
    bigbird,
    block_topk,
    dilated,
    full,
    learned_topk,
    local_global,
    parse_pattern,
    shifted_groups,
    sliding_window,
)
from longswap.patterns.compose import MAX_PARTS

STATIC = [
    full(),
    sliding_window(7),
    sliding_window(5, sinks=3),
    dilated(4, 3),
    dilated(6, 1),
    local_global(5, [0, 9, 40]),
    bigbird(8, 1, 1, 2, seed=3),
    bigbird(5, 0, 2, 1, seed=0),
    shifted_groups(8),
    shifted_groups(6),
    block_topk(8, 2),  # its static part: the own block
    sliding_window(9) | dilated(3, 7),
    sliding_window(20) & shifted_groups(16),
]


def visible_keys(pattern, q, kv_len, head=0, num_heads=2):
    """Keys visible from absolute query position q."""
    mask = pattern.dense_mask(kv_len, kv_len, num_heads)
    return torch.nonzero(mask[min(head, mask.shape[0] - 1), q]).flatten().tolist()


def test_full_is_causal():
    assert visible_keys(full(), 5, 10) == [0, 1, 2, 3, 4, 5]


def test_window_edges_hf_convention():
    # window=w: keys j with i - w < j <= i, w keys including the query itself.
    assert visible_keys(sliding_window(3), 10, 20) == [8, 9, 10]
    assert visible_keys(sliding_window(1), 4, 20) == [4]
    assert visible_keys(sliding_window(3), 1, 20) == [0, 1]


def test_sinks_visible_to_later_queries_only():
    assert visible_keys(sliding_window(2, sinks=2), 10, 20) == [0, 1, 9, 10]
    assert visible_keys(sliding_window(2, sinks=4), 1, 20) == [0, 1]


def test_dilation_distances():
    # distance d visible iff d % 3 == 0 and d < 4 * 3
    assert visible_keys(dilated(4, 3), 20, 30) == [11, 14, 17, 20]
    assert visible_keys(dilated(4, 3), 4, 30) == [1, 4]


def test_global_tokens_both_directions():
    p = local_global(2, [3])
    assert visible_keys(p, 10, 20) == [3, 9, 10]  # every later query sees the global key
    assert visible_keys(p, 3, 20) == [0, 1, 2, 3]  # the global query sees all earlier keys
    assert visible_keys(p, 2, 20) == [1, 2]  # an earlier query does not see it


def test_global_tokens_beyond_sequence_are_ignored():
    p = local_global(2, [0, 500])
    assert visible_keys(p, 9, 10) == [0, 8, 9]


def test_shifted_group_borders():
    p = shifted_groups(4)
    # unshifted heads: groups [0,4) [4,8) ...; shifted heads: [0,2) [2,6) [6,10) ...
    assert visible_keys(p, 5, 12, head=0, num_heads=2) == [4, 5]
    assert visible_keys(p, 5, 12, head=1, num_heads=2) == [2, 3, 4, 5]
    assert visible_keys(p, 1, 12, head=1, num_heads=2) == [0, 1]
    assert visible_keys(p, 6, 12, head=1, num_heads=2) == [6]


def test_shifted_groups_never_see_the_future():
    mask = shifted_groups(4).dense_mask(16, 16, 4)
    assert not torch.triu(mask, diagonal=1).any()


def test_shifted_groups_split_odd_heads_with_the_larger_part_shifted():
    mask = shifted_groups(4).dense_mask(8, 8, 3)
    assert mask[0, 5, 4] and not mask[0, 5, 3]  # head 0 unshifted: groups [0, 4), [4, 8)
    assert mask[1, 5, 2] and mask[2, 5, 2] and not mask[1, 5, 1]  # heads 1, 2: [2, 6)
    assert not mask[1, 6, 5] and not mask[2, 6, 5]  # shifted heads: 6 starts a new group
    with pytest.raises(ValueError, match="num_heads must be an integer >= 2, got 1"):
        shifted_groups(4).dense_mask(8, 8, 1)


def test_bigbird_parts():
    p = bigbird(block_size=4, window_blocks=1, global_blocks=1, random_blocks=1, seed=0)
    table = p.block_table(8)
    assert table[5, 4] and table[5, 5] and table[5, 0]  # neighbour, own, global
    assert table.sum(1)[5] == 4  # plus exactly one random earlier block
    assert not torch.triu(table, diagonal=1).any()


def test_bigbird_random_blocks_do_not_depend_on_length():
    p = bigbird(4, 1, 1, 2, seed=7)
    assert torch.equal(p.block_table(50)[:20, :20], p.block_table(20))
    assert not torch.equal(p.block_table(20), bigbird(4, 1, 1, 2, seed=8).block_table(20))


def test_block_topk_selection_ties_go_to_recent_block():
    p = block_topk(block_size=2, top_k=1)
    k = torch.ones(1, 1, 8, 1)  # every block has the same mean: a four-way tie
    q = torch.ones(1, 1, 8, 1)
    selected = p.select(q, k)  # (1, 1, 8, 4)
    assert selected[0, 0, 7].tolist() == [False, False, True, False]  # query 7 is in block 3
    assert selected[0, 0, 3].tolist() == [True, False, False, False]
    assert not selected[0, 0, :2].any()  # block 0 has no earlier block


def test_block_topk_is_strictly_causal():
    torch.manual_seed(0)
    p = block_topk(block_size=4, top_k=2)
    q, k = torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
    first = p.token_mask(q, k)
    k2 = k.clone()
    k2[:, :, 20:] = torch.randn(1, 2, 12, 8)  # change the future of query 19
    second = p.token_mask(q, k2)
    assert torch.equal(first[..., :20, :], second[..., :20, :])
    assert not torch.triu(first[0, 0], diagonal=1).any()


def test_block_topk_picks_the_best_block():
    p = block_topk(block_size=2, top_k=1)
    k = torch.tensor([1.0, 1.0, -1.0, -1.0, 5.0, 5.0, 0.0, 0.0]).view(1, 1, 8, 1)
    q = torch.ones(1, 1, 8, 1)
    assert p.select(q, k)[0, 0, 7].tolist() == [False, False, True, False]
    assert p.select(-q, k)[0, 0, 7].tolist() == [False, True, False, False]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: sliding_window(0), "sliding_window: window must be an integer >= 1, got 0"),
        (lambda: sliding_window(4, sinks=-1), "sinks must be an integer >= 0, got -1"),
        (lambda: dilated(4, 0), "dilation must be an integer >= 1, got 0"),
        (lambda: local_global(4, [1, -2]), "each of global_tokens must be an integer >= 0"),
        (lambda: local_global(4, 3), "global_tokens must be a list of positions"),
        (lambda: bigbird(block_size=0), "block_size must be an integer >= 1, got 0"),
        (lambda: shifted_groups(1), "group_size must be an integer >= 2, got 1"),
        (lambda: block_topk(128, -1), "top_k must be an integer >= 0, got -1"),
        (lambda: sliding_window(2.5), "window must be an integer >= 1, got 2.5"),
        (lambda: block_topk(8) & full(), "block_topk selects keys from the data; it can only"),
        (lambda: block_topk(8) | learned_topk(), "a union holds at most one"),
        (lambda: shifted_groups(64) | block_topk(8), "differs between heads"),
        (lambda: learned_topk(per_head=1), "per_head must be True or False, got 1"),
    ],
)
def test_bad_parameters_name_the_parameter(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


TOO_LARGE = 2**31  # one past MAX_PARAMETER


@pytest.mark.parametrize(
    ("text", "name"),
    [
        (f"sliding_window(window={10**23})", "window"),
        (f"sliding_window(window=4, sinks={TOO_LARGE})", "sinks"),
        (f"dilated(window=4, dilation={10**30})", "dilation"),
        (f"dilated(window={TOO_LARGE}, dilation=2)", "window"),
        (f"local_global(window={TOO_LARGE})", "window"),
        (f"local_global(window=4, global_tokens=[0, {TOO_LARGE}])", "each of global_tokens"),
        (f"bigbird(block_size={TOO_LARGE})", "block_size"),
        (f"bigbird(window_blocks={TOO_LARGE})", "window_blocks"),
        (f"bigbird(global_blocks={TOO_LARGE})", "global_blocks"),
        (f"bigbird(random_blocks={TOO_LARGE})", "random_blocks"),
        (f"bigbird(seed={TOO_LARGE})", "seed"),
        (f"shifted_groups(group_size={TOO_LARGE})", "group_size"),
        (f"block_topk(block_size={TOO_LARGE})", "block_size"),
        (f"block_topk(top_k={TOO_LARGE})", "top_k"),
    ],
)
def test_parameters_are_bounded_when_parsed(text, name):
    """A value no kernel can run is refused at once, with the limit (2**31 - 1) named."""
    with pytest.raises(ValueError, match=rf"{name} must be at most 2147483647 \(2\*\*31 - 1"):
        parse_pattern(text)


@pytest.mark.parametrize("backend", ["reference", "blocks"])
def test_largest_parameters_still_run(backend):
    """At the limit every pattern runs: each covers the whole causal row of 40 tokens,
    except a dilation of 2**31 - 1, which leaves each query only itself."""
    top = 2**31 - 1
    q = torch.randn(1, 2, 40, 8)
    causal = sparse_attention(q, q, q, full(), backend="reference")
    for pattern in [
        sliding_window(top, sinks=top),
        local_global(top, [0, top]),
        bigbird(top, top, top, top, seed=top),
        shifted_groups(top),
        block_topk(top, top),
    ]:
        out = sparse_attention(q, q, q, pattern, backend=backend, block_size=16)
        torch.testing.assert_close(out, causal, msg=lambda m, p=pattern: f"{p}: {m}")
    torch.testing.assert_close(sparse_attention(q, q, q, dilated(top, top), backend=backend), q)


@pytest.mark.parametrize(
    "pattern",
    [
        *STATIC,
        block_topk(64, 3),
        learned_topk(64, 3, per_head=True),
        learned_topk(64, 3, sub_block=16),
    ],
    ids=str,
)
def test_string_round_trip(pattern):
    assert parse_pattern(str(pattern)) == pattern


def test_an_unset_option_is_left_out_of_the_string():
    assert str(learned_topk(64, 3)) == "learned_topk(block_size=64, top_k=3, per_head=False)"
    assert "sub_block=16" in str(learned_topk(64, 3, sub_block=16))


@pytest.mark.parametrize("pattern", STATIC, ids=str)
def test_a_piece_of_the_dense_mask_is_computed_alone(pattern):
    whole = pattern.dense_mask(30, 45, num_heads=4)
    piece = pattern.dense_mask(30, 45, num_heads=4, rows=slice(7, 19), keys=33)
    torch.testing.assert_close(piece, whole[:, 7:19, :33])
    rows = torch.tensor([0, 5, 6, 29])  # some rows, by index
    piece = pattern.dense_mask(30, 45, num_heads=4, rows=rows, keys=33)
    torch.testing.assert_close(piece, whole[:, rows, :33])


def test_parse_examples_and_errors():
    assert parse_pattern("sliding_window(window=4096, sinks=4)") == sliding_window(4096, 4)
    assert parse_pattern("sliding_window(8) | (dilated(2, 4) & full())") == sliding_window(8) | (
        dilated(2, 4) & full()
    )
    with pytest.raises(ValueError, match="unknown pattern 'slidingwindow'.*known patterns"):
        parse_pattern("slidingwindow(4)")
    with pytest.raises(ValueError, match="syntax error"):
        parse_pattern("sliding_window(")
    with pytest.raises(ValueError, match="not a literal"):
        parse_pattern("sliding_window(window=x)")
    with pytest.raises(ValueError, match="bad arguments for sliding_window"):
        parse_pattern("sliding_window(size=3)")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('sliding_window(**{"window": 4})', "'**' unpacking is not read; write each argument"),
        ("sliding_window(4) ** full()", "'**' does not combine patterns; use | (union)"),
        ("sliding_window(4) + full()", "'+' does not combine patterns"),
        ("sliding_window(window=2**10)", "argument '2 ** 10' is an expression; write its value"),
        ("sliding_window(window=4, window=5)", "argument 'window' is given twice"),
    ],
)
def test_parse_names_what_is_wrong_with_the_syntax(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_pattern(text)


def test_a_pattern_of_too_many_parts_is_refused():
    """Beyond MAX_PARTS parts, a clear error (not a RecursionError), written or built."""
    many = [sliding_window(i + 1) for i in range(MAX_PARTS + 1)]
    text = " | ".join(map(str, many))
    with pytest.raises(ValueError, match=rf"combines {MAX_PARTS + 1} patterns, more than the"):
        parse_pattern(text)
    with pytest.raises(ValueError, match="combines 1000 patterns"):
        parse_pattern(" | ".join(["full()"] * 1000))
    with pytest.raises(ValueError, match=rf"union: combines {MAX_PARTS + 1} patterns"):
        functools.reduce(operator.or_, many)
    most = functools.reduce(operator.or_, many[:MAX_PARTS])
    assert parse_pattern(str(most)) == most  # the limit itself round-trips
    with pytest.raises(ValueError, match="intersection: combines"):
        most & full()


def test_registry_has_every_pattern():
    assert set(REGISTRY) == {
        "learned_topk",
        "full",
        "sliding_window",
        "dilated",
        "local_global",
        "bigbird",
        "shifted_groups",
        "block_topk",
    }


@pytest.mark.parametrize("pattern", STATIC, ids=str)
@given(
    q_len=st.integers(1, 70),
    extra=st.integers(0, 40),
    block_size=st.sampled_from([1, 3, 4, 8, 16, 128]),
)
def test_block_view_covers_element_view(pattern, q_len, extra, block_size):
    """No visible pair outside the listed blocks; no partially visible block called full."""
    kv_len, heads = q_len + extra, 4
    dense = pattern.dense_mask(q_len, kv_len, heads)  # (Hs, Lq, Lk)
    st_ = pattern.block_structure(q_len, kv_len, block_size, heads)
    n_q, n_k = -(-q_len // block_size), -(-kv_len // block_size)
    listed = torch.zeros(st_.num_heads, n_q, n_k, dtype=torch.int32)
    listed = listed.scatter_add(-1, st_.kv_indices, st_.kv_valid.int()) > 0
    full_map = torch.zeros(st_.num_heads, n_q, n_k, dtype=torch.int32)
    full_map = full_map.scatter_add(-1, st_.kv_indices, st_.kv_full.int()) > 0
    padded = torch.nn.functional.pad(
        dense, (0, n_k * block_size - kv_len, 0, n_q * block_size - q_len)
    )
    tiles = padded.view(dense.shape[0], n_q, block_size, n_k, block_size)
    any_pair = tiles.any(4).any(2)
    qi = torch.arange(n_q * block_size).view(n_q, block_size) < q_len
    ki = torch.arange(n_k * block_size).view(n_k, block_size) < kv_len
    real = qi[:, :, None, None] & ki[None, None]  # (nQ, bs, nK, bs)
    all_pairs = (tiles | ~real.permute(0, 1, 2, 3)).all(4).all(2)
    assert not (any_pair & ~listed).any(), "a visible pair lies in an unlisted block"
    assert not (full_map & ~all_pairs).any(), "a block called full has a hidden pair"


@pytest.mark.parametrize(
    "pattern",
    [
        full(),
        sliding_window(40, sinks=4),
        sliding_window(7),
        dilated(8, 1),
        dilated(8, 3),
        sliding_window(16) | dilated(4, 40),
        sliding_window(16) & full(),
        block_topk(16, 3),
        learned_topk(16, 3),
        sliding_window(20, sinks=2) | block_topk(16, 2),
        local_global(8, [0, 5]),
    ],
    ids=str,
)
def test_a_pattern_covers_a_length_only_when_it_is_dense_there(pattern):
    g = torch.Generator().manual_seed(0)
    for length in [1, 7, 8, 44, 48, 49, 64, 65, 100]:
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        if pattern.data_dependent:
            q = torch.randn(1, 2, length, 4, generator=g)
            k = torch.randn(1, 1, length, 4, generator=g)
            scores = torch.randn(1, 1, length, length // 16, generator=g)
            visible = pattern.token_mask(q, k, block_scores=scores)[0, 0]
        else:
            visible = pattern.dense_mask(length, length)[0]
        if pattern.covers(length):
            assert torch.equal(visible, causal), length


@pytest.mark.parametrize("backend", ["reference", "blocks"])
@pytest.mark.parametrize(
    "pattern", [shifted_groups(8), sliding_window(20) & shifted_groups(16), sliding_window(9)]
)
@pytest.mark.parametrize("start,heads", [(0, 2), (2, 2), (1, 3)])
def test_head_slice_is_the_full_pattern_on_those_heads(pattern, start, heads, backend):
    # Head-parallel attention (Ulysses) gives a process some of the heads: the slice must
    # apply their rules, forward and backward, not those of heads 0..n-1.
    from longswap.patterns.head_slice import HeadSlice

    total = 4
    g = torch.Generator().manual_seed(start)
    q, k, v = (torch.randn(1, total, 45, 8, generator=g, requires_grad=True) for _ in range(3))
    whole = sparse_attention(q, k, v, pattern, backend=backend, block_size=16)
    part = [x.detach()[:, start : start + heads].requires_grad_() for x in (q, k, v)]
    sliced = sparse_attention(
        *part, HeadSlice(pattern, start, total), backend=backend, block_size=16
    )
    torch.testing.assert_close(sliced, whole[:, start : start + heads])
    (whole[:, start : start + heads] ** 2).sum().backward()
    (sliced**2).sum().backward()
    for full_input, piece in zip((q, k, v), part, strict=True):
        torch.testing.assert_close(piece.grad, full_input.grad[:, start : start + heads])
    if pattern.head_dependent and start == 2:  # unsliced, head 2 would be run as head 0
        plain = sparse_attention(*part, pattern, backend=backend, block_size=16)
        assert not torch.allclose(plain, sliced)


def test_head_slice_refuses_heads_beyond_the_model():
    from longswap.patterns.head_slice import HeadSlice

    q = torch.randn(1, 3, 10, 8)
    with pytest.raises(ValueError, match="not all among the model's 4"):
        sparse_attention(q, q, q, HeadSlice(shifted_groups(4), 2, 4))
    with pytest.raises(ValueError, match="selects from the data"):
        HeadSlice(block_topk(8, 2), 0, 4)
