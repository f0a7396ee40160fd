"""Every pattern x backend equals the dense reference, forward and gradients."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from longswap import sparse_attention
from longswap.kernels.blocks import blocks_attention
from longswap.kernels.cpp import compiled
from longswap.kernels.reference import dense_pattern_mask
from longswap.patterns import (
    bigbird,
    block_topk,
    dilated,
    full,
    local_global,
    shifted_groups,
    sliding_window,
)

PATTERNS = [
    full(),
    sliding_window(40, sinks=4),
    dilated(8, 5),
    local_global(24, [0, 3, 130, 700]),
    bigbird(32, 1, 1, 2, seed=1),
    shifted_groups(64),
    block_topk(32, 3),
    sliding_window(16) | dilated(4, 40),
    sliding_window(40, sinks=4) | block_topk(32, 3),
]

shapes = st.fixed_dictionaries(
    {
        "q_len": st.sampled_from([1, 2, 63, 127, 129, 200, 1000]),
        "extra": st.sampled_from([0, 0, 1, 37]),
        "heads": st.sampled_from([(2, 2), (4, 2), (4, 1)]),
        "block": st.sampled_from([16, 32, 128]),
        "dim": st.sampled_from([8, 16]),
        "batch": st.integers(1, 2),
        "padding": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


def make_inputs(s, dtype=torch.float32, grad=True):
    g = torch.Generator().manual_seed(s["seed"])
    hq, hkv = s["heads"]
    kv_len = s["q_len"] + s["extra"]

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)

    q = rand(s["batch"], hq, s["q_len"], s["dim"])
    k, v = rand(s["batch"], hkv, kv_len, s["dim"]), rand(s["batch"], hkv, kv_len, s["dim"])
    mask = None
    if s["padding"]:
        mask = torch.rand(s["batch"], kv_len, generator=g) > 0.2
        mask[0, : kv_len // 3] = False  # left padding on the first row
    return q, k, v, mask


def assert_matches_reference(pattern, q, k, v, mask, atol, **kwargs):
    ref = sparse_attention(q, k, v, pattern, backend="reference", key_padding_mask=mask)
    out = blocks_attention(q, k, v, pattern, q.shape[-1] ** -0.5, mask, **kwargs)
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
    w = torch.randn_like(ref)
    grads_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@given(s=shapes)
def test_blocks_equals_reference(pattern, s):
    q, k, v, mask = make_inputs(s)
    assert_matches_reference(pattern, q, k, v, mask, 2e-5, block_size=s["block"])


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@given(s=shapes)
def test_blocks_portable_kernels_equal_reference(pattern, s):
    """The plain-torch tile kernels (used off CPU) against the oracle, run here on CPU."""
    q, k, v, mask = make_inputs(s)
    assert_matches_reference(pattern, q, k, v, mask, 2e-5, block_size=s["block"], force_math=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", [sliding_window(30, sinks=2), block_topk(16, 2)], ids=str)
def test_low_precision(pattern, dtype):
    s = {
        "q_len": 150,
        "extra": 10,
        "heads": (4, 2),
        "block": 32,
        "dim": 16,
        "batch": 2,
        "padding": True,
        "seed": 3,
    }
    q, k, v, mask = make_inputs(s, dtype)
    out = sparse_attention(q, k, v, pattern, backend="blocks", key_padding_mask=mask, block_size=32)
    assert out.dtype == dtype
    ref = sparse_attention(q, k, v, pattern, backend="reference", key_padding_mask=mask)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("backend", ["reference", "blocks"])
def test_covering_pattern_equals_causal_sdpa(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 16) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for pattern in [full(), sliding_window(300), sliding_window(5, sinks=300), dilated(300, 1)]:
        out = sparse_attention(q, k, v, pattern, backend=backend, block_size=64)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "blocks"])
def test_rows_without_keys_are_zero_not_nan(backend):
    q, k, v = (torch.randn(1, 2, 20, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[0, :10] = False  # queries 0..9 see only padding under a window of 3
    out = sparse_attention(
        q, k, v, sliding_window(3), backend=backend, key_padding_mask=mask, block_size=8
    )
    assert torch.equal(out[0, :, :10], torch.zeros(2, 10, 8))
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.equal(q.grad[0, :, :10], torch.zeros(2, 10, 8))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_decoding_rows_match_the_full_computation():
    """Lq < Lk: the last queries of a prefill equal the same queries against a KV cache."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 500, 16), torch.randn(1, 2, 500, 16), torch.randn(1, 2, 500, 16)
    for pattern in [sliding_window(64, sinks=4), bigbird(32, 1, 1, 2), block_topk(32, 2)]:
        whole = sparse_attention(q, k, v, pattern, backend="blocks", block_size=64)
        tail = sparse_attention(q[:, :, -3:], k, v, pattern, backend="blocks", block_size=64)
        torch.testing.assert_close(tail, whole[:, :, -3:], atol=1e-5, rtol=1e-5)


