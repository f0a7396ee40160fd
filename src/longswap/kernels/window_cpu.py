"""The sliding-window path of ``blocks`` on CPU: a small C++ kernel, built on first use.

``sliding_window(window, sinks)`` in float32 on CPU runs ``csrc/window_attention.cpp``:
each block of 64 query rows multiplies against exactly its key range (the window of its
first row up to its last row, plus the sinks) through BLAS, and masks by two intervals
per row. It computes about ``window + 64`` keys per query, where torch's flash kernels
over band slices compute ``window + 192`` and skip nothing inside a slice.

The extension is compiled by ``torch.utils.cpp_extension`` the first time it is needed
(about a minute; cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``). Where it cannot be built (no C++ compiler), ``blocks``
warns once and uses the band path instead: same pattern, same results, slower.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from torch import Tensor

from longswap.patterns import Pattern, SlidingWindow

#: Query rows per block: the kernel computes ``window + BLOCK - 1`` keys for each block.
BLOCK = 64
_SOURCE = Path(__file__).with_name("csrc") / "window_attention.cpp"
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}


@functools.cache
def extension():  # noqa: ANN201 (a compiled module)
    """The compiled kernel module, or None (with one warning) when it cannot be built."""
    from torch.utils import cpp_extension

    isa = torch.backends.cpu.get_cpu_capability()
    try:
        return cpp_extension.load(
            name=f"longswap_window_{isa.lower()}",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-ffast-math", "-fopenmp", *_ISA_FLAGS.get(isa, [])],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # noqa: BLE001 (any build failure: report it and go on)
        warnings.warn(
            f"longswap could not build its CPU sliding-window kernel ({error}); "
            "sliding_window runs through the band path instead (same results, slower). "
            "Install a C++ compiler (g++) to get the kernel.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def window_kernel_applies(pattern: Pattern, q: Tensor) -> bool:
    """True when ``pattern`` is a sliding window and q is float32 on CPU (kernel built)."""
    return (
        isinstance(pattern, SlidingWindow)
        and q.device.type == "cpu"
        and q.dtype == torch.float32
        and extension() is not None
    )


def _rows_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class WindowAttention(torch.autograd.Function):
    """Autograd function around the C++ forward and backward kernels."""

    @staticmethod
    def forward(
        ctx,  # noqa: ANN001
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pattern: SlidingWindow,
        scale: float,
    ) -> Tensor:
        q, k, v = (_rows_contiguous(x) for x in (q, k, v))
        sinks = min(pattern.sinks, k.shape[2])
        out, lse = extension().forward(q, k, v, pattern.window, sinks, scale, BLOCK)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.window, ctx.sinks, ctx.scale = pattern.window, sinks, scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:  # noqa: ANN001
        q, k, v, out, lse = ctx.saved_tensors
        sinks = ctx.sinks
        dq, dk, dv, dk_sink, dv_sink = extension().backward(
            _rows_contiguous(grad), q, k, v, out, lse, ctx.window, sinks, ctx.scale, BLOCK
        )
        if sinks:
            dk[:, :, :sinks] += dk_sink.sum(2)
            dv[:, :, :sinks] += dv_sink.sum(2)
        batch, hkv = k.shape[:2]
        groups = q.shape[1] // hkv
        if groups > 1:  # per query head -> per key head
            dk = dk.view(batch, hkv, groups, *dk.shape[2:]).sum(2)
            dv = dv.view(batch, hkv, groups, *dv.shape[2:]).sum(2)
        return dq, dk, dv, None, None


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: SlidingWindow, scale: float
) -> Tensor:
    """``(B, Hq, Lq, Dv)`` sliding-window attention through the C++ kernel (differentiable)."""
    return WindowAttention.apply(q, k, v, pattern, scale)
