"""The ``blocks`` backend: visits only the key blocks each query block needs.

PyTorch throughout, except sliding and dilated windows in float32 or bfloat16 on CPU, which
run a small C++ kernel compiled on first use (``window_cpu``; ``LONGSWAP_CPU_KERNEL=0`` keeps
them in PyTorch). Differentiable on CPU and GPU; time and memory are O(L x keys visited
per query), never O(L^2) for a sparse pattern. The pattern becomes tiles (see ``tile_attention``):

* sliding and dilated windows in float32 or bfloat16 on CPU: a C++ kernel that computes
  each block of 64 query rows against exactly its key range (``window_cpu``).
* other distance-only patterns (unions and intersections of windows; windows in float16,
  on other devices or without the kernel): overlapping key slices read as strided views
  (``band``).
* static patterns: one tile per (batch, key head, query block) holding the query rows of
  all ``G`` query heads that share the key head (grouped-query attention without expanding
  keys), against the key blocks of the block structure. Per-head patterns get one tile per
  query head instead. Tiles are built once per shape and cached.
* decoding steps (a few queries) of selection patterns: their static keys and selected
  blocks gathered per key head (``decode``).
* block selections in float32 or bfloat16 on CPU (``block_topk``, ``learned_topk``, and
  their unions with a sliding window and sinks): two C++ kernels, the static part through the window
  kernel and the selected blocks grouped by key block (``selection_cpu``).
* ``block_topk`` elsewhere: the own block is a static tile set; every (query, selected block) pair
  is grouped by key block, so that each key block is one tile holding the queries that
  chose it. The sets merge per query row through their log-sum-exp.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from longswap.kernels.band import band_applies, band_attention, band_plan
from longswap.kernels.decode import DECODE_ROWS, selection_decode
from longswap.kernels.selection_cpu import (
    selection_attention,
    selection_kernel_applies,
    top_blocks,
)
from longswap.kernels.tile_attention import TileSet, tile_attention
from longswap.kernels.topk import group_by_block, own_block_plan, topk_attention
from longswap.kernels.window_cpu import window_attention, window_kernel_applies
from longswap.patterns import BlockStructure, BlockTopK, Pattern, Selection, SelectionUnion
from longswap.patterns.base import compact

#: Query rows a tile should hold at least: the CPU flash kernel works on slices of 32 rows
#: below 192 rows and of 64 above, which runs much faster (benchmarks/attention.py).
MIN_TILE_ROWS = 256


@functools.lru_cache(maxsize=16)
def static_tiles(
    pattern: Pattern,
    batch: int,
    hq: int,
    hkv: int,
    q_len: int,
    kv_len: int,
    block_size: int,
    device: torch.device,
) -> tuple[TileSet, ...]:
    """Tiles of a static pattern for one shape (cached: a model reuses them every layer).

    A tile holds ``m`` consecutive query blocks (enough for ``MIN_TILE_ROWS`` rows, counting
    the query heads that share a key head) against the union of their key blocks. Tiles are
    bucketed by how many key blocks they visit (up to the next power of two), so that a few
    dense rows (a global query, the first blocks) do not widen every tile.
    """
    st = pattern.block_structure(q_len, kv_len, block_size, hq, device)
    g_rows = hq // hkv if st.num_heads == 1 else 1
    m = max(1, -(-MIN_TILE_ROWS // (g_rows * block_size)))
    visited, _ = st.tile_maps()  # (Hs, nQ, nK)
    n_groups = -(-visited.shape[1] // m)
    visited = F.pad(visited, (0, 0, 0, n_groups * m - visited.shape[1]))
    visited = visited.view(visited.shape[0], n_groups, m, -1).any(2)  # (Hs, nG, nK)
    indices, valid = compact(visited)
    width = valid.sum(-1).clamp_min(1)
    bucket = torch.ceil(torch.log2(width.float())).long()
    return tuple(
        _tiles_for(pattern, st, m, indices, valid, torch.nonzero(bucket == level), batch, hq, hkv)
        for level in torch.unique(bucket).tolist()
    )


def _tiles_for(
    pattern: Pattern,
    st: BlockStructure,
    m: int,
    indices: Tensor,
    valid: Tensor,
    picked: Tensor,
    batch: int,
    hq: int,
    hkv: int,
) -> TileSet:
    """One tile set for the (structure head, query group) pairs in ``picked (T, 2)``.

    ``indices``/``valid (Hs, nG, S)``: the key blocks of each group of ``m`` query blocks.
    """
    device, bs, g = picked.device, st.block_size, hq // hkv
    q_len, kv_len = st.q_len, st.kv_len
    sh, qg = picked[:, 0], picked[:, 1]  # structure head, query group
    t = qg.numel()
    slots = int(valid[sh, qg].sum(-1).max().clamp_min(1))
    idx, ok = indices[sh, qg, :slots], valid[sh, qg, :slots]  # (T, S)
    arange = functools.partial(torch.arange, device=device)
    n_qb, n_kb = -(-q_len // bs), -(-kv_len // bs)
    rel = qg[:, None] * (m * bs) + arange(m * bs)  # (T, m*bs) query row within q
    kpos = (idx[..., None] * bs + arange(bs)).view(t, slots * bs)  # (T, S*bs)
    k_ok = ok.repeat_interleave(bs, -1) & (kpos < kv_len)
    visible = (
        pattern.mask_fn(kv_len, hq, device)(
            (rel + kv_len - q_len)[:, :, None], kpos[:, None, :], sh.view(-1, 1, 1)
        )
        & k_ok[:, None, :]
    )  # (T, m*bs, S*bs)
    if st.num_heads == 1:  # tile axis: key heads; rows: the G query heads sharing each one
        hx, g_rows = hkv, g
        qh = (arange(hkv)[:, None] * g + arange(g)).view(1, hkv, 1, g, 1)
        kvh = arange(hkv).view(1, hkv, 1, 1)
    else:  # one tile per (query head, query group): the head is part of the picked pair
        hx, g_rows = 1, 1
        qh, kvh = sh.view(1, 1, t, 1, 1), (sh // g).view(1, 1, t, 1)
    b = arange(batch).view(batch, 1, 1, 1, 1)
    # Query blocks in the blocked space (B*Hq*nQ); past the last block, any block will do.
    qblock = torch.clamp(qg.view(1, 1, t, 1, 1) * m + arange(m), max=n_qb - 1)
    q_index = (b * hq + qh) * n_qb + qblock  # (B, hx, T, g_rows, m)
    # Flat output rows (B*Hq*Lq space; the extra last row collects padding).
    rows = (b * hq + qh) * q_len + rel.view(1, 1, t, 1, m * bs)
    rows = torch.where(rel.view(1, 1, t, 1, m * bs) < q_len, rows, batch * hq * q_len)
    kv_index = (b[..., 0] * hkv + kvh) * n_kb + idx.view(1, 1, t, slots)
    kv_index = torch.where(ok.view(1, 1, t, slots), kv_index, 0)  # unused slots are masked
    n_tiles = batch * hx * t
    visible = visible.view(1, 1, t, 1, m * bs, -1).expand(batch, hx, t, g_rows, m * bs, -1)
    return TileSet.build(
        q_index.reshape(n_tiles, g_rows * m),
        bs,
        kv_index.reshape(n_tiles, slots),
        bs,
        rows.reshape(n_tiles, g_rows * m * bs),
        visible.reshape(n_tiles, g_rows * m * bs, slots * bs),
    )


def _per_key(values: Tensor, hkv: int, unit: int, fill: int) -> Tensor:
    """``(B, Lk)`` per-key values in the blocked key space ``(B*Hkv*n, unit)``."""
    batch, kv_len = values.shape
    n = -(-kv_len // unit)
    out = values.new_full((batch * hkv * n, unit), fill)
    out.view(batch, hkv, n * unit)[:, :, :kv_len] = values[:, None]
    return out


def _with_padding(tiles: TileSet, key_padding_mask: Tensor, hkv: int) -> TileSet:
    """``tiles`` restricted to the keys that ``key_padding_mask (B, Lk)`` keeps."""
    keep = _per_key(key_padding_mask, hkv, tiles.kv_unit, False)
    return tiles.restricted(keep[tiles.kv_index].view(tiles.kv_index.shape[0], 1, -1))


@torch.no_grad()
def selected_tiles(
    blocks: Tensor,
    chosen: Tensor,
    hkv: int,
    kv_len: int,
    block_size: int,
    union: SelectionUnion | None = None,
) -> tuple[TileSet, ...]:
    """Tiles for the selected blocks: ``Selection.select_blocks``'s ``(blocks, chosen)``,
    each ``(B, Hq, Lq, P)``.

    One tile per key block, holding every query row (of every query head sharing the key
    head) that selected it (:func:`longswap.kernels.topk.group_by_block`). With a
    ``union``, the keys its static part shows are left out (the static tiles cover them,
    and no key may count twice): the few (row, block) pairs where the static part shows
    some of the block go to tiles of their own, with a mask; the others need none.
    """
    batch, hq, q_len, _ = blocks.shape
    arange = functools.partial(torch.arange, device=blocks.device)
    h = arange(hq)[:, None]
    row = (arange(batch)[:, None, None] * hq + h) * q_len + arange(q_len)  # (B, Hq, Lq)
    head = arange(batch)[:, None, None] * hkv + h // (hq // hkv)  # (B, Hq, 1)
    n_kv_blocks = -(-kv_len // block_size)  # blocks per key head in the blocked key space
    key_block = head[..., None] * n_kv_blocks + blocks
    sentinel = batch * hq * q_len
    rows, key_blocks = row[..., None].expand_as(blocks)[chosen], key_block[chosen]
    parts = [(rows, key_blocks, None)]
    if union is not None:
        some, _ = union.static_cover(q_len, kv_len, blocks.device)  # (Lq, n)
        mixed = some[rows % q_len, key_blocks % n_kv_blocks]
        parts = [(rows[~mixed], key_blocks[~mixed], None), (rows[mixed], key_blocks[mixed], union)]
    out = []
    for pair_rows, pair_blocks, masked in parts:
        if not pair_rows.numel():
            continue
        for tile_rows, tile_blocks in group_by_block(
            pair_rows, pair_blocks, batch * hkv * n_kv_blocks, sentinel
        ):
            visible = None
            if masked is not None:
                q_pos = (tile_rows % q_len + kv_len - q_len)[:, :, None]  # (T, W, 1)
                k_pos = (tile_blocks % n_kv_blocks * block_size)[:, None, None]
                k_pos = k_pos + arange(block_size)
                hidden = masked.static.mask_fn(kv_len)(q_pos, k_pos, arange(1))
                visible = ~hidden
            out.append(
                TileSet.build(
                    tile_rows.clamp_max(sentinel - 1),
                    1,
                    tile_blocks[:, None],
                    block_size,
                    tile_rows,
                    visible,
                )
            )
    return tuple(out)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``full()`` without padding: every causal pair is needed, so the causal flash kernel
    of SDPA is the block kernel (no tiles, no L x L mask; grouped heads are not expanded)."""
    q_len, kv_len = q.shape[2], k.shape[2]
    mask = None
    if 1 < q_len != kv_len:  # queries sit at the end of the keys: causal from the bottom right
        position = torch.arange(kv_len, device=q.device)
        mask = position[None] <= position[kv_len - q_len :, None]
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=mask is None and q_len > 1,  # one query row sees every key
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )


