"""The GPU paths against the reference on a CUDA device: skipped where there is none.

CI has no GPU; these run on a lent GPU machine (``pytest tests/kernels/test_cuda.py``).
"""

import pytest
import torch

from longswap import sparse_attention
from longswap.kernels.blocks import blocks_attention
from tests.kernels.test_backends import PATTERNS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_inputs(q_len=300, kv_len=333, heads=(4, 2), dim=64, dtype=torch.float32):
    """Random q, k, v (with gradients) and a key padding mask, on the GPU."""
    g = torch.Generator().manual_seed(3)

    def rand(h, n):
        return torch.randn(2, h, n, dim, generator=g).to("cuda", dtype).requires_grad_(True)

    mask = torch.rand(2, kv_len, generator=g) > 0.1
    return rand(heads[0], q_len), rand(heads[1], kv_len), rand(heads[1], kv_len), mask.cuda()


def grads_of(out, inputs, weight):
    return torch.autograd.grad((out.float() * weight).sum(), inputs)


@pytest.mark.parametrize("backend", ["flex", "blocks", "auto"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_cuda_backend_equals_reference(pattern, backend):
    q, k, v, mask = cuda_inputs()
    ref = sparse_attention(q, k, v, pattern, backend="reference", key_padding_mask=mask)
    if backend == "blocks":
        out = blocks_attention(q, k, v, pattern, q.shape[-1] ** -0.5, mask)
    else:
        out = sparse_attention(q, k, v, pattern, backend=backend, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    w = torch.randn_like(ref)
    pairs = zip("qkv", grads_of(out, (q, k, v), w), grads_of(ref, (q, k, v), w), strict=True)
    for name, a, b in pairs:
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("pattern", PATTERNS[1:3], ids=str)
def test_cuda_bf16_flex_close_to_fp32_reference(pattern):
    q, k, v, mask = cuda_inputs(q_len=512, kv_len=512, dtype=torch.bfloat16)
    ref = sparse_attention(
        q.float(), k.float(), v.float(), pattern, backend="reference", key_padding_mask=mask
    )
    out = sparse_attention(q, k, v, pattern, backend="flex", key_padding_mask=mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("backend", ["flex", "blocks"])
@pytest.mark.parametrize("pattern", [PATTERNS[1], PATTERNS[-1]], ids=str)
def test_cuda_soft_capping_and_sinks_equal_reference(pattern, backend):
    """Gemma 2's cap and gpt-oss's sinks on the GPU paths, gradients (the sinks') included."""
    q, k, v, mask = cuda_inputs()
    sinks = torch.randn(4, device="cuda", requires_grad=True)
    terms = {"softcap": 2.5, "sinks": sinks, "key_padding_mask": mask}
    ref = sparse_attention(q, k, v, pattern, backend="reference", **terms)
    out = sparse_attention(q, k, v, pattern, backend=backend, **terms)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    w = torch.randn_like(ref)
    inputs = (q, k, v, sinks)
    pairs = zip("qkvs", grads_of(out, inputs, w), grads_of(ref, inputs, w), strict=True)
    for name, a, b in pairs:
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3, msg=lambda m, n=name: f"d{n}: {m}")
