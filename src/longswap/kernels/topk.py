"""``block_topk`` in ``blocks``: the own block through views, the selected blocks as tiles.

Each query sees its own block (causally) and the blocks it selected. The own block needs
no index lists: with block-aligned queries, query chunk ``c`` meets key block
``c + (Lk - Lq) / block`` and every chunk shares one causal mask, so q, k and v are read
through views. The selected blocks are grouped by key block: one tile per (key head, key
block) holds every query row that chose it (:func:`group_by_block`), so each key block is
read once. The partial results merge through their log-sum-exp; the backward pass runs
the same kernels from the merged output, as FlashAttention does across key splits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from longswap.kernels.band import Chunking
from longswap.kernels.tile_attention import cast_once, kernels_for

#: Buckets per doubling of the rows a key block collects (fewer padded rows, more calls).
BUCKETS_PER_OCTAVE = 4


@torch.no_grad()
def group_by_block(
    row: Tensor, key_block: Tensor, n_blocks: int, sentinel: int
) -> list[tuple[Tensor, Tensor]]:
    """Tiles of (query row, key block) pairs: one per key block that some row chose.

    ``row`` and ``key_block`` are ``(S,)``; returns one ``(rows (T, W), blocks (T,))`` per
    bucket of key blocks with similar counts; unused row slots hold ``sentinel``. Rows keep
    their order inside a tile.
    """
    device = row.device
    counts = torch.bincount(key_block, minlength=n_blocks)
    used = torch.nonzero(counts).squeeze(1)  # key blocks that some row chose
    level = torch.ceil(BUCKETS_PER_OCTAVE * torch.log2(counts[used].float())).long()
    # Blocks ordered by (bucket, block); pairs follow their block, so a bucket is one slice.
    by_level = torch.argsort(level * n_blocks + used)
    block_order, level = used[by_level], level[by_level]
    position = torch.empty_like(counts)
    position[block_order] = torch.arange(block_order.numel(), device=device)
    order = torch.argsort(position[key_block], stable=True)
    key_block, row = key_block[order], row[order]
    block_start = torch.cumsum(counts[block_order], 0) - counts[block_order]  # first pair
    rank = torch.arange(row.numel(), device=device) - block_start[position[key_block]]
    per_level = torch.unique_consecutive(level, return_counts=True)[1]
    tiles, first_block = [], 0
    for n_tiles in per_level.tolist():
        blocks = block_order[first_block : first_block + n_tiles]  # (T,)
        lo = int(block_start[first_block])
        hi = lo + int(counts[blocks].sum())
        width = int(counts[blocks].max())
        tile = position[key_block[lo:hi]] - first_block
        rows = torch.full((n_tiles * width,), sentinel, device=device)
        rows[tile * width + rank[lo:hi]] = row[lo:hi]
        tiles.append((rows.view(-1, width), blocks))
        first_block += n_tiles
    return tiles


@dataclass(frozen=True)
class OwnBlockPlan(Chunking):
    """Chunks of one key block's width, aligned with the key blocks."""

    first: int  # key block of query chunk 0
    key_blocks: int  # key blocks per key head, the last one possibly short
    mask: Tensor  # (1, 1, R, block): causal inside the block, for each stacked query head
    _cast: dict = field(default_factory=dict, compare=False, repr=False)

    def mask_as(self, dtype: torch.dtype) -> Tensor:
        """The mask in ``dtype``."""
        return cast_once(self._cast, "mask", self.mask, dtype)


