"""Attention over gathered tiles, with a flash-style backward: the engine of ``blocks``.

A sparse pattern is cut into *tiles*: a tile is ``R`` query rows and the ``K`` key rows
they may look at, with an additive mask. Queries and keys are read by blocks of rows from
``(B*H*L/unit, unit, D)`` views of q, k and v (zero-padded copies when ``L`` is not a
multiple of the unit). Results go to flat output rows ``b*Hq*Lq + h*Lq + i`` plus one
extra row that collects padding. A query row may appear in several tiles (``block_topk``
visits its own block and its selected blocks separately); the partial results merge
through their log-sum-exp.

The backward pass recomputes each tile from the saved inputs, the merged output and the
merged log-sum-exp, exactly as FlashAttention does across key splits, so nothing of size
``L x keys`` is kept between the passes. On CPU, each tile batch runs through torch's
fused flash-attention kernels (``aten::_scaled_dot_product_flash_attention_for_cpu`` and
its backward); on other devices, through the same equations in plain torch ops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from longswap.kernels.nan import with_nan_rows
from longswap.kernels.reference import capped


@dataclass(frozen=True)
class TileSet:
    """``N`` tiles, each ``R`` query rows by ``K`` key rows, addressed by blocks of rows.

    Queries and keys are read in units of ``q_unit`` and ``kv_unit`` consecutive rows:
    ``q_index (N, R / q_unit)`` indexes the blocked query space ``(B*Hq*ceil(Lq/q_unit),
    q_unit, D)`` and ``kv_index (N, K / kv_unit)`` the blocked key space; unused key slots
    point anywhere and are masked. ``rows (N, R)`` gives each tile row's flat output row
    ``b*Hq*Lq + h*Lq + i`` (``B*Hq*Lq`` for padding). ``mask (N or 1, 1, R or 1, K)`` is
    additive float32 (0 or -inf), or None when every pair is visible. ``has_key (N, R)`` is
    False for rows that see no key in this set: their mask row is cleared to keep the
    kernels finite, and their results are discarded.
    """

    q_index: Tensor
    q_unit: int
    kv_index: Tensor
    kv_unit: int
    rows: Tensor
    mask: Tensor | None
    has_key: Tensor
    every_row_has_key: bool = True
    _cast: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(
        cls,
        q_index: Tensor,
        q_unit: int,
        kv_index: Tensor,
        kv_unit: int,
        rows: Tensor,
        visible: Tensor | None,
    ) -> TileSet:
        """Tiles from a boolean ``visible (N or 1, R or 1, K)`` (None: all pairs visible)."""
        n, r = rows.shape
        if visible is None:
            has_key, mask = torch.ones(n, r, dtype=torch.bool, device=rows.device), None
        else:
            any_key = visible.any(-1, keepdim=True)
            keep = visible | ~any_key
            mask = torch.zeros(keep.shape, device=keep.device).masked_fill_(~keep, float("-inf"))
            has_key, mask = any_key[..., 0].expand(n, r), mask[:, None]
        return cls(q_index, q_unit, kv_index, kv_unit, rows, mask, has_key, bool(has_key.all()))

    def restricted(self, keep: Tensor) -> TileSet:
        """These tiles with only the keys where ``keep (N, 1, K)`` is True."""
        visible = self.visible()
        return TileSet.build(
            self.q_index,
            self.q_unit,
            self.kv_index,
            self.kv_unit,
            self.rows,
            keep if visible is None else visible & keep,
        )

    def visible(self) -> Tensor | None:
        """The boolean visibility this set was built from (None: all pairs)."""
        if self.mask is None:
            return None
        return (self.mask[:, 0] == 0) & self.has_key[..., None]

    def mask_as(self, dtype: torch.dtype) -> Tensor | None:
        """The additive mask in ``dtype``."""
        return cast_once(self._cast, "mask", self.mask, dtype)


def cast_once(cache: dict, name: str, mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``mask`` in ``dtype``, converted once and kept in ``cache``: plans and tiles are
    reused by every call of a shape (every layer, every step)."""
    if mask is None or mask.dtype == dtype:
        return mask
    if (name, dtype) not in cache:
        cache[name, dtype] = mask.to(dtype)
    return cache[name, dtype]


