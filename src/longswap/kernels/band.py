"""The band path of ``blocks``: distance-only patterns through strided views, no gathers.

When visibility depends only on the distance ``q - kv`` and stops at a finite reach (a
sliding window, a dilated window, their unions and intersections), every chunk of ``C``
consecutive queries needs the same relative slice of keys: the ``P >= reach`` keys before
the chunk and the chunk's own. With ``P`` zero rows padded in front of the keys, all those
slices are one strided view ``(B*Hkv, n, C + P, D)`` of the padded keys, and one
``(R, C + P)`` mask serves every chunk. Only the first chunks, whose slices reach into the
padding, get masks of their own (a second, small kernel call). The ``G`` query heads that
share a key head are stacked into a chunk's rows (``R = G * C``), so keys are never
expanded. A decoding step is one short chunk: it reads the last ``P + Lq`` keys and none
before, however long the cache.

The backward pass runs the same tile kernels (``tile_attention.kernels_for``); the key and
value gradients of overlapping slices are added back ``C`` rows at a time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from longswap.kernels.tile_attention import cast_once, kernels_for
from longswap.patterns import Pattern

#: Query rows per chunk to aim for (all query heads of a key head together): the CPU
#: flash kernel works on slices of 64 rows from 192 rows on (benchmarks/attention.py).
BAND_ROWS = 192
#: Keys before a chunk are read in multiples of this many rows.
BAND_ALIGN = 64


@dataclass(frozen=True)
class Chunking:
    """Queries cut into ``chunks`` chunks of ``chunk`` positions; a chunk's rows are those
    positions in each of the ``groups`` query heads that share one key head."""

    chunk: int
    groups: int
    chunks: int

    @property
    def rows(self) -> int:
        """R: query rows per chunk."""
        return self.groups * self.chunk

    def to_chunks(self, x: Tensor, hkv: int) -> Tensor:
        """``(B, Hq, Lq, D)`` as ``(B*Hkv, n, R, D)``; a view when no padding or stacking.

        Padded rows are zero, so a padded gradient row adds nothing in a backward pass.
        """
        batch, hq, length, dim = x.shape
        n, c, g = self.chunks, self.chunk, self.groups
        if g == 1 and n * c == length:
            return x.reshape(batch * hkv, n, c, dim)
        out = x.new_empty(batch * hkv, n, g, c, dim)
        full, rest = divmod(length, c)
        heads = x.reshape(batch * hkv, g, length, dim)
        out[:, :full].copy_(heads[:, :, : full * c].view(-1, g, full, c, dim).transpose(1, 2))
        if rest:
            out[:, full, :, :rest].copy_(heads[:, :, full * c :])
            out[:, full, :, rest:].zero_()
        out[:, full + (rest > 0) :].zero_()
        return out.view(batch * hkv, n, g * c, dim)

    def from_chunks(self, x: Tensor, shape: torch.Size) -> Tensor:
        """Inverse of :meth:`to_chunks`: ``(B, Hq, Lq, D)`` without the padded rows."""
        batch, hq, length, dim = shape
        x = x.reshape(-1, self.chunks, self.groups, self.chunk, dim).transpose(1, 2)
        return x.reshape(batch, hq, -1, dim)[:, :, :length]


@dataclass(frozen=True)
class BandPlan(Chunking):
    """How one ``(Hq, Hkv, Lq, Lk)`` problem is cut into chunks of ``chunk`` queries.

    ``mask (1, 1, R, K)`` is every chunk's band. The first ``edge`` chunks' slices reach
    into the front padding; ``edge_mask (1, edge, R, K)`` also hides those zero keys.
    """

    before: int  # P: keys before a chunk's first query that its slice holds
    offset: int  # absolute position of query row 0 (Lk - Lq)
    mask: Tensor  # additive float32: 0 or -inf
    edge: int
    edge_mask: Tensor | None
    _cast: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def keys(self) -> int:
        """K: key rows per chunk slice."""
        return self.chunk + self.before

    @property
    def front(self) -> int:
        """Zero key rows padded in front of key 0."""
        return max(0, self.before - self.offset)

    @property
    def base(self) -> int:
        """Padded key row where chunk 0's slice starts."""
        return self.offset + self.front - self.before

    @property
    def padded_len(self) -> int:
        """Key rows after padding: up to the end of the last chunk's slice."""
        return self.offset + self.front + self.chunks * self.chunk

    def masks_as(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """``(mask, edge_mask)`` in ``dtype``."""
        mask = cast_once(self._cast, "mask", self.mask, dtype)
        return mask, cast_once(self._cast, "edge", self.edge_mask, dtype)


def band_applies(pattern: Pattern, num_heads: int) -> bool:
    """True when ``pattern`` depends on distance only, up to a finite reach, in every head."""
    return (
        pattern.translation_invariant
        and not pattern.data_dependent
        and pattern.reach() is not None
        and pattern.mask_heads(num_heads) == 1
    )


@functools.lru_cache(maxsize=16)
def band_plan(
    pattern: Pattern, hq: int, hkv: int, q_len: int, kv_len: int, device: torch.device
) -> BandPlan | None:
    """The chunking of one shape, or None when the tiles serve it better.

    None when the reach is long for this length (each chunk would read a quarter of the
    keys or more: the block tiles skip more), or when a real query row would see no key.
    """
    groups = hq // hkv
    chunk = min(max(1, -(-BAND_ROWS // groups)), q_len)  # a decoding step: one short chunk
    reach = pattern.reach()
    assert reach is not None
    before = -(-max(reach, 1) // BAND_ALIGN) * BAND_ALIGN
    if 4 * before > kv_len:
        return None
    offset = kv_len - q_len  # absolute position of query row 0
    chunks = -(-q_len // chunk)
    edge = min(chunks, max(0, -(-(before - offset) // chunk)))  # slices starting before key 0
    visible_fn = pattern.mask_fn(kv_len, hq, device)

    def mask(first: int, count: int) -> Tensor | None:
        c = torch.arange(first, first + count, device=device)[:, None, None]
        q_pos = offset + c * chunk + torch.arange(chunk, device=device)[:, None]  # (n, C, 1)
        kv_pos = offset + c * chunk - before + torch.arange(chunk + before, device=device)
        visible = visible_fn(q_pos, kv_pos, torch.zeros((), device=device)) & (kv_pos >= 0)
        seen = visible.any(-1, keepdim=True)
        if not seen[q_pos < kv_len].all():
            return None
        visible |= ~seen  # padded rows without a key: any finite result will do (dropped)
        additive = torch.zeros(visible.shape, device=device).masked_fill_(~visible, -torch.inf)
        return additive.repeat(1, groups, 1)[None]  # rows: query head, then position

    shared = mask(edge, 1)  # any chunk past the edge: the band is the same for all
    edge_mask = mask(0, edge) if edge else None
    if shared is None or (edge and edge_mask is None):
        return None
    return BandPlan(chunk, groups, chunks, before, offset, shared, edge, edge_mask)


def _padded_keys(x: Tensor, plan: BandPlan) -> Tensor:
    """``(B, Hkv, Lk, D)`` as contiguous ``(B*Hkv, padded_len, D)``, zero rows around."""
    batch, heads, length, dim = x.shape
    front = plan.front
    if front == 0 and plan.padded_len == length:  # slices are strided views: contiguous
        return x.reshape(batch * heads, length, dim).contiguous()
    out = x.new_empty(batch * heads, plan.padded_len, dim)
    out[:, :front].zero_()
    out[:, front + length :].zero_()
    out[:, front : front + length].view(batch, heads, length, dim).copy_(x)
    return out


def _slices(keys: Tensor, plan: BandPlan, count: int) -> Tensor:
    """The overlapping key slices of the first ``count`` chunks: ``(B*Hkv, count, K, D)``."""
    rows, dim = keys.shape[1], keys.shape[2]
    return keys.as_strided(
        (keys.shape[0], count, plan.keys, dim),
        (rows * dim, plan.chunk * dim, dim, 1),
        keys.storage_offset() + plan.base * dim,
    )


def _fold(grad: Tensor, plan: BandPlan) -> Tensor:
    """Add per-slice key gradients ``(B*Hkv, n, K, D)`` back into ``(B*Hkv, Lpad, D)``.

    Slot ``s`` of chunk ``c`` is padded key row ``base + c*C + s``: cut the slots into
    pieces of ``C`` and piece ``j`` of every chunk lands on block ``c + j``.
    """
    c, n, pieces = plan.chunk, plan.chunks, -(-plan.keys // plan.chunk)
    acc = grad.new_empty(grad.shape[0], plan.base + (n + pieces) * c, grad.shape[-1])
    acc[:, : plan.base].zero_()
    blocks = acc[:, plan.base :].view(acc.shape[0], n + pieces, c, -1)
    blocks[:, :n].copy_(grad[:, :, :c])
    blocks[:, n:].zero_()
    for j in range(1, pieces):
        width = min(c, plan.keys - j * c)
        blocks[:, j : n + j, :width] += grad[:, :, j * c : j * c + width]
    return acc[:, : plan.padded_len]


class BandAttention(torch.autograd.Function):
    """Autograd function: attention of q over k, v along a :class:`BandPlan`.

    One kernel call covers every chunk under the shared band mask; the first ``edge``
    chunks are then recomputed under their own masks and overwritten. The backward pass
    needs no second call: with the right output and log-sum-exp, the zero padding keys an
    edge chunk saw in the first call get probabilities but change neither dq (their keys
    are zero) nor any real key's gradient (their rows are dropped).
    """

    @staticmethod
    def forward(
        ctx,  # noqa: ANN001
        q: Tensor,
        k: Tensor,
        v: Tensor,
        plan: BandPlan,
        scale: float,
        force_math: bool,
    ) -> Tensor:
        forward, _ = kernels_for(q.device, force_math)
        qc, kp, vp = plan.to_chunks(q, k.shape[1]), _padded_keys(k, plan), _padded_keys(v, plan)
        mask, edge_mask = plan.masks_as(q.dtype)
        n, e = plan.chunks, plan.edge
        out, lse = forward(qc, _slices(kp, plan, n), _slices(vp, plan, n), mask, scale)
        if e:
            out_e, lse_e = forward(
                qc[:, :e], _slices(kp, plan, e), _slices(vp, plan, e), edge_mask, scale
            )
            out[:, :e], lse[:, :e] = out_e, lse_e
        ctx.save_for_backward(qc, kp, vp, out, lse)
        ctx.plan, ctx.scale, ctx.force_math = plan, scale, force_math
        ctx.shapes = q.shape, k.shape
        return plan.from_chunks(out, q.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:  # noqa: ANN001
        qc, kp, vp, out, lse = ctx.saved_tensors
        plan, (q_shape, k_shape) = ctx.plan, ctx.shapes
        _, backward = kernels_for(qc.device, ctx.force_math)
        n = plan.chunks
        dq, dk, dv = backward(
            plan.to_chunks(grad, k_shape[1]),
            qc,
            _slices(kp, plan, n),
            _slices(vp, plan, n),
            out,
            lse,
            plan.masks_as(qc.dtype)[0],
            ctx.scale,
        )
        front, length = plan.front, k_shape[2]
        dk, dv = (_fold(d, plan)[:, front : front + length].reshape(k_shape) for d in (dk, dv))
        return plan.from_chunks(dq, q_shape), dk, dv, None, None, None


def band_attention(
    q: Tensor, k: Tensor, v: Tensor, plan: BandPlan, scale: float, force_math: bool = False
) -> Tensor:
    """``(B, Hq, Lq, Dv)`` attention of q over k, v along ``plan`` (differentiable)."""
    return BandAttention.apply(q, k, v, plan, scale, force_math)
