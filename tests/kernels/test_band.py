"""The band path of ``blocks`` (distance-only patterns through strided key views)."""

from dataclasses import dataclass

import pytest
import torch

from longswap import sparse_attention
from longswap.kernels import blocks
from longswap.kernels.band import band_applies, band_plan
from longswap.patterns import Pattern, block_topk, dilated, full, shifted_groups, sliding_window
from tests.kernels.test_backends import assert_matches_reference


@dataclass(frozen=True)
class ExactDistance(Pattern):
    """Sees only the key ``distance`` back: the first rows see nothing."""

    distance: int = 3
    name = "exact_distance_test"
    translation_invariant = True

    def reach(self) -> int:
        """The one visible distance."""
        return self.distance

    def _mask_fn(self, kv_len, num_heads, device):  # noqa: ANN001, ANN202
        return lambda q, kv, h: q - kv == self.distance

    def _tiles(self, grid, num_heads):  # noqa: ANN001, ANN202
        (q_lo, q_hi), (k_lo, k_hi) = grid.q_bounds, grid.k_bounds
        return (q_lo - k_hi <= self.distance) & (q_hi - k_lo >= self.distance), q_lo < q_lo.min()


@pytest.fixture(autouse=True)
def without_window_kernel(monkeypatch):
    """Plain windows go to the C++ kernel first (tests/kernels/test_window_cpu.py): here
    they take the band path, which serves them in other dtypes and on other devices."""
    monkeypatch.setattr(blocks, "window_kernel_applies", lambda pattern, q: False)


def inputs(batch, hq, hkv, q_len, kv_len, dim=16, dtype=torch.float32, seed=0):
    """q, k, v laid out as a Hugging Face layer makes them: ``(B, L, H, D)`` transposed."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, hq, dim, generator=g)
    k, v = (torch.randn(batch, kv_len, hkv, dim, generator=g) for _ in range(2))
    return [t.to(dtype).requires_grad_().transpose(1, 2) for t in (q, k, v)]


def test_band_serves_distance_only_patterns():
    assert band_applies(sliding_window(64), 4)
    assert band_applies(sliding_window(16) | dilated(4, 40), 4)
    assert not band_applies(sliding_window(64, sinks=4), 4)  # sinks: absolute positions
    assert not band_applies(block_topk(32, 2), 4)
    assert not band_applies(shifted_groups(64), 4)  # differs per head
    assert not band_applies(full(), 4)  # no finite reach
    cpu = torch.device("cpu")
    assert band_plan(sliding_window(64), 4, 2, 1000, 1000, cpu) is not None
    assert band_plan(sliding_window(600), 4, 2, 1000, 1000, cpu) is None  # reach too long


@pytest.mark.parametrize(
    ("batch", "heads", "q_len", "kv_len", "pattern"),
    [
        (2, (2, 2), 1000, 1000, sliding_window(100)),  # edge chunks, a short last chunk
        (2, (4, 2), 700, 900, sliding_window(150)),  # decoding offset inside the reach
        (1, (2, 2), 384, 1536, sliding_window(64)),  # no padding: keys read in place
        (2, (4, 1), 500, 500, dilated(20, 3)),  # four query heads stacked on one key head
        (2, (2, 1), 777, 800, sliding_window(16) | dilated(4, 40)),
        (1, (4, 2), 1, 900, sliding_window(150)),  # a decoding step: reads 193 keys of 900
        (2, (2, 2), 7, 300, dilated(8, 5)),  # a few new tokens at once
    ],
    ids=str,
)
@pytest.mark.parametrize("force_math", [False, True], ids=["cpu-flash", "portable"])
def test_band_equals_reference(batch, heads, q_len, kv_len, pattern, force_math):
    assert band_plan(pattern, *heads, q_len, kv_len, torch.device("cpu")) is not None
    q, k, v = inputs(batch, *heads, q_len, kv_len)
    assert_matches_reference(pattern, q, k, v, None, 2e-5, force_math=force_math)


def assert_low_precision_matches(pattern, q, k, v):
    """``blocks`` in q's (low) dtype against the float32 oracle: values and gradients."""
    ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = sparse_attention(q, k, v, pattern, backend="blocks")
    expected = sparse_attention(*ref, pattern, backend="reference")
    assert out.dtype == q.dtype
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    for g, r in zip(grads, torch.autograd.grad(expected.sum(), ref), strict=True):
        torch.testing.assert_close(g.float(), r, atol=6e-2, rtol=6e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_band_low_precision(dtype):
    q, k, v = inputs(1, 4, 2, 600, 600, dtype=dtype)
    assert_low_precision_matches(sliding_window(100), q, k, v)


def test_rows_without_keys_go_to_the_tiles():
    """A distance-only rule that leaves the first rows empty: no band plan, zeros, no NaN."""
    pattern = ExactDistance(3)
    assert band_plan(pattern, 2, 2, 400, 400, torch.device("cpu")) is None
    q, k, v = inputs(1, 2, 2, 400, 400)
    assert_matches_reference(pattern, q, k, v, None, 2e-5)