def _cpu_forward(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=mask, scale=scale
    )
    return out, lse


def _cpu_backward(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale
    )


def _scores(
    q: Tensor, k: Tensor, mask: Tensor | None, scale: float, softcap: float | None
) -> tuple[Tensor, Tensor]:
    """Masked scores, and the capped scores before the mask (for the cap's derivative)."""
    s = capped((q @ k.transpose(-1, -2)).float() * scale, softcap)
    return (s if mask is None else s + mask), s


def _math_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    scale: float,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    s, _ = _scores(q, k, mask, scale, softcap)
    lse = torch.logsumexp(s, -1)
    return (torch.exp(s - lse[..., None]).to(v.dtype) @ v), lse


def _math_backward(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor | None,
    scale: float,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    s, unmasked = _scores(q, k, mask, scale, softcap)
    p = torch.exp(s - lse[..., None])  # (N, 1, R, K)
    dv = p.transpose(-1, -2).to(do.dtype) @ do
    delta = (do.float() * out.float()).sum(-1, keepdim=True)
    ds = p * ((do @ v.transpose(-1, -2)).float() - delta) * scale
    if softcap is not None:  # d/dx c tanh(x / c) = 1 - tanh^2
        ds = ds * (1 - (unmasked / softcap) ** 2)
    ds = ds.to(q.dtype)
    return ds @ k, ds.transpose(-1, -2) @ q, dv


def kernels_for(device: torch.device, force_math: bool, softcap: float | None = None) -> tuple:
    """(forward, backward) tile kernels for this device; soft-capped scores take the
    device-generic kernels (torch's fused CPU kernel cannot cap them)."""
    if softcap is not None:
        return (
            functools.partial(_math_forward, softcap=softcap),
            functools.partial(_math_backward, softcap=softcap),
        )
    if device.type == "cpu" and not force_math:
        return _cpu_forward, _cpu_backward
    return _math_forward, _math_backward


def _blocked(x: Tensor, unit: int) -> Tensor:
    """``(B, H, L, D)`` as ``(B*H*ceil(L/unit), unit, D)``: a view, or a zero-padded copy."""
    batch, heads, length, dim = x.shape
    n = -(-length // unit)
    if n * unit == length:
        return x.reshape(batch * heads * n, unit, dim)
    out = x.new_zeros(batch * heads * n, unit, dim)
    out.view(batch, heads, n * unit, dim)[:, :, :length] = x
    return out


class _Blocked:
    """Blocked views of one tensor, made once per unit size."""

    def __init__(self, x: Tensor) -> None:
        self.x, self.views = x, {}

    def view(self, unit: int) -> Tensor:
        """The blocked tensor for ``unit``."""
        if unit not in self.views:
            self.views[unit] = _blocked(self.x, unit)
        return self.views[unit]

    def gather(self, index: Tensor, unit: int) -> Tensor:
        """Rows of the blocks in ``index (N, n)``: ``(N, 1, n * unit, D)``."""
        return self.view(unit)[index].view(index.shape[0], 1, -1, self.x.shape[-1])


def _merge(
    sets: list[TileSet], outs: list[Tensor], lses: list[Tensor], n_rows: int, disjoint: bool
) -> tuple[Tensor, Tensor]:
    """Merge per-tile partial results into ``(out (n_rows, D), lse (n_rows,))`` per flat row."""
    index = torch.cat([ts.rows.reshape(-1) for ts in sets])
    out = torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])
    lse = torch.cat([x.reshape(-1) for x in lses])
    if disjoint:  # each row is in one tile at most: place it
        if not all(ts.every_row_has_key for ts in sets):
            out = out * torch.isfinite(lse)[:, None]
        merged = out.new_zeros(n_rows, out.shape[-1]).index_copy_(0, index, out)
        return merged, lse.new_full((n_rows,), float("-inf")).index_copy_(0, index, lse)
    top = torch.full((n_rows,), float("-inf"), device=lse.device).scatter_reduce(
        0, index, lse, "amax"
    )
    top = torch.where(torch.isfinite(top), top, 0.0)
    weight = torch.exp(lse - top[index])  # 0 where the set saw no key
    total = torch.zeros(n_rows, device=lse.device).index_add_(0, index, weight)
    merged = torch.zeros(n_rows, out.shape[-1], device=out.device).index_add_(
        0, index, out.float() * weight[:, None]
    )
    merged /= total.clamp_min(torch.finfo(total.dtype).tiny)[:, None]
    return merged.to(out.dtype), top + torch.log(total)


