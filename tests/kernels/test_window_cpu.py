"""The C++ sliding-window kernel of ``blocks`` (float32 on CPU)."""

import warnings

import pytest
import torch

from longswap.kernels import blocks, window_cpu
from longswap.patterns import dilated, shifted_groups, sliding_window
from tests.kernels.test_backends import assert_matches_reference
from tests.kernels.test_band import inputs


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls ``blocks`` makes to the kernel."""
    calls = []

    def counted(*args):
        calls.append(args[3])
        return window_cpu.window_attention(*args)

    monkeypatch.setattr(blocks, "window_attention", counted)
    return calls


@pytest.mark.parametrize(
    ("batch", "heads", "q_len", "kv_len", "pattern"),
    [
        (2, (2, 2), 1000, 1000, sliding_window(100)),  # several backward segments
        (1, (4, 2), 700, 900, sliding_window(150)),  # cached keys before the queries
        (2, (4, 1), 129, 129, sliding_window(64, sinks=3)),  # a short last block, sinks
        (1, (2, 2), 300, 300, sliding_window(70, sinks=100)),  # sinks inside the window
        (1, (2, 1), 127, 127, sliding_window(500, sinks=4)),  # window and sinks past L
        (1, (4, 2), 1, 900, sliding_window(150, sinks=4)),  # a decoding step
        (2, (2, 2), 7, 300, sliding_window(1)),  # each query sees itself only
        (2, (4, 2), 500, 500, dilated(20, 3)),  # three interleaved windows
        (1, (2, 1), 700, 903, dilated(64, 4)),  # cached keys: residues shift by the offset
        (1, (2, 2), 3, 40, dilated(8, 5)),  # fewer queries than residues
        (1, (4, 2), 1, 900, dilated(30, 7)),  # a decoding step
    ],
    ids=str,
)
def test_kernel_equals_reference(batch, heads, q_len, kv_len, pattern, kernel_calls):
    q, k, v = inputs(batch, *heads, q_len, kv_len)
    assert_matches_reference(pattern, q, k, v, None, 2e-5)
    assert kernel_calls == [pattern]


def test_kernel_takes_any_gradient_layout():
    """Gradients arriving transposed (as from an output projection) are read correctly."""
    q, k, v = inputs(1, 2, 2, 200, 200)
    pattern = sliding_window(50, sinks=2)
    out = window_cpu.window_attention(q, k, v, pattern, 0.25)
    ref = blocks.blocks_attention(q, k, v, pattern, 0.25, force_math=True)
    w = torch.randn(1, 200, 2, 16).transpose(1, 2)  # rows not contiguous in (B, H, L, D)
    for a, b in zip(
        torch.autograd.grad(out, (q, k, v), w),
        torch.autograd.grad(ref, (q, k, v), w),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_kernel_serves_only_float32_windows_on_cpu(kernel_calls, monkeypatch):
    q, k, v = inputs(1, 2, 2, 300, 300)
    blocks.blocks_attention(q, k, v, sliding_window(16) | dilated(4, 40), 0.25)  # band
    blocks.blocks_attention(q, k, v, shifted_groups(64), 0.25)  # tiles
    blocks.blocks_attention(q, k, v, sliding_window(40), 0.25, force_math=True)
    blocks.blocks_attention(q, k, v, sliding_window(40), 0.25, torch.ones(1, 300, dtype=bool))
    q16, k16, v16 = (t.detach().bfloat16() for t in (q, k, v))
    blocks.blocks_attention(q16, k16, v16, sliding_window(40), 0.25)
    assert kernel_calls == []
    monkeypatch.setenv(window_cpu.SWITCH, "0")  # switched off: pure PyTorch throughout
    window_cpu.extension.cache_clear()
    try:
        assert not window_cpu.window_kernel_applies(sliding_window(40), q)
    finally:
        window_cpu.extension.cache_clear()


def test_build_failure_warns_once_and_the_band_path_serves(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    window_cpu.extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C.. compiler found.*pure-PyTorch"):
            assert window_cpu.extension() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the failure is reported once, not per call
            q, k, v = inputs(1, 2, 2, 300, 300)
            assert not window_cpu.window_kernel_applies(sliding_window(40), q)
            assert_matches_reference(sliding_window(40), q, k, v, None, 2e-5)
    finally:
        window_cpu.extension.cache_clear()
