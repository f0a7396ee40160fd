"""One top-k rule for every path that selects key blocks: the pure-PyTorch rule
(``top_places``), the compiled prompt top-k, the decoding steps (compiled and pure) and the
learned gate's scorers, on ties, NaN and infinite scores, per head and per KV group."""

import pytest
import torch

from longswap import sparse_attention
from longswap.kernels import cpp, selection_cpu
from longswap.patterns import block_topk, learned_topk, sliding_window
from longswap.patterns.block_topk import top_places
from longswap.selectors import BlockGate
from longswap.selectors.distill import top_blocks

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def kernels():
    if cpp.compiled("selection_attention") is None or cpp.compiled("selection_decode") is None:
        pytest.skip("the C++ selection kernels could not be built here")


def test_the_rule_on_one_row(kernels):
    """NaN first (the more recent NaN ahead), then by score, ties to the more recent block
    (-0 ties with +0); -inf and blocks a query may not select fill the last places, never
    chosen."""
    scores = torch.tensor([[[NAN, 1.0, -INF, 0.5, 2.0, 1.0, NAN, -0.0, 0.0, 5.0]]])
    valid = torch.ones(1, 10, dtype=torch.bool)
    valid[0, 9] = False
    order = [6, 0, 4, 5, 1, 3, 8, 7, 2, 9]
    for places in range(1, 11):
        for top in (top_places, selection_cpu.top_blocks):
            blocks, chosen = top(scores, valid, places)
            assert blocks[0, 0].tolist() == order[:places]
            assert chosen[0, 0].tolist() == [i < 8 for i in range(places)]


@pytest.mark.parametrize("places", [1, 4, 29, 30])
def test_compiled_top_k_equals_the_rule(kernels, places):
    """Same blocks in the same places, chosen or not, on ties, NaN and infinities."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(-2, 3, (2, 3, 200, 30), generator=g).float()
    special = torch.rand(scores.shape, generator=g)
    scores[special < 0.1] = NAN
    scores[(special > 0.1) & (special < 0.3)] = -INF
    scores[special > 0.95] = INF
    valid = torch.rand(200, 30, generator=g) < 0.7
    ours = selection_cpu.top_blocks(scores, valid, places)
    theirs = top_places(scores, valid, places)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    distinct = ours[0].sort(-1).values  # so that `chosen` can be scattered by `blocks`
    assert (distinct[..., 1:] != distinct[..., :-1]).all()


def _case(pattern):
    """Inputs with a NaN key in block 2 of KV head 1 (sequence 0), scores with ties and
    -inf (NaN for that block and group: the key explains them), and the rows that must be
    NaN: every row of group 1 that sees the key or may select its block (positions 32 on)."""
    g = torch.Generator().manual_seed(3)
    hq, hkv, length = 4, 2, 160
    q = torch.randn(2, hq, length, 16, generator=g)
    k, v = (torch.randn(2, hkv, length, 16, generator=g) for _ in "kv")
    k[0, 1, 32, 5] = NAN
    scores = None
    if pattern.needs_selector:
        rows = hq if pattern.per_head else hkv
        scores = torch.randint(0, 3, (2, rows, length, 10), generator=g).float()
        scores[torch.rand(scores.shape, generator=g) < 0.2] = -INF
        scores[0, rows // 2 :, :, 2] = NAN
    else:
        k[:, :, 64:80] = k[:, :, 16:32]  # blocks 1 and 4: equal mean keys, tied scores
    must = torch.zeros(2, hq, length, dtype=torch.bool)
    must[0, 2:, 32:] = True
    return q, k, v, scores, must


RULE_PATTERNS = [
    block_topk(16, 3),
    learned_topk(16, 3),
    learned_topk(16, 3, per_head=True),
    sliding_window(24, sinks=2) | learned_topk(16, 3),
]


@pytest.mark.parametrize("pattern", RULE_PATTERNS, ids=str)
def test_every_path_selects_as_the_oracle(kernels, pattern):
    """The oracle, the compiled prompt kernel, the pure tiles (a padding mask that keeps
    every key), and decoding steps (compiled, and pure with gradients) give the same rows; a
    NaN score is selected, so every row that may select the NaN key's block holds NaN."""
    q, k, v, scores, must = _case(pattern)
    ref = sparse_attention(q, k, v, pattern, backend="reference", block_scores=scores)
    assert torch.equal(ref.isnan().any(-1), must)
    out = sparse_attention(q, k, v, pattern, backend="blocks", block_scores=scores)
    torch.testing.assert_close(out, ref, equal_nan=True)
    keep = torch.ones(2, k.shape[2], dtype=torch.bool)
    out = sparse_attention(
        q, k, v, pattern, backend="blocks", block_scores=scores, key_padding_mask=keep
    )
    torch.testing.assert_close(out, ref, equal_nan=True)
    for i in (63, 64, 100, 159):  # rows past the lengths the pattern covers (dense there)
        n = (i + 1) // 16
        step = (q[:, :, i : i + 1], k[:, :, : i + 1], v[:, :, : i + 1])
        given = None if scores is None else scores[:, :, i : i + 1, :n]
        with torch.no_grad():
            compiled = sparse_attention(*step, pattern, backend="blocks", block_scores=given)
        pure = sparse_attention(
            step[0].requires_grad_(), *step[1:], pattern, backend="blocks", block_scores=given
        )
        for name, out in (("compiled step", compiled), ("pure step", pure.detach())):
            where = f"{name} at {i}"
            torch.testing.assert_close(
                out[:, :, 0], ref[:, :, i], equal_nan=True, msg=lambda m, n=where: f"{n}: {m}"
            )


