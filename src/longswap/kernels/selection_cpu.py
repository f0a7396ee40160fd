"""Block selections on CPU in float32 or bfloat16: two C++ kernels, no tiles and no masks.

``block_topk`` and ``learned_topk`` (own block plus selected blocks), and their unions with
a sliding window and sinks (``sliding_window(window=512, sinks=4) | block_topk(64, 16)``),
split into a static part and the selected blocks:

* the static part (sinks, window and own block: one key interval per row, plus the sinks)
  runs the window kernel (``csrc/window_attention.cpp``, its ``own_block`` argument);
* the selected blocks run ``csrc/selection_attention.cpp``: the rows of a chunk of queries
  are grouped by the key block they chose, so each key block meets all its rows in one BLAS
  product, and each row's partial softmax merges into the static part's (online softmax).

Backward runs both kernels from the merged output and log-sum-exp, as FlashAttention does
across key splits. bfloat16 inputs multiply in bfloat16 with float32 accumulation; the merge,
the outputs and the gradients stay float32 until they leave. The selection itself is not
differentiable (its indices come from ``Selection.select_blocks``). Both kernels are built on
first use (``kernels.cpp``); without them, ``blocks`` keeps to its pure-PyTorch tiles.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longswap.kernels.cpp import compiled
from longswap.kernels.nan import with_nan_rows
from longswap.kernels.window_cpu import (
    BLOCK,
    DTYPES,
    cast_like,
    extension,
    rows_contiguous,
    window_backward,
)
from longswap.patterns import BlockTopK, Pattern, SelectionUnion, SlidingWindow


def static_part(pattern: Pattern) -> tuple[int, int, int] | None:
    """``(window, sinks, own_block)`` of a selection whose static part the window kernel
    serves: a plain ``block_topk``/``learned_topk`` (own block only: a window of 1) or its
    union with one ``sliding_window``; None for any other pattern."""
    if isinstance(pattern, SelectionUnion) and isinstance(pattern.static, SlidingWindow):
        return pattern.static.window, pattern.static.sinks, pattern.block_size
    if isinstance(pattern, BlockTopK):
        return 1, 0, pattern.block_size
    return None


def selection_kernel_applies(pattern: Pattern, q: Tensor) -> bool:
    """True for a selection :func:`static_part` serves, q in float32 or bfloat16 on CPU, both
    kernels built."""
    return (
        static_part(pattern) is not None
        and q.device.type == "cpu"
        and q.dtype in DTYPES
        and extension() is not None
        and compiled("selection_attention") is not None
    )


def top_blocks(scores: Tensor, valid: Tensor, places: int) -> tuple[Tensor, Tensor]:
    """The compiled :data:`longswap.patterns.block_topk.TopPlaces`: the ``places`` best
    valid blocks of each row of ``scores (..., Lq, n)`` (float32, CPU)."""
    return compiled("selection_attention").top_blocks(scores, valid.contiguous(), places)


class SelectionAttention(torch.autograd.Function):
    """Autograd function around the window kernel (static part) and the selection kernel
    (selected blocks)."""

    @staticmethod
    def forward(
        ctx,  # noqa: ANN001
        q: Tensor,
        k: Tensor,
        v: Tensor,
        static: tuple[int, int, int],
        blocks: Tensor,
        chosen: Tensor,
        block_size: int,
        scale: float,
    ) -> Tensor:
        q, k, v = (rows_contiguous(x) for x in (q, k, v))
        window, sinks, own_block = static
        sinks = min(sinks, k.shape[2])
        blocks, chosen = blocks.contiguous(), chosen.contiguous()
        out, lse = extension().forward(q, k, v, window, sinks, scale, BLOCK, own_block)
        out, lse = compiled("selection_attention").forward(
            q, k, v, blocks, chosen, out, lse, window, own_block, sinks, block_size, scale
        )
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, blocks, chosen)
        ctx.args = window, own_block, sinks, block_size, scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:  # noqa: ANN001
        q, k, v, out, lse, blocks, chosen = ctx.saved_tensors
        window, own_block, sinks, block_size, scale = ctx.args
        grad = rows_contiguous(grad)
        dq, dk, dv = window_backward(grad, q, k, v, out, lse, window, sinks, scale, own_block)
        dq_s, dk_s, dv_s = compiled("selection_attention").backward(
            grad, q, k, v, out, lse, blocks, chosen, *ctx.args
        )
        grads = cast_like((dq + dq_s, dk + dk_s, dv + dv_s), (q, k, v))
        return *grads, None, None, None, None, None


def selection_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern,
    selection: tuple[Tensor, Tensor],
    scale: float,
) -> Tensor:
    """``(B, Hq, Lq, Dv)`` attention of a selection :func:`static_part` serves, through the
    C++ kernels (differentiable in q, k, v). ``selection``: ``Selection.select_blocks``'s
    ``(blocks, chosen)``."""
    static = static_part(pattern)
    if static is None:
        raise ValueError(
            f"the selection kernel serves block selections and their unions with "
            f"one sliding window; got {pattern}"
        )
    blocks, chosen = selection
    args = static, blocks, chosen, pattern.block_size, scale
    # Exactly the rows that see a NaN key or value are NaN (kernels.nan), whatever blocks
    # the selection holds: the kernels weigh every key of a block, hidden ones by zero.
    return with_nan_rows(lambda *x: SelectionAttention.apply(*x, *args), q, k, v)
