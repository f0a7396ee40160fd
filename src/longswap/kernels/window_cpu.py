"""The window path of ``blocks`` on CPU: a small C++ kernel, built on first use.

``sliding_window(window, sinks)`` in float32 on CPU runs ``csrc/window_attention.cpp``:
each block of 64 query rows multiplies against exactly its key range (the window of its
first row up to its last row, plus the sinks) through BLAS, and masks by two intervals
per row. It computes ``window + 63`` keys per query, where torch's flash kernels over
band slices compute ``window + 192`` and skip nothing inside a slice.

``dilated(window, dilation)`` is ``dilation`` interleaved windows: the queries at
positions ``r, r + dilation, ...`` see exactly the keys at those positions, ``window`` of
them back. Each residue ``r`` is one kernel call on strided views of q, k and v.

The extension is compiled by ``torch.utils.cpp_extension`` the first time it is needed
(cached under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, under a
name that carries the CPU's instruction set and the torch version: a new torch builds
its own copy instead of loading one compiled against another ABI). It is compiled
without ``-ffast-math``: NaN and infinities follow IEEE, so a NaN input gives NaN
outputs as in the dense oracle; its exponentials are vectorized through ATen's
``Vectorized<float>`` instead. Where it cannot be built (no C++ compiler), ``blocks``
warns once and keeps to its pure-PyTorch paths: same pattern, same results, slower.
``LONGSWAP_CPU_KERNEL=0`` in the environment keeps them there without trying.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from longswap.patterns import Dilated, Pattern, SlidingWindow

#: Query rows per block: the kernel computes ``window + BLOCK - 1`` keys for each block.
BLOCK = 64
#: Environment variable: "0" keeps ``blocks`` in pure PyTorch on CPU (no C++ kernel).
SWITCH = "LONGSWAP_CPU_KERNEL"
_SOURCE = Path(__file__).with_name("csrc") / "window_attention.cpp"
#: Compiler flags per CPU capability: the instruction set, and the macro that makes ATen's
#: ``Vectorized<float>`` use it.
_ISA_FLAGS = {
    "AVX512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mavx2",
        "-mfma",
        "-DCPU_CAPABILITY_AVX512",
    ],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
}


def extension_name(isa: str, torch_version: str) -> str:
    """The build's name, and so its cache folder: one per instruction set and torch version."""
    version = "".join(c if c.isalnum() else "_" for c in torch_version)
    return f"longswap_window_{isa.lower()}_torch{version}"