@pytest.mark.parametrize("per_head", [False, True], ids=["per-group", "per-head"])
def test_gate_scorers_follow_one_rule(kernels, per_head):
    """Every scorer of a gate with pieces gives a block the log-sum-exp of its pieces
    (torch.logsumexp: -inf when all are -inf, +inf when one is, NaN when one is NaN, that
    block only), then the max over the group's heads (NaN wins)."""
    gate = BlockGate(16, 2, 16, per_head=per_head, sub_block=4)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 40, 16, generator=g)
    q[..., 0] = q[..., 0].abs() + 0.5  # mapped queries (identity map) point along axis 0
    keys = gate.block_keys(torch.randn(1, 2, 96, 16, generator=g)).detach()  # (1, 2, 6, 4, 16)
    keys[0, 1, 2, :, 0] = -INF  # every piece of block 2, KV head 1: -inf
    keys[0, 0, 3, 1, 0] = INF  # one piece of block 3, KV head 0: +inf
    keys[0, 1, 4, 2, 5] = NAN  # one piece of block 4, KV head 1: NaN
    expected = gate.score(q, keys, offset=56).detach()  # with gradients: torch.logsumexp
    one, zero = (slice(2, 4), slice(0, 2)) if per_head else (1, 0)  # rows of KV heads 1, 0
    assert (expected[0, one, :, 2] == -INF).all() and (expected[0, zero, :, 3] == INF).all()
    assert expected[0, one, :, 4].isnan().all()
    assert expected.isnan().sum() == expected[0, one, :, 4].numel()  # that block alone
    can_select = torch.arange(6)[None] < (torch.arange(56, 96) // 16)[:, None]  # (Lq, n)
    with torch.no_grad():
        fused = gate.score(q, keys, offset=56)
        pure = gate.score(q, keys)  # rows anywhere: the tensor path, in place
        step = gate.score(q[:, :, -1:], keys, offset=95)  # a decoding step: compiled
        assert gate._prompt_kernel(q, 56) is not None
    for name, got in (("fused", fused), ("in place", pure)):
        torch.testing.assert_close(
            got[..., can_select],
            expected[..., can_select],
            equal_nan=True,
            msg=lambda m, n=name: f"{n}: {m}",
        )
    torch.testing.assert_close(step, expected[:, :, -1:], equal_nan=True)


def test_a_nan_key_leaves_the_fused_gates_other_blocks_alone(kernels):
    """The fused prompt scorer makes only the NaN key's block NaN, so its scores are taken
    (the key explains them) and the NaN reaches exactly the rows that may select it."""
    pattern = learned_topk(16, 2, sub_block=4)
    gate = BlockGate(16, 2, 16, sub_block=4)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 96, 16, generator=g)
    k, v = (torch.randn(1, 2, 96, 16, generator=g) for _ in "kv")
    k[0, 1, 40, 3] = NAN
    with torch.no_grad():
        scores = gate(q, k)
    nan_blocks = scores.isnan().any(2)[0]  # (Hkv, n)
    assert nan_blocks[1, 2] and nan_blocks.sum() == 1
    for backend in ("reference", "blocks"):
        out = sparse_attention(q, k, v, pattern, backend=backend, block_scores=scores)
        assert out.isnan().any(-1)[0, 2:, 40:].all()
        assert not out.isnan()[0, :2].any() and not out.isnan()[0, 2:, :40].any()