@pytest.mark.flex
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_flex_forward_equals_reference(pattern):
    s = {
        "q_len": 200,
        "extra": 37,
        "heads": (4, 2),
        "block": 128,
        "dim": 16,
        "batch": 2,
        "padding": True,
        "seed": 5,
    }
    q, k, v, mask = make_inputs(s, grad=False)
    ref = sparse_attention(q, k, v, pattern, backend="reference", key_padding_mask=mask)
    out = sparse_attention(q, k, v, pattern, backend="flex", key_padding_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flex_refuses_gradients_on_cpu():
    q, k, v = (torch.randn(1, 1, 8, 8, requires_grad=True) for _ in range(3))
    with pytest.raises(ValueError, match="backend='blocks'"):
        sparse_attention(q, k, v, full(), backend="flex")


def test_auto_trains_with_blocks_on_cpu():
    q, k, v = (torch.randn(1, 2, 40, 8, requires_grad=True) for _ in range(3))
    out = sparse_attention(q, k, v, "sliding_window(window=8)")
    ref = sparse_attention(q, k, v, sliding_window(8), backend="reference")
    torch.testing.assert_close(out, ref)


def test_pattern_string_is_accepted():
    q = torch.randn(1, 2, 10, 8)
    a = sparse_attention(q, q, q, "dilated(window=3, dilation=2)", backend="blocks")
    b = sparse_attention(q, q, q, dilated(3, 2), backend="reference")
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("q", "k", "v", "kwargs", "message"),
    [
        ((2, 4, 8), (2, 4, 8), (2, 4, 8), {}, r"4 dimensions.*q \(2, 4, 8\)"),
        ((1, 3, 8, 8), (1, 2, 8, 8), (1, 2, 8, 8), {}, r"multiple of key/value heads \(2\)"),
        ((1, 2, 9, 8), (1, 2, 8, 8), (1, 2, 8, 8), {}, r"Lq \(9\) must not exceed Lk \(8\)"),
        ((1, 2, 8, 8), (1, 2, 8, 8), (1, 2, 7, 8), {}, r"k and v must agree"),
        ((1, 2, 8, 8), (1, 2, 8, 4), (1, 2, 8, 4), {}, r"agree on batch B and head dim D"),
        (
            (1, 2, 8, 8),
            (1, 2, 8, 8),
            (1, 2, 8, 8),
            {"backend": "dense"},
            r"unknown backend 'dense'",
        ),
        ((1, 2, 8, 8), (1, 2, 8, 8), (1, 2, 8, 8), {"scale": 0.0}, r"scale must be a finite"),
        ((1, 2, 8, 8), (1, 2, 8, 8), (1, 2, 8, 8), {"block_size": 0}, r"block_size must be"),
        (
            (1, 2, 8, 8),
            (1, 2, 8, 8),
            (1, 2, 8, 8),
            {"key_padding_mask": torch.ones(1, 7)},
            r"key_padding_mask must be a bool tensor \(B, Lk\) = \(1, 8\)",
        ),
    ],
)
def test_bad_inputs(q, k, v, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sparse_attention(torch.randn(*q), torch.randn(*k), torch.randn(*v), full(), **kwargs)


def test_dtype_mismatch_is_reported_with_shapes():
    q = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match=r"one dtype.*torch.float32, torch.float64"):
        sparse_attention(q, q.double(), q, full())


