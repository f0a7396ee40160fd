"""Soft-capping (Gemma 2) and learned sinks (gpt-oss) on every backend and pattern kind:
the oracle equals the families' own eager formula; every backend equals the oracle,
outputs and gradients (the sinks' included)."""

import pytest
import torch
from hypothesis import given, settings

from longswap import sparse_attention
from longswap.kernels.blocks import blocks_attention
from longswap.patterns import full, sliding_window
from tests.kernels.test_backends import PATTERNS, make_inputs, shapes

TERMS = {
    "softcap": {"softcap": 2.5},
    "sinks": {"sinks": True},
    "both": {"softcap": 2.5, "sinks": True},
}


def with_sinks(terms, heads, grad=True):
    """``terms`` with a sink tensor of one logit per head in place of ``sinks=True``."""
    terms = dict(terms)
    if terms.pop("sinks", False):
        g = torch.Generator().manual_seed(heads)
        terms["sinks"] = (torch.randn(heads, generator=g) * 2).requires_grad_(grad)
    return terms


def eager(q, k, v, scale, softcap=None, sinks=None):
    """Gemma 2's and gpt-oss's own eager attention (causal, full): cap, mask, sink, softmax."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    q_len, kv_len = q.shape[2], k.shape[2]
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    s = s.masked_fill(~causal, float("-inf"))
    if sinks is not None:
        sink = sinks.view(1, -1, 1, 1).expand(q.shape[0], -1, q_len, 1)
        return torch.softmax(torch.cat([s, sink], -1), -1)[..., :-1] @ v
    return torch.softmax(s, -1) @ v


def grads(out, inputs, w):
    return torch.autograd.grad((out * w).sum(), inputs)


@pytest.mark.parametrize("terms", TERMS.values(), ids=TERMS.keys())
@pytest.mark.parametrize("shape", [(4, 2, 50, 50), (4, 1, 3, 40)])
def test_oracle_equals_the_families_eager_attention(terms, shape):
    hq, hkv, q_len, kv_len = shape
    torch.manual_seed(0)
    q = torch.randn(2, hq, q_len, 16, requires_grad=True)
    k, v = (torch.randn(2, hkv, kv_len, 16, requires_grad=True) for _ in range(2))
    terms = with_sinks(terms, hq)
    ref = sparse_attention(q, k, v, full(), backend="reference", **terms)
    expected = eager(q, k, v, 0.25, **terms)
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)
    inputs = (q, k, v, *(terms.get("sinks") for _ in [0] if "sinks" in terms))
    w = torch.randn_like(ref)
    for a, b in zip(grads(ref, inputs, w), grads(expected, inputs, w), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def assert_terms_match(pattern, s, terms, **kwargs):
    q, k, v, mask = make_inputs(s)
    terms = with_sinks(terms, q.shape[1])
    inputs = (q, k, v, *([terms["sinks"]] if "sinks" in terms else []))
    ref = sparse_attention(q, k, v, pattern, backend="reference", key_padding_mask=mask, **terms)
    out = blocks_attention(q, k, v, pattern, q.shape[-1] ** -0.5, mask, **kwargs, **terms)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    w = torch.randn_like(ref)
    for name, a, b in zip("qkvs", grads(out, inputs, w), grads(ref, inputs, w), strict=False):
        torch.testing.assert_close(a, b, atol=3e-5, rtol=3e-5, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("terms", TERMS.values(), ids=TERMS.keys())
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@settings(max_examples=6)  # x 27 cases; test_backends explores the shapes further
@given(s=shapes)
def test_blocks_equals_reference(pattern, terms, s):
    assert_terms_match(pattern, s, terms, block_size=s["block"])


@pytest.mark.parametrize("terms", TERMS.values(), ids=TERMS.keys())
@pytest.mark.parametrize("pattern", [sliding_window(40, sinks=4), PATTERNS[-1]], ids=str)
def test_blocks_portable_kernels_equal_reference(pattern, terms):
    s = {"q_len": 129, "extra": 37, "heads": (4, 2), "block": 32, "dim": 16, "batch": 2}
    assert_terms_match(pattern, s | {"padding": True, "seed": 3}, terms, force_math=True)


def test_sinks_lower_every_row_and_a_very_low_sink_changes_nothing():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    plain = sparse_attention(q, k, v, sliding_window(8), backend="blocks", block_size=16)
    gone = torch.full((2,), -1e4)
    same = sparse_attention(q, k, v, sliding_window(8), backend="blocks", sinks=gone)
    torch.testing.assert_close(same, plain, atol=1e-6, rtol=1e-6)
    # A sink of logit 0 against scores of 0 takes 1 / (n + 1) of each row: query i sees
    # min(i + 1, 8) keys.
    zeros = torch.zeros(1, 2, 30, 8)
    out = sparse_attention(zeros, zeros, v, sliding_window(8), backend="blocks", sinks=gone * 0)
    seen = torch.arange(30).clamp_max(7) + 1
    expected = torch.stack([v[0, :, max(0, i - 7) : i + 1].sum(1) for i in range(30)], 1)
    torch.testing.assert_close(out[0], expected / (seen + 1)[:, None], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("terms", "message"),
    [
        ({"softcap": 0.0}, "softcap must be a finite positive number"),
        ({"softcap": float("inf")}, "softcap must be a finite positive number"),
        ({"softcap": True}, "softcap must be a finite positive number"),
        ({"sinks": torch.zeros(3)}, r"one logit per query head, shape \(4,\)"),
        ({"sinks": torch.zeros(4, dtype=torch.long)}, "floating-point tensor"),
        ({"sinks": [0.0] * 4}, "floating-point tensor"),
    ],
)
def test_bad_terms_are_refused(terms, message):
    q = torch.randn(1, 4, 8, 8)
    k = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match=message):
        sparse_attention(q, k, k, full(), **terms)


@pytest.mark.flex
@pytest.mark.parametrize("pattern", [sliding_window(40, sinks=4), PATTERNS[-1]], ids=str)
def test_flex_soft_capping_equals_reference(pattern):
    """Forward only: FlexAttention has no CPU backward (tests/kernels/test_cuda.py checks
    gradients and the sinks on a GPU)."""
    s = {"q_len": 200, "extra": 37, "heads": (4, 2), "block": 128, "dim": 16, "batch": 2}
    q, k, v, mask = make_inputs(s | {"padding": True, "seed": 5}, grad=False)
    ref = sparse_attention(
        q, k, v, pattern, backend="reference", key_padding_mask=mask, softcap=2.5
    )
    out = sparse_attention(q, k, v, pattern, backend="flex", key_padding_mask=mask, softcap=2.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flex_refuses_sinks_on_cpu():
    q = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="backend='blocks'"):
        sparse_attention(q, q, q, full(), backend="flex", sinks=torch.zeros(2))
