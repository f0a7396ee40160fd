"""Decoding steps of selection patterns: attend to the static keys and selected blocks only.

A decoding step has a few queries (one per sequence, or a few under speculative decoding)
over a long cache. For ``block_topk``, ``learned_topk`` and their unions with static
patterns, each query sees its static keys (own block, window, sinks) and ``top_k`` selected
blocks. This path gathers exactly those keys, once per KV head (the union of its query
heads' selections, each head masked to its own), and attends over them: the work per
step is O(static keys + top_k x block) instead of O(L). With a summarising cache
(``longswap.swap.sparse_cache``), the scores it selects by are O(L / block) as well.

One query row on CPU without gradients (a plain decoding step) is one call of a C++
kernel (``csrc/selection_decode.cpp``, built on first use by ``kernels.cpp``): the top-k,
then each head's scores and weighted values over exactly its keys, read in place. What a
query sees whatever the data (its static keys, its candidate blocks) is the same for every
layer of a step and is computed for a block of positions at once.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from longswap.kernels.cpp import compiled
from longswap.kernels.reference import masked_attention
from longswap.patterns import Selection
from longswap.patterns.base import compact

#: Calls with up to this many query rows are decoding steps.
DECODE_ROWS = 16


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """Rows ``index (B, Hkv, M)`` of x ``(B, Hkv, L, D)``, as ``(B, Hkv, M, D)``.

    Whole rows are copied at once (much faster than an element-wise gather), read in place
    when x is a view into a larger buffer (a growing cache's), never copied whole.
    """
    batch, heads, length, dim = x.shape
    if x.stride(-1) != 1 or x.stride(-2) != dim:
        x = x.contiguous()
    step_b, step_h = x.stride(0) // dim, x.stride(1) // dim
    span = (batch - 1) * step_b + (heads - 1) * step_h + length
    flat = x.as_strided((span, dim), (dim, 1))
    arange = functools.partial(torch.arange, device=x.device)
    base = arange(batch).view(batch, 1, 1) * step_b + arange(heads).view(1, heads, 1) * step_h
    rows = torch.index_select(flat, 0, (index + base).reshape(-1))
    return rows.view(batch, heads, -1, dim)


def selection_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Selection,
    scale: float,
    block_scores: Tensor | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """``(B, Hq, Lq, Dv)``: attention of a few queries over their static keys and the blocks
    they select (``pattern.select`` with ``block_scores``), computed in float32.

    Equals the dense oracle (``softcap`` and ``sinks`` as there); rows with no visible key
    are zero.
    """
    extras = softcap, sinks
    if q.shape[2] == 1:
        return _one_query(q, k, v, pattern, scale, block_scores, extras)
    batch, hq, q_len, _ = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    group, size, device = hq // hkv, pattern.block_size, q.device
    static = pattern.dense_mask(q_len, kv_len, device=device)[0]  # (Lq, L)
    static_keys = torch.nonzero(static.any(0)).squeeze(1)  # (S,)
    selected = pattern.select(q, k, block_scores=block_scores)  # (B, Hq, Lq, n)
    n = selected.shape[-1]
    per_kv = selected.view(batch, hkv, group * q_len, n).any(2)  # (B, Hkv, n)
    blocks, used = compact(per_kv)  # (B, Hkv, P): the blocks some head of the group chose
    block_pos = (blocks[..., None] * size + torch.arange(size, device=device)).flatten(-2)
    index = torch.cat([static_keys.expand(batch, hkv, -1), block_pos], -1)  # (B, Hkv, M)
    # Which gathered keys each (head, row) sees: its static keys; in its selected blocks,
    # the keys the static part does not already show (so that no key counts twice).
    heads = blocks.repeat_interleave(group, 1)[:, :, None, :].expand(-1, -1, q_len, -1)
    chosen = torch.gather(selected, -1, heads) & used.repeat_interleave(group, 1)[:, :, None]
    fresh = ~static[:, block_pos].permute(1, 2, 0, 3).repeat_interleave(group, 1)
    visible = torch.cat(
        [
            static[:, static_keys].expand(batch, hq, -1, -1),
            chosen.repeat_interleave(size, -1) & fresh,
        ],
        -1,
    )  # (B, Hq, Lq, M)
    return masked_attention(q, _gather(k, index), _gather(v, index), visible, scale, *extras)


@functools.lru_cache(maxsize=8)
def _in_sight(pattern: Selection, kv_len: int, device: torch.device) -> tuple[Tensor, ...]:
    """What the query at position ``kv_len - 1`` sees whatever the data: its static row
    ``(L,)`` bool, its static keys ``(S,)`` and its candidate blocks ``(n,)`` bool. The same
    for every layer of a decoding step with this pattern: computed once (read-only)."""
    size = pattern.block_size
    first = (kv_len - 1) // size * size  # the first position of the query's block
    static, candidates = _block_in_sight(pattern, first, device)
    row = static[kv_len - 1 - first, :kv_len]
    return row, torch.nonzero(row).squeeze(1), candidates[kv_len - 1 - first, : kv_len // size]


@functools.lru_cache(maxsize=8)  # a few patterns (models) decoding in turn keep theirs
def _block_in_sight(pattern: Selection, first: int, device: torch.device) -> tuple[Tensor, ...]:
    """:func:`_in_sight` for the ``block_size`` query positions from ``first`` at once:
    static rows ``(block, first + block)`` and candidate rows ``(block, n)`` (a query sees
    no key after itself, so its row does not depend on the keys that follow)."""
    size = pattern.block_size
    static = pattern.dense_mask(size, first + size, device=device)[0]
    return static, pattern.candidates(size, first + size, device)


def _compiled_one_query(
    kernel,  # noqa: ANN001 (the compiled module)
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Selection,
    scale: float,
    scores: Tensor | None,
    static_keys: Tensor,
    candidates: Tensor,
) -> Tensor:
    """:func:`selection_decode` for one query row through ``csrc/selection_decode.cpp``:
    selection, gathering and softmax in one call, reading the cache in place."""
    batch, hkv, kv_len = q.shape[0], k.shape[1], k.shape[2]
    n = kv_len // pattern.block_size
    given = scores is not None and min(pattern.top_k, n) > 0
    if min(pattern.top_k, n) == 0:  # nothing to select: any scores will do
        scores = q.new_zeros(batch, hkv, 1, n, dtype=torch.float32)
    elif scores is None:
        scores = pattern.block_scores(q, k)
    pattern.check_scores(scores, q, kv_len)
    if given:  # a block scored NaN by the caller could never be selected
        pattern.refuse_nan(scores, q, k)
    step = kernel.selection_decode(
        q[:, :, 0].float().contiguous(),
        k,
        v,
        scores[:, :, 0].float().contiguous(),  # (B, Hq or Hkv, n)
        static_keys,
        candidates,
        pattern.top_k,
        pattern.block_size,
        scale,
    )  # (B, Hq, Dv)
    return step[:, :, None].to(q.dtype)


def _compiled_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scores: Tensor | None,
    extras: tuple[float | None, Tensor | None],
):  # noqa: ANN202 (a compiled module, or None)
    """The C++ decoding step (``csrc/selection_decode.cpp``) when it serves this call: on
    CPU, without soft-capping, sinks or gradients, key rows contiguous; else None."""
    tensors = (q, k, v) if scores is None else (q, k, v, scores)
    if (
        q.device.type != "cpu"
        or any(x is not None for x in extras)
        or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        or k.stride(-1) != 1
        or v.stride(-1) != 1
    ):
        return None
    return compiled("selection_decode")


def _one_query(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Selection,
    scale: float,
    scores: Tensor | None,
    extras: tuple[float | None, Tensor | None],
) -> Tensor:
    """:func:`selection_decode` for one query row (a plain decoding step), in few operations:
    each KV head gathers its static keys and the selected blocks of its query heads (one
    shared selection per group, or one per head, each head masked to its own)."""
    batch, hq = q.shape[:2]
    hkv, kv_len = k.shape[1], k.shape[2]
    group, size, device = hq // hkv, pattern.block_size, q.device
    static, static_keys, may = _in_sight(pattern, kv_len, device)
    kernel = _compiled_step(q, k, v, scores, extras)
    if kernel is not None:
        return _compiled_one_query(kernel, q, k, v, pattern, scale, scores, static_keys, may)
    blocks, chosen = pattern.select_blocks(q, k, block_scores=scores)  # (B, Hq, 1, P)
    places = blocks.shape[-1]
    if scores is not None and scores.shape[1] == hkv:  # one selection per KV group
        slots = blocks[:, ::group, 0]  # (B, Hkv, P)
        mine = chosen[:, :, 0]  # (B, Hq, P): each head sees the group's blocks
    else:  # one selection per head: the group gathers all, each head sees its own P slots
        slots = blocks[:, :, 0].reshape(batch, hkv, group * places)
        own = torch.eye(group, dtype=torch.bool, device=device)  # (G, G): head, slot group
        mine = own[None, None, :, :, None] & chosen.view(batch, hkv, 1, group, places)
        mine = mine.reshape(batch, hq, group * places)
    block_pos = (slots[..., None] * size + torch.arange(size, device=device)).flatten(-2)
    # Keys of a selected block that the static part shows are counted there, not twice.
    fresh = ~static[block_pos].repeat_interleave(group, 1)  # (B, Hq, slots * size)
    seen = torch.ones(batch, hq, static_keys.numel(), dtype=torch.bool, device=device)
    visible = torch.cat([seen, mine.repeat_interleave(size, -1) & fresh], -1)[:, :, None]
    index = torch.cat([static_keys.expand(batch, hkv, -1), block_pos], -1)  # (B, Hkv, M)
    return masked_attention(q, _gather(k, index), _gather(v, index), visible, scale, *extras)