def test_per_head_pattern_with_odd_heads_equals_reference_and_one_head_is_refused():
    torch.manual_seed(0)
    q, k = torch.randn(1, 9, 300, 16), torch.randn(1, 3, 300, 16)
    ref = sparse_attention(q, k, k, shifted_groups(64), backend="reference")
    out = sparse_attention(q, k, k, shifted_groups(64), backend="blocks")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    one = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="num_heads must be an integer >= 2, got 1"):
        sparse_attention(one, one, one, shifted_groups(4))


def test_auto_choice():
    from longswap.kernels import resolve_backend

    small = torch.randn(1, 2, 4, 8)
    big = torch.randn(1, 2, 2048, 8)
    step = torch.randn(1, 2, 1, 8)
    assert resolve_backend("auto", small, small, small) == "reference"
    assert resolve_backend("auto", big, big, big) == "blocks"
    assert resolve_backend("auto", step, big, big) == "reference"  # a decoding step
    prompt = torch.randn(1, 2, 256, 8)
    assert resolve_backend("auto", prompt, prompt, prompt) == "blocks"
    assert resolve_backend("auto", small.requires_grad_(), small, small) == "blocks"
    with torch.no_grad():
        assert resolve_backend("auto", small, small, small) == "reference"
    # Decoding steps: the window kernel (sliding and dilated windows) reads only the
    # window, from the first step on;
    # a band pattern reads only its reach; tiles are rebuilt at every length.
    keys_512, keys_8k = torch.randn(1, 2, 512, 8), torch.randn(1, 2, 8192, 8)
    keys_64k = torch.randn(1, 2, 1 << 16, 8)
    window_sinks = sliding_window(64, sinks=4)
    assert resolve_backend("auto", step, keys_512, keys_512, window_sinks) == "blocks"
    with torch.no_grad():  # four queries: the kernel still beats the oracle
        assert resolve_backend("auto", small, small, small, sliding_window(64)) == "blocks"
    band = sliding_window(16) | dilated(4, 40)
    assert resolve_backend("auto", step, keys_512, keys_512, band) == "reference"
    assert resolve_backend("auto", step, keys_8k, keys_8k, band) == "blocks"
    # With padding the kernel does not apply: sinks need tiles, rebuilt at every length.
    assert resolve_backend("auto", step, keys_8k, keys_8k, window_sinks, False) == "reference"
    assert resolve_backend("auto", step, keys_64k, keys_64k, window_sinks, False) == "blocks"
    # Selections decode from their selected blocks (kernels/decode.py), without padding.
    assert resolve_backend("auto", step, keys_8k, keys_8k, block_topk(128, 4)) == "blocks"
    keys_1k = torch.randn(1, 2, 1024, 8)
    short = "blocks" if compiled("selection_decode") is not None else "reference"
    assert resolve_backend("auto", step, keys_1k, keys_1k, block_topk(128, 4)) == short  # C++
    # A pattern that is dense at this length (four places, four blocks) runs SDPA's kernel.
    assert resolve_backend("auto", step, keys_512, keys_512, block_topk(128, 4)) == "blocks"
    topk = block_topk(128, 4)
    assert resolve_backend("auto", step, keys_8k, keys_8k, topk, False) == "reference"
    # Prompts: block selection has more to set up than a static pattern.
    prompt_128 = torch.randn(1, 2, 128, 8)
    assert resolve_backend("auto", prompt_128, prompt_128, prompt_128, block_topk(16, 2)) == (
        "reference"
    )
    assert resolve_backend("auto", prompt_128, prompt_128, prompt_128, window_sinks) == "blocks"
    with torch.no_grad():  # bfloat16 runs the window kernel too; float16 has none
        keys = prompt_128.bfloat16()  # longer than the window and sinks: not dense
        assert resolve_backend("auto", small.bfloat16(), keys, keys, window_sinks) == "blocks"
        keys = prompt_128.half()
        assert resolve_backend("auto", small.half(), keys, keys, window_sinks) == "reference"
        # Dense at this length (4 keys inside the window): SDPA's kernel, through blocks.
        assert resolve_backend("auto", small.bfloat16(), small, small, window_sinks) == "blocks"


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("q_len", [150, 3])
def test_documents_keep_attention_inside(pattern, q_len):
    g = torch.Generator().manual_seed(7)
    kv_len = 150
    q = torch.randn(2, 4, q_len, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, kv_len, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 2, kv_len, 16, generator=g, requires_grad=True)
    docs = torch.cumsum(torch.rand(2, kv_len, generator=g) < 0.03, dim=1)
    ref = sparse_attention(q, k, v, pattern, backend="reference", document_ids=docs)
    out = sparse_attention(q, k, v, pattern, backend="blocks", document_ids=docs, block_size=32)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    # The first document's queries ignore everything after it.
    first_end = int((docs[0] == docs[0, 0]).sum())
    if q_len == kv_len and first_end < kv_len:
        k2 = k.detach().clone()
        k2[0, :, first_end:] += 1.0
        again = sparse_attention(
            q.detach(), k2, v.detach(), pattern, backend="blocks", document_ids=docs, block_size=32
        )
        torch.testing.assert_close(again[0, :, :first_end], out.detach()[0, :, :first_end])


