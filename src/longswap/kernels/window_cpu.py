"""The window path of ``blocks`` on CPU: a small C++ kernel, built on first use.

``sliding_window(window, sinks)`` in float32 or bfloat16 on CPU runs
``csrc/window_attention.cpp``: each block of 64 query rows multiplies against exactly its
key range (the window of its first row up to its last row, plus the sinks) through BLAS,
and masks by two intervals per row. It computes ``window + 63`` keys per query, where
torch's flash kernels over band slices compute ``window + 192`` and skip nothing inside a
slice. bfloat16 inputs multiply in bfloat16 with float32 accumulation (MKL's bfloat16
product: AVX512-BF16 or AMX where the CPU has them); softmax, outputs and gradients are
float32 inside the kernel and cast to the inputs' dtype on the way out.

``dilated(window, dilation)`` is ``dilation`` interleaved windows: the queries at
positions ``r, r + dilation, ...`` see exactly the keys at those positions, ``window`` of
them back. Each residue ``r`` is one kernel call on strided views of q, k and v.

The kernel is built on first use (``kernels.cpp``: without a C++ compiler, ``blocks``
warns once and keeps to its pure-PyTorch paths).
"""

from __future__ import annotations

import torch
from torch import Tensor

from longswap.kernels.cpp import compiled
from longswap.kernels.nan import with_nan_rows
from longswap.patterns import Dilated, Pattern, SlidingWindow

#: Input dtypes the C++ kernels take (float32 or bfloat16; float16 keeps to PyTorch).
DTYPES = (torch.float32, torch.bfloat16)

#: Query rows per block: the kernel computes ``window + BLOCK - 1`` keys for each block.
BLOCK = 64


def extension():  # noqa: ANN201 (a compiled module)
    """The compiled window kernel, or None (see ``kernels.cpp``)."""
    return compiled("window_attention")


def window_kernel_applies(pattern: Pattern, q: Tensor) -> bool:
    """True for a sliding or dilated window with q in float32 or bfloat16 on CPU (kernel
    built)."""
    return (
        isinstance(pattern, (SlidingWindow, Dilated))
        and q.device.type == "cpu"
        and q.dtype in DTYPES
        and extension() is not None
    )


def rows_contiguous(x: Tensor) -> Tensor:
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
        q, k, v = (rows_contiguous(x) for x in (q, k, v))
        sinks = min(pattern.sinks, k.shape[2]) if isinstance(pattern, SlidingWindow) else 0
        parts = _residues(pattern, q.shape[2], k.shape[2])
        results = [
            extension().forward(
                q[:, :, rows], k[:, :, keys], v[:, :, keys], pattern.window, sinks, scale, BLOCK, 1
            )
            for rows, keys in parts
        ]
        if parts == _WHOLE:
            out = results[0][0].to(q.dtype)
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
        grad = rows_contiguous(grad)
        if ctx.parts == _WHOLE:
            grads = window_backward(grad, q, k, v, out, lses[0], ctx.window, ctx.sinks, ctx.scale)
            return *cast_like(grads, (q, k, v)), None, None
        # rows of several windows; keys no query sees keep zeros
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for (rows, keys), lse in zip(ctx.parts, lses, strict=True):
            dq[:, :, rows], dk[:, :, keys], dv[:, :, keys] = window_backward(
                grad[:, :, rows],
                q[:, :, rows],
                k[:, :, keys],
                v[:, :, keys],
                out[:, :, rows],
                lse,
                ctx.window,
                ctx.sinks,
                ctx.scale,
            )
        return dq, dk, dv, None, None


def window_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    window: int,
    sinks: int,
    scale: float,
    own_block: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of the window kernel's keys (window, own block and ``sinks``, see
    ``csrc/window_attention.cpp``) from ``out`` and ``lse``: the window's own, or those of a
    whole pattern the window is part of (the window's share of its gradients). float32, for
    the caller to add up and cast."""
    dq, dk, dv, dk_sink, dv_sink = extension().backward(
        grad, q, k, v, out, lse, window, sinks, scale, BLOCK, own_block
    )
    if sinks:
        dk[:, :, :sinks] += dk_sink.sum(2)
        dv[:, :, :sinks] += dv_sink.sum(2)
    return dq, _per_key_head(dk, k.shape[1]), _per_key_head(dv, k.shape[1])


def cast_like(grads: tuple[Tensor, ...], inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Each float32 gradient in its input's dtype (unchanged for float32 inputs)."""
    return tuple(g.to(x.dtype) for g, x in zip(grads, inputs, strict=True))


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: SlidingWindow | Dilated, scale: float
) -> Tensor:
    """``(B, Hq, Lq, Dv)`` sliding or dilated window attention through the C++ kernel
    (differentiable); exactly the rows that see a NaN key or value are NaN
    (``kernels.nan``: the kernel weighs every key of its range, hidden ones by zero)."""
    return with_nan_rows(lambda *x: WindowAttention.apply(*x, pattern, scale), q, k, v)
