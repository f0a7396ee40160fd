"""Decoding steps of selection patterns: only the static keys and selected blocks, exactly."""

import pytest
import torch

from longswap import sparse_attention
from longswap.kernels import cpp, decode
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


def test_auto_sends_long_decoding_steps_of_selections_to_the_decoding_path(monkeypatch):
    q, k, v = (t.detach() for t in inputs(1, 8192, heads=(2, 1)))
    assert resolve_backend("auto", q, k, v, block_topk(64, 4)) == "blocks"
    short = k[:, :, :512]
    built = cpp.compiled("selection_decode") is not None  # then one query: always the kernel
    assert resolve_backend("auto", q, short, short, block_topk(64, 4)) == (
        "blocks" if built else "reference"
    )
    q5 = torch.randn(2, 2, 5, 8)  # several query rows: the oracle is cheaper at this length
    assert resolve_backend("auto", q5, short, short, block_topk(64, 4)) == "reference"
    monkeypatch.setenv(cpp.SWITCH, "0")
    cpp.compiled.cache_clear()
    try:
        assert resolve_backend("auto", q, short, short, block_topk(64, 4)) == "reference"
    finally:
        cpp.compiled.cache_clear()


# -- the C++ decoding step (csrc/selection_decode.cpp), used without gradients on CPU ------


@pytest.fixture
def kernel():
    """The compiled decoding step; skips where it cannot be built."""
    ext = cpp.compiled("selection_decode")
    if ext is None:
        pytest.skip("the C++ decoding kernel could not be built here")
    return ext


def compiled_calls(monkeypatch):
    """Counts the calls the decoding path makes to the C++ step."""
    calls = []
    real = decode._compiled_one_query

    def counted(*args):
        calls.append(args[4])
        return real(*args)

    monkeypatch.setattr(decode, "_compiled_one_query", counted)
    return calls


@pytest.mark.parametrize(
    "pattern",
    [*PATTERNS, learned_topk(16, 3, per_head=True), sliding_window(40) | block_topk(16, 0)],
    ids=str,
)
@pytest.mark.parametrize("kv_len", [300, 17, 16, 15, 1, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_step_equals_the_oracle(kernel, monkeypatch, pattern, kv_len, dtype):
    calls = compiled_calls(monkeypatch)
    q, k, v = (t.detach().to(dtype) for t in inputs(1, kv_len))
    scores = scores_for(pattern, q, k)
    if scores is not None and pattern.per_head:
        scores = scores.repeat_interleave(3, 1) + torch.randn(2, 6, 1, kv_len // 16)
    with torch.no_grad():  # the decoding path itself: at short lengths `blocks` calls SDPA
        out = selection_decode(q, k, v, pattern, scale=8**-0.5, block_scores=scores)
    ref = sparse_attention(q, k, v, pattern, backend="reference", block_scores=scores)
    assert calls == [pattern]
    assert out.dtype == dtype
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def test_compiled_step_reads_a_cache_buffer_in_place(kernel, monkeypatch):
    calls = compiled_calls(monkeypatch)
    q, k, v = (t.detach() for t in inputs(1, 500))
    buffers = [torch.randn(2, 2, 700, 8) for _ in "kv"]  # a growing cache: filled part first
    for buffer, x in zip(buffers, (k, v), strict=True):
        buffer[:, :, :500] = x
    pattern = sliding_window(40, sinks=4) | block_topk(16, 3)
    with torch.no_grad():
        out = sparse_attention(q, *(b[:, :, :500] for b in buffers), pattern)
    torch.testing.assert_close(out, sparse_attention(q, k, v, pattern, backend="reference"))
    assert len(calls) == 1


@pytest.mark.parametrize("per_head", [False, True])
def test_compiled_step_breaks_ties_and_skips_blocks_as_the_oracle(kernel, per_head):
    # Equal scores: the more recent blocks win; -inf takes places but is not seen.
    pattern = learned_topk(16, 3, per_head=per_head)
    q, k, v = (t.detach() for t in inputs(1, 160))
    heads = 6 if per_head else 2
    scores = torch.zeros(2, heads, 1, 10)
    scores[0, :, 0, 2] = float("-inf")
    scores[1, :, 0, [1, 7]] = float("-inf")
    scores[1, 0, 0, :] = float("-inf")
    with torch.no_grad():
        out = sparse_attention(q, k, v, pattern, backend="blocks", block_scores=scores)
    ref = sparse_attention(q, k, v, pattern, backend="reference", block_scores=scores)
    torch.testing.assert_close(out, ref)


def test_compiled_step_keeps_nan_as_the_oracle(kernel):
    q, k, v = (t.detach() for t in inputs(1, 300))
    v[0, 1, 290] = float("nan")  # in the own block of every head of group 1, sequence 0
    with torch.no_grad():
        out = sparse_attention(q, k, v, block_topk(16, 3), backend="blocks")
    assert out[0, 3:].isnan().all() and not out[0, :3].isnan().any() and not out[1].isnan().any()


def test_gradients_and_switched_off_kernel_take_the_python_path(monkeypatch):
    calls = compiled_calls(monkeypatch)
    q, k, v = inputs(1, 300)
    pattern = block_topk(16, 3)
    ref = sparse_attention(q, k, v, pattern, backend="reference")
    torch.testing.assert_close(sparse_attention(q, k, v, pattern, backend="blocks"), ref)
    monkeypatch.setenv(cpp.SWITCH, "0")
    cpp.compiled.cache_clear()
    try:
        with torch.no_grad():
            out = sparse_attention(q, k, v, pattern, backend="blocks")
    finally:
        cpp.compiled.cache_clear()
    torch.testing.assert_close(out, ref)
    assert calls == []


def _step_args(**changes):
    """The C++ step's arguments, valid unless ``changes`` says otherwise."""
    args = {
        "q": torch.randn(1, 4, 8),
        "k": torch.randn(1, 2, 64, 8),
        "v": torch.randn(1, 2, 64, 8),
        "scores": torch.randn(1, 2, 4),
        "static_keys": torch.arange(48, 64),
        "candidates": torch.tensor([True, True, True, False]),
        "top_k": 2,
        "block_size": 16,
        "scale": 0.5,
    }
    return list((args | changes).values())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"q": torch.randn(1, 4, 8).double()}, "q must be contiguous float32"),
        ({"q": torch.randn(1, 3, 8)}, r"disagree"),
        ({"v": torch.randn(1, 2, 63, 8)}, "disagree"),
        ({"k": torch.randn(1, 2, 64, 8).transpose(2, 3)}, "rows must be contiguous"),
        ({"k": torch.randn(1, 2, 64, 8).int()}, "one dtype"),
        ({"scores": torch.randn(1, 3, 4)}, r"scores must be contiguous float32"),
        ({"scores": torch.randn(1, 2, 5)}, r"L / block_size"),
        ({"static_keys": torch.tensor([3, 2])}, "sorted, unique"),
        ({"static_keys": torch.tensor([64])}, r"within \[0, L\)"),
        ({"candidates": torch.ones(3, dtype=torch.bool)}, r"bool vector \(n,\)"),
        ({"block_size": 0}, "block_size > 0"),
    ],
)
def test_compiled_step_refuses_bad_arguments(kernel, changes, message):
    with pytest.raises(RuntimeError, match=message):
        kernel.selection_decode(*_step_args(**changes))