@pytest.mark.flex
def test_flex_documents():
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 200, 16, generator=g) for _ in range(3))
    docs = torch.cumsum(torch.rand(1, 200, generator=g) < 0.02, dim=1)
    pattern = sliding_window(40, sinks=2)
    ref = sparse_attention(q, k, v, pattern, backend="reference", document_ids=docs)
    out = sparse_attention(q, k, v, pattern, backend="flex", document_ids=docs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bad_document_ids():
    q = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match=r"document_ids must be an integer tensor \(B, Lk\)"):
        sparse_attention(q, q, q, full(), document_ids=torch.zeros(1, 7, dtype=torch.long))


def nan_inputs(pattern, heads=(4, 2), length=150):
    """Inputs with one NaN in a query row, a key and a value, and the rows that must be NaN:
    the one whose query holds it and every row that sees the NaN key or value."""
    g = torch.Generator().manual_seed(11)
    hq, hkv = heads
    q = torch.randn(2, hq, length, 16, generator=g)
    k, v = (torch.randn(2, hkv, length, 16, generator=g) for _ in range(2))
    q[0, 1, 20, 3] = k[1, 0, 60, 0] = v[0, 1, 100, 5] = float("nan")
    sees = dense_pattern_mask(q, k, pattern).expand(2, hq, length, length)
    group = torch.arange(hq) // (hq // hkv)
    must = torch.zeros(2, hq, length, dtype=torch.bool)
    must[0, 1, 20] = True
    must[1] |= sees[1, :, :, 60] & (group == 0)[:, None]
    must[0] |= sees[0, :, :, 100] & (group == 1)[:, None]
    return q, k, v, must


NAN_PATTERNS = [sliding_window(40, sinks=4), dilated(8, 5), bigbird(32, 1, 1, 2, seed=1)]
NAN_PATTERNS += [sliding_window(16) | dilated(4, 40), block_topk(32, 3)]
NAN_PATTERNS += [sliding_window(40, sinks=4) | block_topk(32, 3)]


@pytest.mark.parametrize("pattern", NAN_PATTERNS, ids=str)
@pytest.mark.parametrize("backend", ["reference", "blocks"])
def test_nan_reaches_every_row_that_sees_it(pattern, backend):
    """One NaN policy: a row whose query, or a key or value it sees, holds a NaN holds NaN
    (a NaN value may stay in its own column)."""
    q, k, v, must = nan_inputs(pattern)
    out = sparse_attention(q, k, v, pattern, backend=backend, block_size=32)
    assert out.isnan().any(-1)[must].all()
    assert not out.isnan().any(-1).all()  # rows far from every NaN stay numbers


TILED_NAN_PATTERNS = [
    sliding_window(24),
    local_global(24, [0, 3, 90]),
    bigbird(16, 1, 1, 2, seed=1),
    block_topk(16, 3),
]