def blocks_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern,
    scale: float,
    key_padding_mask: Tensor | None = None,
    block_size: int | None = None,
    force_math: bool = False,
    block_scores: Tensor | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Sparse attention that touches only the blocks the pattern needs (any device, autograd).

    ``block_size``: tile rows of the static tiles (None: 128). ``force_math`` runs the
    device-generic tile kernels on CPU too (tests compare both). ``softcap`` and ``sinks``
    (see ``kernels.reference``) take the tiles for every pattern (SDPA, the C++ window
    kernel and the band path apply neither); soft-capped tiles run the generic kernels.
    """
    block_size = block_size or 128
    batch, hq, q_len, _ = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    plain = key_padding_mask is None
    fast = plain and softcap is None and sinks is None
    # Dense attention here (SDPA's causal kernel), unless given scores leave blocks out.
    if fast and block_scores is None and pattern.covers(kv_len):
        return causal_attention(q, k, v, scale)
    if fast and not force_math and window_kernel_applies(pattern, q):
        return window_attention(q, k, v, pattern, scale)
    if fast and band_applies(pattern, hq):
        plan = band_plan(pattern, hq, hkv, q_len, kv_len, q.device)
        if plan is not None:
            return band_attention(q, k, v, plan, scale, force_math)
    if plain and isinstance(pattern, Selection) and q_len <= DECODE_ROWS:
        return selection_decode(q, k, v, pattern, scale, block_scores, softcap, sinks)
    if fast and not force_math and selection_kernel_applies(pattern, q):
        selection = pattern.select_blocks(q, k, block_scores=block_scores, top=top_blocks)
        return selection_attention(q, k, v, pattern, selection, scale)
    if fast and isinstance(pattern, BlockTopK):
        own = own_block_plan(pattern.block_size, hq, hkv, q_len, kv_len, q.device)
        if own is not None:
            selection = pattern.select_blocks(q, k, block_scores=block_scores)
            return topk_attention(q, k, v, own, selection, scale, force_math)
    sets = list(static_tiles(pattern, batch, hq, hkv, q_len, kv_len, block_size, q.device))
    if pattern.data_dependent:
        assert isinstance(pattern, Selection)
        selection = pattern.select_blocks(q, k, key_padding_mask, block_scores)
        union = pattern if isinstance(pattern, SelectionUnion) else None
        sets += selected_tiles(*selection, hkv, kv_len, pattern.block_size, union)
    if key_padding_mask is not None:
        sets = [_with_padding(s, key_padding_mask, hkv) for s in sets]
    disjoint = not pattern.data_dependent
    return tile_attention(q, k, v, sets, scale, force_math, disjoint, softcap, sinks)