@functools.cache
def extension():  # noqa: ANN201 (a compiled module)
    """The compiled kernel module; None when switched off, or (with one warning) when it
    cannot be built."""
    from torch.utils import cpp_extension

    if os.environ.get(SWITCH, "1") == "0":
        return None
    isa = torch.backends.cpu.get_cpu_capability()
    try:
        return cpp_extension.load(
            name=extension_name(isa, torch.__version__),
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-fno-math-errno", "-fopenmp", *_ISA_FLAGS.get(isa, [])],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # noqa: BLE001 (any build failure: report it and go on)
        warnings.warn(
            f"longswap could not build its CPU window kernel ({error}); sliding_window and "
            "dilated run through the pure-PyTorch paths of `blocks` instead (same results, "
            f"slower). Install a C++ compiler (g++) to get the kernel, or set {SWITCH}=0 "
            "to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def window_kernel_applies(pattern: Pattern, q: Tensor) -> bool:
    """True for a sliding or dilated window with q in float32 on CPU (kernel built)."""
    return (
        isinstance(pattern, (SlidingWindow, Dilated))
        and q.device.type == "cpu"
        and q.dtype == torch.float32
        and extension() is not None
    )


def _rows_contiguous(x: Tensor) -> Tensor:
    """``x``, or a copy, with each row of D contiguous and apart from the next (BLAS reads)."""
    apart = x.shape[-2] <= 1 or x.stride(-2) >= x.shape[-1]
    return x if x.stride(-1) == 1 and apart else x.contiguous()


#: The one window of a sliding window: every query row and every key row.
_WHOLE = [(slice(None), slice(None))]


def _residues(pattern: SlidingWindow | Dilated, q_len: int, kv_len: int) -> list:
    """``(query rows, key rows)`` slices of each window the pattern is made of: one per
    residue of the query positions modulo the dilation that holds a query."""
    if isinstance(pattern, SlidingWindow):
        return _WHOLE
    d, offset = pattern.dilation, kv_len - q_len
    # Query row i sits at position offset + i: rows i, i + d, ... see keys (offset + i) % d,
    # + d, ... One window per row among the first d (at most q_len of them, however large d).
    return [(slice(i, None, d), slice((offset + i) % d, None, d)) for i in range(min(d, q_len))]


def _per_key_head(grad: Tensor, hkv: int) -> Tensor:
    """Key gradients per query head ``(B, Hq, L, D)`` summed over grouped heads."""
    batch, hq = grad.shape[:2]
    if hq == hkv:
        return grad
    return grad.view(batch, hkv, hq // hkv, *grad.shape[2:]).sum(2)


class WindowAttention(torch.autograd.Function):
    """Autograd function around the C++ forward and backward kernels, one call per window
    (one for a sliding window, ``dilation`` for a dilated one)."""

    @staticmethod
    def forward(
        ctx,  # noqa: ANN001
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pattern: SlidingWindow | Dilated,
        scale: float,
    ) -> Tensor:
        q, k, v = (_rows_contiguous(x) for x in (q, k, v))
        sinks = min(pattern.sinks, k.shape[2]) if isinstance(pattern, SlidingWindow) else 0
        parts = _residues(pattern, q.shape[2], k.shape[2])
        results = [
            extension().forward(
                q[:, :, rows], k[:, :, keys], v[:, :, keys], pattern.window, sinks, scale, BLOCK
            )
            for rows, keys in parts
        ]
        if parts == _WHOLE:
            out = results[0][0]
        else:  # each window's rows back in place
            out = q.new_empty(*q.shape[:3], v.shape[3])
            for (rows, _), (part, _) in zip(parts, results, strict=True):
                out[:, :, rows] = part
        ctx.save_for_backward(q, k, v, out, *(lse for _, lse in results))
        ctx.window, ctx.sinks, ctx.scale, ctx.parts = pattern.window, sinks, scale, parts
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:  # noqa: ANN001
        q, k, v, out, *lses = ctx.saved_tensors
        grad = _rows_contiguous(grad)
        sinks, hkv = ctx.sinks, k.shape[1]
        whole = ctx.parts == _WHOLE
        if not whole:  # rows of several windows; keys no query sees keep zeros
            dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for (rows, keys), lse in zip(ctx.parts, lses, strict=True):
            dq_p, dk_p, dv_p, dk_sink, dv_sink = extension().backward(
                grad[:, :, rows],
                q[:, :, rows],
                k[:, :, keys],
                v[:, :, keys],
                out[:, :, rows],
                lse,
                ctx.window,
                sinks,
                ctx.scale,
                BLOCK,
            )
            if sinks:
                dk_p[:, :, :sinks] += dk_sink.sum(2)
                dv_p[:, :, :sinks] += dv_sink.sum(2)
            dk_p, dv_p = _per_key_head(dk_p, hkv), _per_key_head(dv_p, hkv)
            if whole:
                return dq_p, dk_p, dv_p, None, None
            dq[:, :, rows], dk[:, :, keys], dv[:, :, keys] = dq_p, dk_p, dv_p
        return dq, dk, dv, None, None


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: SlidingWindow | Dilated, scale: float
) -> Tensor:
    """``(B, Hq, Lq, Dv)`` sliding or dilated window attention through the C++ kernel
    (differentiable)."""
    return WindowAttention.apply(q, k, v, pattern, scale)