@pytest.mark.parametrize("pattern", TILED_NAN_PATTERNS, ids=str)
@pytest.mark.parametrize("where", ["key", "value"])
@pytest.mark.parametrize("padding", ["none", "all kept", "some dropped"])
@pytest.mark.parametrize("force_math", [False, True], ids=["cpu kernels", "portable kernels"])
def test_a_nan_in_a_tile_reaches_only_the_rows_that_see_it(pattern, where, padding, force_math):
    """Through the tiles (static tiles, padding, selected blocks) and the C++ window and
    selection kernels, a NaN key or value makes exactly the rows that see it NaN, as on the
    oracle; rows that share its tiles without
    seeing it stay equal to the oracle (which spreads a NaN value to its column in every
    row of its KV head: compared elsewhere)."""
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 4, 130, 16, generator=g)
    k, v = (torch.randn(2, 2, 130, 16, generator=g) for _ in "kv")
    (k if where == "key" else v)[0, 1, 32, 5] = float("nan")
    mask = None if padding == "none" else torch.ones(2, 130, dtype=torch.bool)
    if padding == "some dropped":
        mask[:, 100:110] = mask[0, 33] = False
    sees = dense_pattern_mask(q, k, pattern, mask).expand(2, 4, 130, 130)[..., 32].clone()
    sees[1], sees[0, :2] = False, False  # batch 0, KV head 1 (query heads 2 and 3)
    ref = sparse_attention(q, k, v, pattern, backend="reference", key_padding_mask=mask)
    out = blocks_attention(q, k, v, pattern, 0.25, mask, block_size=16, force_math=force_math)
    assert torch.equal(out.isnan().any(-1), sees)
    if where == "key":
        assert torch.equal(ref.isnan().any(-1), sees)
    else:
        head = torch.zeros_like(sees)
        head[0, 2:] = True
        assert torch.equal(ref[..., 5].isnan(), head)
        ref = torch.cat([ref[..., :5], ref[..., 6:]], -1)
        out = torch.cat([out[..., :5], out[..., 6:]], -1)
    assert sees.any() and not sees.all()
    torch.testing.assert_close(out[~sees], ref[~sees], atol=1e-5, rtol=1e-5)


@pytest.mark.flex
@pytest.mark.parametrize("pattern", [sliding_window(40, sinks=4), block_topk(32, 3)], ids=str)
def test_flex_propagates_nan_like_the_other_backends(pattern):
    """FlexAttention's kernel drops NaN scores (zeros for a NaN query, NaN keys skipped);
    the backend restores the policy."""
    q, k, v, must = nan_inputs(pattern)
    out = sparse_attention(q, k, v, pattern, backend="flex")
    assert out.isnan().any(-1)[must].all()
    ref = sparse_attention(q, k, v, pattern, backend="reference")
    clean = ~(out.isnan() | ref.isnan()).any(-1)  # the oracle spreads a NaN value further
    assert clean.any()
    torch.testing.assert_close(out[clean], ref[clean], atol=1e-5, rtol=1e-5)


@pytest.mark.flex
@pytest.mark.parametrize(
    ("pattern", "heads", "q_len", "kv_len"),
    [(sliding_window(40, sinks=4), (4, 2), 200, 237), (dilated(8, 5), (2, 2), 1, 130)],
    ids=str,
)
def test_flex_without_masks_equals_reference(pattern, heads, q_len, kv_len):
    """The path ``auto`` takes on CUDA: no padding, no documents, a cached BlockMask."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, heads[0], q_len, 16, generator=g)
    k, v = (torch.randn(1, heads[1], kv_len, 16, generator=g) for _ in range(2))
    out = sparse_attention(q, k, v, pattern, backend="flex")
    ref = sparse_attention(q, k, v, pattern, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), -1.0, 0, True, "0.5"])
def test_scale_must_be_finite_and_positive(scale, monkeypatch):
    """Checked before any backend runs (none is reached)."""
    from longswap.kernels import api

    def unreachable(*args, **kwargs):
        raise AssertionError("a backend ran")

    for name in ("reference_attention", "blocks_attention", "flex_attention_backend"):
        monkeypatch.setattr(api, name, unreachable)
    q = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        sparse_attention(q, q, q, full(), scale=scale)


def test_recompile_limit_setting_is_optional():
    """The dynamo setting has two names across torch releases, and may be missing."""
    from types import SimpleNamespace

    from longswap.kernels.flex import _raise_recompile_limit

    new, old, neither = (
        SimpleNamespace(recompile_limit=8),
        SimpleNamespace(cache_size_limit=8),
        SimpleNamespace(),
    )
    for config in (new, old, neither):
        _raise_recompile_limit(config, 64)
    assert (new.recompile_limit, old.cache_size_limit, vars(neither)) == (64, 64, {})