def _with_sinks(out: Tensor, lse: Tensor, sink: Tensor) -> tuple[Tensor, Tensor]:
    """Rows ``out (N, D)`` of log-sum-exp ``lse (N,)`` with one more logit, ``sink (N,)``,
    in their softmax denominator: ``out * sigmoid(lse - sink)``, and the joint log-sum-exp
    (-inf kept for rows that saw no key).

    A flash-style backward given these two in place of the plain ones computes exact
    gradients for q, k and v: the probabilities it recomputes are the joint ones, and the
    sink's column has no value.
    """
    total = torch.logaddexp(lse, sink)
    out = (out.float() * torch.exp(lse - total)[:, None]).to(out.dtype)
    return out, torch.where(torch.isfinite(lse), total, lse)


def _sink_gradient(grad: Tensor, out: Tensor, lse: Tensor, sink: Tensor) -> Tensor:
    """Per row, the gradient of the loss to the sink logit: ``-p_sink * <grad, out>``, where
    ``out`` and ``lse`` are :func:`_with_sinks`'s (``lse`` may be +inf for empty rows)."""
    return -torch.exp(sink - lse) * (grad.float() * out.float()).sum(-1)


class TileAttention(torch.autograd.Function):
    """Autograd function: attention of q over k, v restricted to a list of tile sets."""

    @staticmethod
    def forward(
        ctx,  # noqa: ANN001
        q: Tensor,
        k: Tensor,
        v: Tensor,
        sinks: Tensor | None,
        sets: list[TileSet],
        scale: float,
        force_math: bool,
        disjoint: bool,
        softcap: float | None,
    ) -> Tensor:
        forward, _ = kernels_for(q.device, force_math, softcap)
        qb, kb, vb = _Blocked(q), _Blocked(k), _Blocked(v)
        outs, lses, queries = [], [], []
        for ts in sets:
            queries.append(qb.gather(ts.q_index, ts.q_unit))
            out, lse = forward(
                queries[-1],
                kb.gather(ts.kv_index, ts.kv_unit),
                vb.gather(ts.kv_index, ts.kv_unit),
                ts.mask_as(q.dtype),
                scale,
            )  # (N, 1, R, Dv), (N, 1, R)
            outs.append(out)
            lse = lse[:, 0]
            lses.append(lse if ts.every_row_has_key else lse.masked_fill(~ts.has_key, -torch.inf))
        n_rows = q.shape[0] * q.shape[1] * q.shape[2] + 1  # the last row collects padding
        out, lse = _merge(sets, outs, lses, n_rows, disjoint)
        head = None
        if sinks is not None:  # flat row b*Hq*Lq + h*Lq + i belongs to head h
            head = torch.arange(n_rows, device=q.device) // q.shape[2] % q.shape[1]
            out, lse = _with_sinks(out, lse, sinks.float()[head])
        ctx.save_for_backward(q, k, v, out, lse, sinks, head)
        ctx.sets, ctx.scale, ctx.force_math, ctx.softcap = sets, scale, force_math, softcap
        # The gathered queries are kept for the backward pass (about 1 + top_k copies of q).
        ctx.queries = queries if any(ctx.needs_input_grad[:3]) else None
        return out[:-1].view(*q.shape[:3], v.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:  # noqa: ANN001
        q, k, v, out, lse, sinks, head = ctx.saved_tensors
        _, backward = kernels_for(q.device, ctx.force_math, ctx.softcap)
        kb, vb = _Blocked(k), _Blocked(v)
        grad = torch.cat([grad.reshape(-1, grad.shape[-1]), grad.new_zeros(1, grad.shape[-1])])
        # Rows that saw no key at all: +inf makes every recomputed probability zero.
        lse = torch.where(torch.isfinite(lse), lse, float("inf"))
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            per_row = _sink_gradient(grad, out, lse, sinks.float()[head])
            dsinks = torch.zeros(q.shape[1], device=q.device).index_add_(0, head, per_row)
            dsinks = dsinks.to(sinks.dtype)
        if ctx.queries is None:
            return None, None, None, dsinks, None, None, None, None, None
        # Partial gradients add up in float32 (a bfloat16 sum may lose a tile's share); one
        # cast at the end.
        dq = torch.zeros(out.shape[0], q.shape[-1], device=q.device)
        dkv: dict[int, tuple[Tensor, ...]] = {}  # per key unit: blocked dk, dv
        for ts, queries in zip(ctx.sets, ctx.queries, strict=True):
            rows = ts.rows
            g = grad[rows]
            if not ts.every_row_has_key:
                g = g * ts.has_key[..., None]  # rows without keys here contribute nothing
            dq_t, dk_t, dv_t = backward(
                g[:, None],
                queries,
                kb.gather(ts.kv_index, ts.kv_unit),
                vb.gather(ts.kv_index, ts.kv_unit),
                out[rows][:, None],
                lse[rows][:, None],
                ts.mask_as(q.dtype),
                ctx.scale,
            )
            dq.index_add_(0, rows.reshape(-1), dq_t.reshape(-1, q.shape[-1]).float())
            unit = ts.kv_unit
            if unit not in dkv:
                dkv[unit] = tuple(
                    torch.zeros(x.view(unit).shape, device=q.device) for x in (kb, vb)
                )
            for acc, part in zip(dkv[unit], (dk_t, dv_t), strict=True):
                acc.index_add_(
                    0, ts.kv_index.reshape(-1), part.float().reshape(-1, unit, part.shape[-1])
                )
        dk, dv = (
            sum(_unblocked(acc[i], x.shape) for acc in dkv.values()).to(x.dtype)
            for i, x in ((0, k), (1, v))
        )
        dq = dq[:-1].view_as(q).to(q.dtype)
        return dq, dk, dv, dsinks, None, None, None, None, None


def _unblocked(x: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`_blocked` for a gradient: drop the padding."""
    batch, heads, length, dim = shape
    return x.view(batch, heads, -1, dim)[:, :, :length]


def tile_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sets: list[TileSet],
    scale: float,
    force_math: bool = False,
    disjoint: bool = False,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """``(B, Hq, Lq, Dv)`` attention of q over the tiles in ``sets`` (differentiable).

    ``disjoint``: no query row appears in two tiles, so results are placed, not merged.
    ``softcap`` and ``sinks (Hq,)``: see ``kernels.reference`` (sinks are differentiable).

    A NaN key or value makes exactly the rows that see it NaN. A tile adds its mask to the
    scores and weighs every value row, so a NaN that the mask hides (NaN - inf, 0 * NaN)
    would reach the tile's other rows too: where k or v holds a NaN, the tiles run on zeros
    in its place and the rows that see it are set to NaN (``kernels.nan``).
    """

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return TileAttention.apply(q, k, v, sinks, sets, scale, force_math, disjoint, softcap)

    return with_nan_rows(attend, q, k, v)
