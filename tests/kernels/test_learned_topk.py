"""``learned_topk``: selection from given block scores, on every backend against the oracle."""

import math

import pytest
import torch

from longswap.kernels import cpp, sparse_attention
from longswap.patterns import BlockTopK, learned_topk, parse_pattern, sliding_window
from longswap.selectors import BlockGate, dense_block_mass
from longswap.selectors import gate as gate_module
from tests.kernels.test_band import inputs


def scores_for(q, k, pattern, seed=1):
    """Random per-KV-group block scores, as a selector would give."""
    g = torch.Generator().manual_seed(seed)
    n = k.shape[2] // pattern.block_size
    return torch.randn(q.shape[0], k.shape[1], q.shape[2], n, generator=g)


def run(q, k, v, pattern, backend, scores, mask=None):
    return sparse_attention(
        q, k, v, pattern, backend=backend, block_scores=scores, key_padding_mask=mask
    )


@pytest.mark.parametrize(
    ("batch", "heads", "q_len", "kv_len", "pattern", "padding"),
    [
        (2, (4, 2), 512, 512, learned_topk(64, 3), False),  # view path, groups of two
        (1, (6, 2), 320, 448, learned_topk(32, 4), False),  # decoding offset, cache
        (2, (4, 1), 300, 300, learned_topk(32, 2), True),  # padding: the tile path
        (1, (2, 2), 200, 200, learned_topk(64, 8), False),  # fewer blocks than top_k
        (1, (4, 2), 512, 512, sliding_window(96, sinks=4) | learned_topk(32, 3), False),
        (2, (4, 2), 300, 300, sliding_window(64, sinks=2) | learned_topk(32, 2), True),
    ],
    ids=str,
)
def test_blocks_equals_the_oracle_given_the_same_scores(
    batch, heads, q_len, kv_len, pattern, padding
):
    q, k, v = inputs(batch, *heads, q_len, kv_len)
    scores = scores_for(q, k, pattern)
    mask = None
    if padding:
        mask = torch.ones(batch, kv_len, dtype=torch.bool)
        mask[0, -37:] = False
    ref = run(q, k, v, pattern, "reference", scores, mask)
    out = run(q, k, v, pattern, "blocks", scores, mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    w = torch.randn_like(ref)
    for name, a, b in zip(
        "qkv",
        torch.autograd.grad((out * w).sum(), (q, k, v)),
        torch.autograd.grad((ref * w).sum(), (q, k, v)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m, n=name: f"d{n}: {m}")


def test_selection_follows_the_scores_and_is_shared_by_a_group():
    pattern = learned_topk(32, 2)
    q, k, _ = inputs(1, 4, 2, 256, 256)
    scores = torch.zeros(1, 2, 256, 8)
    scores[:, 0, :, 1] = 5.0  # group 0 prefers block 1, then (ties) the most recent
    scores[:, 1, :, 3] = 5.0
    selected = pattern.select(q, k, block_scores=scores)  # (B, Hq, Lq, n)
    assert torch.equal(selected[:, 0], selected[:, 1]) and torch.equal(
        selected[:, 2], selected[:, 3]
    )
    last = selected[0, :, -1]  # the last query (block 7) may pick blocks 0..6
    assert last[0].nonzero().flatten().tolist() == [1, 6]
    assert last[2].nonzero().flatten().tolist() == [3, 6]
    assert not selected[0, :, :32].any()  # the first block has nothing earlier to select
    causal = pattern.candidates(256, 256)
    assert not (selected[0] & ~causal).any()  # never its own block or a later one


def test_scores_are_required_and_checked():
    q, k, v = inputs(1, 2, 2, 128, 128)
    with pytest.raises(ValueError, match="learned selector"):
        sparse_attention(q, k, v, learned_topk(32, 2), backend="blocks")
    with pytest.raises(ValueError, match=r"block scores must be \(B, Hq or Hkv, Lq, n\)"):
        run(q, k, v, learned_topk(32, 2), "blocks", torch.zeros(1, 2, 128, 3))
    with pytest.raises(ValueError, match="selects no blocks"):
        run(q, k, v, "sliding_window(window=8)", "blocks", torch.zeros(1, 2, 128, 4))


@pytest.mark.parametrize("backend", ["reference", "blocks"])
def test_nan_scores_are_refused_unless_the_inputs_explain_them(backend):
    """A block scored NaN for finite inputs (a broken selector: NaN ranks first, so it
    would be selected): refused, with where; a NaN query row (or a NaN key of the block)
    makes the NaN an input's, and its rows NaN."""
    pattern = learned_topk(32, 2)
    q, k, v = (t.detach() for t in inputs(1, 4, 2, 128, 128))
    with pytest.raises(ValueError, match="block_scores hold NaN for finite queries and keys"):
        run(q, k, v, pattern, backend, torch.full((1, 2, 128, 4), float("nan")))
    scores = scores_for(q, k, pattern)
    scores[0, 1, 100, 2] = float("nan")
    with pytest.raises(ValueError, match=r"\(1 of 1024; first: batch 0, row 1, query 100, block 2"):
        run(q, k, v, pattern, backend, scores)
    q[0, 2, 100, 0] = float("nan")  # a query head of group 1, at that query
    k[0, 0, 40, 3] = float("nan")  # a key of block 1
    scores[0, :, 50:, 1] = float("nan")
    out = run(q, k, v, pattern, backend, scores)
    assert out[0, 2, 100].isnan().all()


def test_a_decoding_step_refuses_nan_scores_too():
    """One query row (the compiled decoding step on CPU) checks given scores as a prompt does."""
    pattern = learned_topk(32, 2)
    q, k, v = (t.detach() for t in inputs(1, 4, 2, 1, 128))
    with pytest.raises(ValueError, match="block_scores hold NaN for finite queries and keys"):
        run(q, k, v, pattern, "blocks", torch.full((1, 2, 1, 4), float("nan")))


@pytest.mark.flex
def test_flex_forward_equals_the_oracle_given_the_same_scores():
    pattern = learned_topk(64, 2)
    with torch.no_grad():
        q, k, v = (t.detach() for t in inputs(1, 4, 2, 384, 384))
        scores = scores_for(q, k, pattern)
        ref = run(q, k, v, pattern, "reference", scores)
        torch.testing.assert_close(run(q, k, v, pattern, "flex", scores), ref, atol=2e-5, rtol=2e-5)


def test_an_untrained_gate_scores_like_moba_on_the_best_head_of_the_group():
    q, k, _ = (t.detach() for t in inputs(2, 6, 2, 200, 200, dim=16))
    gate = BlockGate(head_dim=16, group=3, block_size=32)
    scores = gate.score(q, gate.block_keys(k))  # (B, Hkv, Lq, n), every block
    moba = BlockTopK.block_scores(BlockTopK(32, 1), q, k)  # (B, Hq, Lq, n), per head
    expected = moba.unflatten(1, (2, 3)).amax(2) / math.sqrt(16)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in gate.parameters()) == 3 * 16 * 16 + 3 * 16 * 16
    scores.sum().backward()  # the gate learns; its inputs are detached
    assert gate.query_map.grad is not None and q.grad is None
    # Per head: the same parameters, each head's scores kept apart (MoBA's, at the start).
    apart = BlockGate(head_dim=16, group=3, block_size=32, per_head=True)
    every = apart.score(q, apart.block_keys(k))
    torch.testing.assert_close(every, moba / math.sqrt(16), atol=1e-5, rtol=1e-5)


def test_a_gate_with_one_token_pieces_starts_as_dense_attentions_block_mass():
    """At ``sub_block=1`` an untrained gate's log-sum-exp over a block's keys is the log of
    dense attention's (unnormalised) mass on it: over the blocks wholly before a query, its
    softmax is the dense block mass, renormalised."""
    q, k, _ = (t.detach() for t in inputs(1, 4, 2, 96, 96, dim=16))
    block = 16
    gate = BlockGate(head_dim=16, group=2, block_size=block, per_head=True, sub_block=1)
    scores = gate(q, k)  # (B, Hq, Lq, n)
    mass = dense_block_mass(q, k, block, per_head=True)
    before = torch.arange(96)[:, None] // block > torch.arange(96 // block)[None]  # (Lq, n)
    rows = before.any(-1)
    expected = mass / mass.masked_fill(~before, 0).sum(-1, keepdim=True)
    got = scores.masked_fill(~before, float("-inf")).softmax(-1)
    torch.testing.assert_close(got[:, :, rows] * before[rows], expected[:, :, rows] * before[rows])
    # Pieces of 4: each piece's mean key, the block's score their log-sum-exp, max over heads.
    shared = BlockGate(head_dim=16, group=2, block_size=block, sub_block=4)
    pieces = k.unflatten(2, (-1, 4)).mean(3)  # (B, Hkv, 24, D)
    per_piece = q.unflatten(1, (2, 2)) @ pieces[:, :, None].transpose(-1, -2) / 4.0
    expected = per_piece.unflatten(-1, (-1, 4)).logsumexp(-1).amax(2)
    every = shared.score(q, shared.block_keys(k))
    torch.testing.assert_close(every, expected, atol=1e-5, rtol=1e-5)
    assert shared.block_keys(k).shape == (1, 2, 6, 4, 16)
    # The same parameters whatever the pieces: a trained gate keeps its size.
    assert sum(p.numel() for p in shared.parameters()) == sum(
        p.numel() for p in BlockGate(16, 2, block).parameters()
    )


def test_scoring_in_row_chunks_and_in_place_changes_nothing(monkeypatch):
    q, k, _ = (t.detach() for t in inputs(1, 4, 2, 70, 70, dim=16))
    gate = BlockGate(head_dim=16, group=2, block_size=16, sub_block=4)

    def every(q, k):
        return gate.score(q, gate.block_keys(k))

    whole = every(q, k)  # with gradients: logsumexp
    assert whole.requires_grad
    monkeypatch.setattr(gate_module, "SCORE_CHUNK", 4 * 4 * 4 * 3)  # 3 rows per chunk
    torch.testing.assert_close(every(q, k), whole)
    with torch.no_grad():  # in place, block by block
        torch.testing.assert_close(every(q, k), whole)
    # Fewer keys than a block (a short prompt): no block to score, in either path.
    assert gate(q[:, :, :5], k[:, :, :5]).shape == (1, 2, 5, 0)
    with torch.no_grad():
        assert gate(q[:, :, :5], k[:, :, :5]).shape == (1, 2, 5, 0)


@pytest.mark.parametrize("sub_block", [None, 4])
@pytest.mark.parametrize("per_head", [False, True])
def test_queries_at_the_end_of_the_keys_skip_the_blocks_they_cannot_select(
    monkeypatch, sub_block, per_head
):
    """With the rows' positions (an attention call), each chunk of rows scores only the
    blocks before its last row's own block; those scores and their gradients are the ones
    of scoring every block, the rest -inf."""
    q, k, _ = (t.detach() for t in inputs(1, 4, 2, 50, 90, dim=16))
    gate = BlockGate(16, 2, 16, per_head, sub_block or 16)
    every = gate.score(q, gate.block_keys(k))  # (B, H, 50, 5)
    monkeypatch.setattr(gate_module, "SCORE_CHUNK", 4 * 5 * 4 * 7)  # 7 or more rows a chunk
    skipping = gate(q, k)  # rows at positions 40..89
    assert skipping.shape == every.shape
    own = (torch.arange(40, 90) // 16)[:, None]  # (Lq, 1)
    before = torch.arange(5)[None] < own  # what each row may select
    torch.testing.assert_close(skipping[..., before], every[..., before])
    assert (skipping[..., ~before].isinf() | (every[..., ~before] == skipping[..., ~before])).all()
    assert skipping[..., 0, 4].isinf().all()  # after the chunk's last row's own block
    weights = torch.randn_like(every).masked_fill(~before, 0)
    (grad_every,) = torch.autograd.grad((every * weights).sum(), gate.query_map)
    (grad_skip,) = torch.autograd.grad(
        (skipping.masked_fill(~before, 0) * weights).sum(), gate.query_map
    )
    torch.testing.assert_close(grad_skip, grad_every)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("learned_topk(64, 8, sub_block=24)", "must divide block_size"),
        ("learned_topk(64, 8, sub_block=0)", "sub_block must be an integer >= 1"),
        ("learned_topk(64, 8, sub_block=2.0)", "sub_block must be an integer"),
        ("learned_topk(64, 0)", "top_k must be at least 1, got 0"),
    ],
)
def test_bad_sub_blocks_and_top_k_are_refused(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_pattern(text)


def test_sub_block_survives_the_string_form():
    pattern = parse_pattern("sliding_window(window=64) | learned_topk(16, 2, sub_block=4)")
    assert parse_pattern(str(pattern)) == pattern and pattern.sub_block == 4


@pytest.mark.parametrize("sub_block", [None, 4])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize(("hq", "hkv"), [(6, 2), (2, 2)])
def test_a_decoding_steps_gate_scores_are_one_compiled_call(sub_block, per_head, hq, hkv):
    """One query row without gradients: ``csrc/selection_decode.cpp`` scores the blocks,
    as the tensor path does (which runs whenever gradients are on)."""
    if cpp.compiled("selection_decode") is None:
        pytest.skip("the C++ decoding kernel could not be built here")
    q, k, _ = (t.detach() for t in inputs(2, hq, hkv, 1, 90, dim=16))
    gate = BlockGate(16, hq // hkv, 16, per_head, sub_block or 16)
    with torch.no_grad():
        gate.query_map.add_(0.3 * torch.randn_like(gate.query_map))  # not the identity
    keys = gate.block_keys(k)
    for offset in (None, 89, 40):
        expected = gate.score(q, keys, offset)  # gradients on: the tensor path
        with torch.no_grad():
            got = gate.score(q, keys, offset)
        assert got.shape == expected.shape == (2, hq if per_head else hkv, 1, 5)
        torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)
    q[0, 0] = float("nan")  # a NaN query: its head's (or its group's) scores are NaN
    with torch.no_grad():
        got = gate.score(q, keys)
    assert got[0, 0].isnan().all() and not got[1].isnan().any()