@pytest.mark.parametrize("padding", [False, True], ids=["own-block view", "tiles"])
def test_top_k_gradients_add_up_in_float32(padding):
    """bfloat16 through the own-block view path, and through the tiles (a padding mask that
    keeps every key): the query gradient of row 63 is its own block's 1 plus +256 and -256
    from two selected blocks (exact in bfloat16), in whatever order the parts arrive; an
    addition in bfloat16 loses the 1 (257 rounds to 256)."""
    q = torch.zeros(1, 1, 64, 16)
    k, v = torch.zeros(1, 1, 64, 16), torch.zeros(1, 1, 64, 16)
    q[0, 0, 63, 0] = 16.0
    hot = [0, 16, 48, 49]  # the keys row 63 attends (score 256, the others 0): p = 1/4 each
    k[0, 0, hot, 0] = 16.0
    v[0, 0, hot, 0] = torch.tensor([4.0, -4.0, 4.0, -4.0])  # dq = k0 - k16 + k48 - k49
    k[0, 0, [0, 16], 1] = 256.0  # blocks 0 and 1: +256 and -256 along axis 1
    k[0, 0, [0, 16], 2] = -256.0  # and -256 and +256 along axis 2
    k[0, 0, 48, 1:3] = 1.0  # the own block: 1 along both
    q, k, v = (x.bfloat16().requires_grad_() for x in (q, k, v))
    w = torch.zeros(1, 1, 64, 16, dtype=torch.bfloat16)
    w[0, 0, 63, 0] = 1.0
    keep = torch.ones(1, 64, dtype=torch.bool) if padding else None
    out = sparse_attention(
        q, k, v, block_topk(16, 2), backend="blocks", scale=1.0, key_padding_mask=keep
    )
    (grad,) = torch.autograd.grad((out * w).sum(), q)
    assert grad[0, 0, 63, :3].tolist() == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("pattern", [block_topk(16, 3), learned_topk(16, 3)], ids=str)
@pytest.mark.parametrize("backend", ["blocks", "auto"])
def test_given_scores_count_where_the_pattern_covers_the_keys(pattern, backend):
    """At a length where ``top_k`` places hold every complete block the pattern is dense,
    unless given scores leave a block out: a block scored -inf stays unseen, as on the
    oracle, for a prompt and a decoding step, with and without gradients."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 60, 16, generator=g)
    k, v = (torch.randn(1, 2, 60, 16, generator=g) for _ in "kv")
    assert pattern.covers(60)
    scores = torch.randn(1, 4, 60, 3, generator=g)
    scores[..., 1] = -INF  # block 1 is never selected
    for rows in (slice(None), slice(59, 60)):
        case = (q[:, :, rows], k, v, pattern)
        given = {"block_scores": scores[:, :, rows]}
        ref = sparse_attention(*case, backend="reference", **given)
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                out = sparse_attention(
                    case[0].clone().requires_grad_(grad), *case[1:], backend=backend, **given
                )
            torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=1e-5)
        everything = sparse_attention(
            *case, backend="reference", block_scores=torch.zeros_like(given["block_scores"])
        )
        assert (ref - everything).abs().amax() > 1e-2  # the -inf block mattered


def test_distillation_selects_by_the_rule():
    """The selection that training and evaluation score (``distill.top_blocks``) is the one
    the kernels make: NaN selected first, ties to the more recent block, -inf and blocks a
    query may not select never chosen."""
    pattern = learned_topk(16, 3)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 96, 16, generator=g)
    k = torch.randn(1, 2, 96, 16, generator=g)
    k[0, 1, 40, 3] = NAN  # explains NaN scores of block 2 for KV group 1
    scores = torch.randint(-2, 3, (1, 2, 96, 6), generator=g).float()
    scores[torch.rand(scores.shape, generator=g) < 0.2] = -INF
    scores[0, 1, :, 2] = NAN
    candidates = pattern.candidates(96, 96)
    kernels = pattern.select(q, k, block_scores=scores)  # (1, Hq, Lq, n)
    for places in (0, 3, 9):
        selected = top_blocks(scores, candidates, places)
        if places == 3:
            assert torch.equal(selected.repeat_interleave(2, dim=1), kernels)
        blocks, chosen = top_places(scores, candidates, min(places, 6))
        expected = torch.zeros(scores.shape, dtype=torch.bool).scatter_(-1, blocks, chosen)
        assert torch.equal(selected, expected)
    row = torch.tensor([[[[NAN, 1.0, 1.0, -INF, 0.5]]]])
    assert top_blocks(row, torch.ones(1, 5, dtype=torch.bool), 2).tolist() == [
        [[[True, False, True, False, False]]]
    ]