@functools.lru_cache(maxsize=16)
def own_block_plan(
    block: int, hq: int, hkv: int, q_len: int, kv_len: int, device: torch.device
) -> OwnBlockPlan | None:
    """The plan of one shape; None unless the queries start on a block boundary."""
    offset = kv_len - q_len
    if offset % block or q_len < block:
        return None
    groups = hq // hkv
    r = torch.arange(block, device=device)
    causal = torch.zeros(block, block, device=device).masked_fill_(r[None] > r[:, None], -torch.inf)
    mask = causal.repeat(groups, 1)[None, None]
    return OwnBlockPlan(
        block, groups, -(-q_len // block), offset // block, -(-kv_len // block), mask
    )


def _key_blocks(x: Tensor, plan: OwnBlockPlan) -> Tensor:
    """``(B, Hkv, Lk, D)`` as contiguous ``(B*Hkv, key_blocks, block, D)``, zero rows at the
    end (contiguous, so that the selected blocks are gathered from one flat view)."""
    batch, heads, length, dim = x.shape
    padded = plan.key_blocks * plan.chunk
    if padded != length:
        x = torch.nn.functional.pad(x, (0, 0, 0, padded - length))
    return x.reshape(batch * heads, plan.key_blocks, plan.chunk, dim).contiguous()


def selected_rows(
    blocks: Tensor, chosen: Tensor, plan: OwnBlockPlan, hkv: int
) -> tuple[Tensor, Tensor]:
    """``(row, key_block)`` of every selection: ``blocks``/``chosen (B, Hq, Lq, P)``.

    Rows index the flat chunk layout ``(B*Hkv*n_chunks*R)``; key blocks index the flat
    ``(B*Hkv*key_blocks)`` blocks.
    """
    batch, hq, q_len, _ = blocks.shape
    arange = functools.partial(torch.arange, device=blocks.device)
    b, h, i = arange(batch)[:, None, None], arange(hq)[:, None], arange(q_len)
    head = b * hkv + h // plan.groups  # (B, Hq, 1)
    chunk, pos = i // plan.chunk, i % plan.chunk
    row = ((head * plan.chunks + chunk) * plan.groups + h % plan.groups) * plan.chunk + pos
    key_block = head[..., None] * plan.key_blocks + blocks
    return row[..., None].expand_as(blocks)[chosen], key_block[chosen]


def _gather(x: Tensor, rows: Tensor) -> Tensor:
    """Rows ``(T, W)`` of a flat ``(M, ...)`` tensor as ``(T, 1, W, ...)``."""
    picked = torch.index_select(x, 0, rows.reshape(-1))
    return picked.view(rows.shape[0], 1, rows.shape[1], *x.shape[1:])


class TopKAttention(torch.autograd.Function):
    """Autograd function: own block by views plus selected key blocks by tiles."""

    @staticmethod
    def forward(
        ctx,  # noqa: ANN001
        q: Tensor,
        k: Tensor,
        v: Tensor,
        plan: OwnBlockPlan,
        tiles: list[tuple[Tensor, Tensor]],
        scale: float,
        force_math: bool,
    ) -> Tensor:
        forward, _ = kernels_for(q.device, force_math)
        n, dim = plan.chunks, q.shape[-1]
        qc, kb, vb = plan.to_chunks(q, k.shape[1]), _key_blocks(k, plan), _key_blocks(v, plan)
        own = slice(plan.first, plan.first + n)
        mask = plan.mask_as(q.dtype)
        out, lse = forward(qc, kb[:, own], vb[:, own], mask, scale)  # (N, n, R, D), (N, n, R)
        m = out.numel() // dim  # rows; row m collects the padding slots of the tiles
        lse = lse.reshape(m)
        top = torch.cat([lse, lse.new_full((1,), -torch.inf)])
        q_flat, kb_flat, vb_flat = qc.reshape(m, dim), kb.flatten(0, 1), vb.flatten(0, 1)
        parts, queries = [], []
        for rows, blocks in tiles:
            queries.append(_gather(q_flat, rows.clamp_max(m - 1)))
            o_t, l_t = forward(
                queries[-1],
                _gather(kb_flat, blocks[:, None]).flatten(2, 3),
                _gather(vb_flat, blocks[:, None]).flatten(2, 3),
                None,
                scale,
            )  # (T, 1, W, D), (T, 1, W)
            parts.append((rows.reshape(-1), o_t.reshape(-1, dim), l_t.reshape(-1)))
            top.scatter_reduce_(0, parts[-1][0], parts[-1][2], "amax")
        weight = torch.exp(lse - top[:m])
        total = torch.cat([weight, weight.new_zeros(1)])
        acc = weight.new_empty(m + 1, dim)
        torch.mul(out.reshape(m, dim), weight[:, None], out=acc[:m])
        acc[m] = 0
        for rows, o_t, l_t in parts:
            w = torch.exp(l_t - top[rows])
            total.index_add_(0, rows, w)
            acc.index_add_(0, rows, o_t.float() * w[:, None])
        out = (acc[:m] / total[:m, None]).to(q.dtype)
        lse = top[:m] + torch.log(total[:m])
        ctx.save_for_backward(qc, kb, vb, out, lse)
        ctx.tiles, ctx.queries = tiles, queries
        ctx.plan, ctx.scale, ctx.force_math, ctx.shapes = (
            plan,
            scale,
            force_math,
            (q.shape, k.shape),
        )
        return plan.from_chunks(out.view_as(qc), q.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:  # noqa: ANN001
        qc, kb, vb, out, lse = ctx.saved_tensors
        plan, (q_shape, k_shape) = ctx.plan, ctx.shapes
        _, backward = kernels_for(qc.device, ctx.force_math)
        n, dim, m = plan.chunks, qc.shape[-1], out.shape[0]
        g = plan.to_chunks(grad, k_shape[1])
        own = slice(plan.first, plan.first + n)
        dq, dk_own, dv_own = backward(
            g,
            qc,
            kb[:, own],
            vb[:, own],
            out.view_as(qc),
            lse.view(qc.shape[:3]),
            plan.mask_as(qc.dtype),
            ctx.scale,
        )
        # Partial gradients add up in float32, whatever the inputs' dtype.
        if n == plan.key_blocks:  # the own blocks are all the key blocks
            dk, dv = dk_own.float(), dv_own.float()
        else:
            dk, dv = (torch.zeros_like(x, dtype=torch.float32) for x in (kb, vb))
            dk[:, own], dv[:, own] = dk_own, dv_own
        dq, dk, dv = dq.reshape(m, dim).float(), dk.flatten(0, 1), dv.flatten(0, 1)
        g_flat, kb_flat, vb_flat = g.reshape(m, dim), kb.flatten(0, 1), vb.flatten(0, 1)
        # Padding slots: +inf log-sum-exp makes their probabilities, hence their gradients, 0.
        lse = torch.cat([lse, lse.new_full((1,), torch.inf)])
        for (rows, blocks), queries in zip(ctx.tiles, ctx.queries, strict=True):
            clamped = rows.clamp_max(m - 1)
            dq_t, dk_t, dv_t = backward(
                _gather(g_flat, clamped),
                queries,
                _gather(kb_flat, blocks[:, None]).flatten(2, 3),
                _gather(vb_flat, blocks[:, None]).flatten(2, 3),
                _gather(out, clamped),
                _gather(lse, rows),
                None,
                ctx.scale,
            )
            dq.index_add_(0, clamped.reshape(-1), dq_t.reshape(-1, dim).float())
            dk.index_add_(0, blocks, dk_t.reshape(blocks.numel(), -1, dim).float())
            dv.index_add_(0, blocks, dv_t.reshape(blocks.numel(), -1, dim).float())
        batch, hkv, length, _ = k_shape
        dk, dv = (x.reshape(batch, hkv, -1, dim)[:, :, :length].to(qc.dtype) for x in (dk, dv))
        dq = plan.from_chunks(dq.to(qc.dtype).view_as(qc), q_shape)
        return dq, dk, dv, None, None, None, None


def topk_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: OwnBlockPlan,
    selection: tuple[Tensor, Tensor],
    scale: float,
    force_math: bool = False,
) -> Tensor:
    """``(B, Hq, Lq, Dv)``: own block plus the selected key blocks.

    ``selection``: ``BlockTopK.select_blocks``'s ``(blocks, chosen)``.
    """
    hkv = k.shape[1]
    row, key_block = selected_rows(*selection, plan, hkv)
    n_blocks = q.shape[0] * hkv * plan.key_blocks
    sentinel = q.shape[0] * hkv * plan.chunks * plan.rows
    tiles = group_by_block(row, key_block, n_blocks, sentinel)
    return TopKAttention.apply(q, k, v, plan, tiles, scale, force_math)
