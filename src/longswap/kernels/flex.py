"""The ``flex`` backend: torch FlexAttention, compiled, with BlockMasks built from block indices.

The BlockMask comes straight from the pattern's block structure
(``BlockMask.from_kv_blocks``): ``mask_mod`` is only evaluated inside the visited tiles,
never over all L^2 pairs. BlockMasks of static patterns are cached per (pattern, shape).
FlexAttention has no backward pass on CPU in torch 2.13, so this backend refuses CPU
inputs that require grad instead of failing deep inside the compiler.

NaN policy (the same on every backend): an output row holds NaN when its query, or a key
or value it sees, holds a NaN. FlexAttention's kernels drop NaN scores (a NaN query gives
a row of zeros, a NaN key is skipped), so the rows of NaN queries are filled with NaN after
the call, and those that see a NaN key or value through ``kernels.nan``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from longswap.kernels.nan import with_nan_rows
from longswap.patterns import Pattern, Selection
from longswap.patterns.base import MaskMod, compact

#: FlexAttention tile (BlockMask block) per device type when the caller names none. On
#: CPU the compiled kernel works tile by tile, and 64 x 64 tiles skip more of a sliding
#: window than 128 x 128 (benchmarks/attention.py: 0.20 s vs 0.21-0.22 s at 16k).
DEFAULT_BLOCK = {"cpu": 64}

#: Compiled kernels kept per process. Each (pattern, shape) compiles its own kernel, and
#: dynamo's default limit (8) would send later ones to the slow uncompiled path.
RECOMPILE_LIMIT = 64


def _raise_recompile_limit(config: object, limit: int) -> None:
    """Let dynamo keep at least ``limit`` compiled kernels per function.

    The setting is ``recompile_limit`` in recent torch and ``cache_size_limit`` in older
    releases; a torch with neither keeps its default (later shapes then run uncompiled,
    which is slower, not wrong).
    """
    for name in ("recompile_limit", "cache_size_limit"):
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, max(getattr(config, name), limit))
            return


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    """Compile FlexAttention once per process (the first call of a shape takes seconds)."""
    _raise_recompile_limit(torch._dynamo.config, RECOMPILE_LIMIT)
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=8)
def _capping(softcap: float) -> Callable[..., Tensor]:
    """The score modification of soft-capping (one function per cap, so that compiled
    kernels are reused)."""

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return torch.tanh(score / softcap) * softcap

    return score_mod


def _index_lists(flags: Tensor) -> tuple[Tensor, Tensor]:
    """Dense ``(..., nQ, nK)`` tile flags to FlexAttention's ``(num_blocks, indices)``, int32."""
    indices, _ = compact(flags, flags.shape[-1])
    return flags.sum(-1).to(torch.int32), indices.to(torch.int32)


def _and_padding(mask_mod: MaskMod, key_padding_mask: Tensor) -> MaskMod:
    """``mask_mod`` restricted to keys that ``key_padding_mask (B, Lk)`` keeps."""

    def padded(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return mask_mod(b, h, q_idx, kv_idx) & key_padding_mask[b, kv_idx]

    return padded


def _block_mask(
    visited: Tensor, full: Tensor, bs: int, mask_mod: MaskMod, q_len: int, kv_len: int
) -> BlockMask:
    """BlockMask from tile maps with leading ``(B, H)`` dims (size 1 broadcasts)."""
    partial_n, partial_idx = _index_lists(visited & ~full)
    full_n, full_idx = _index_lists(full)
    return BlockMask.from_kv_blocks(
        partial_n,
        partial_idx,
        full_n,
        full_idx,
        BLOCK_SIZE=bs,
        mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
    )


@functools.lru_cache(maxsize=16)
def _static_parts(
    pattern: Pattern, q_len: int, kv_len: int, bs: int, heads: int, device: torch.device
) -> tuple[Tensor, Tensor, MaskMod]:
    """Tile maps ``(1, Hs, nQ, nK)`` and ``mask_mod`` of a static pattern for one shape."""
    visited, full = pattern.block_structure(q_len, kv_len, bs, heads, device).tile_maps()
    return visited[None], full[None], pattern.mask_mod(q_len, kv_len, heads, device)


@functools.lru_cache(maxsize=16)
def static_block_mask(
    pattern: Pattern, q_len: int, kv_len: int, bs: int, heads: int, device: torch.device
) -> BlockMask:
    """Cached BlockMask of a static pattern for one shape."""
    visited, full, mask_mod = _static_parts(pattern, q_len, kv_len, bs, heads, device)
    return _block_mask(visited, full, bs, mask_mod, q_len, kv_len)


def _topk_parts(
    pattern: Selection,
    q: Tensor,
    k: Tensor,
    bs: int,
    key_padding_mask: Tensor | None,
    block_scores: Tensor | None,
) -> tuple[Tensor, Tensor, MaskMod]:
    """Tile maps ``(B, Hq, nQ, nK)`` and ``mask_mod``: own block plus every token's selection."""
    batch, heads, q_len, _ = q.shape
    kv_len, bb = k.shape[2], pattern.block_size
    selected = pattern.select(q, k, key_padding_mask, block_scores)  # (B, Hq, Lq, n)
    n, n_q, n_k = selected.shape[-1], -(-q_len // bs), -(-kv_len // bs)
    visited, full, local = _static_parts(pattern, q_len, kv_len, bs, heads, q.device)
    per_block = F.pad(selected, (0, 0, 0, n_q * bs - q_len)).view(batch, heads, n_q, bs, n).any(3)
    per_key = F.pad(per_block.repeat_interleave(bb, -1), (0, n_k * bs - n * bb))
    visited = visited | per_key.view(batch, heads, n_q, n_k, bs).any(-1)
    last = max(n - 1, 0)
    table = F.pad(selected, (0, 1))  # an extra all-False column for keys outside any block

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        column = torch.where(kv_idx < n * bb, torch.clamp(kv_idx // bb, max=last), n)
        return local(b, h, q_idx, kv_idx) | table[b, h, q_idx, column]

    return visited, full.expand_as(visited), mask_mod


def flex_attention_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern,
    scale: float,
    key_padding_mask: Tensor | None = None,
    block_size: int | None = None,
    block_scores: Tensor | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Sparse attention through compiled FlexAttention (forward only on CPU).

    ``block_size``: the BlockMask tile; None takes :data:`DEFAULT_BLOCK` (128 by default).
    ``softcap`` is a score modification; ``sinks (Hq,)`` rescale each row by
    ``sigmoid(lse - sink)`` with FlexAttention's log-sum-exp (differentiable where
    FlexAttention has a backward pass; not on CPU, whose kernel returns no log-sum-exp).
    """
    if block_size is None:
        block_size = DEFAULT_BLOCK.get(q.device.type, 128)
    if (
        q.device.type == "cpu"
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (q, k, v))
    ):
        raise ValueError(
            "backend='flex' cannot compute gradients on CPU: FlexAttention has no CPU backward "
            "pass in this torch. Use backend='blocks' (or 'auto') to train on CPU, or run "
            "inference under torch.no_grad()."
        )
    if q.device.type == "cpu" and sinks is not None:
        raise ValueError(
            "backend='flex' cannot apply learned sinks on CPU: torch's CPU FlexAttention "
            "returns no log-sum-exp ('return_lse is not supported yet'), which the sinks "
            "need. Use backend='blocks' (or 'auto') on CPU; flex applies them on CUDA."
        )
    q_len, kv_len, heads = q.shape[2], k.shape[2], q.shape[1]
    if pattern.data_dependent:
        assert isinstance(pattern, Selection)
        visited, full, mask_mod = _topk_parts(
            pattern, q, k, block_size, key_padding_mask, block_scores
        )
    elif key_padding_mask is None:
        visited = None
        block_mask = static_block_mask(pattern, q_len, kv_len, block_size, heads, q.device)
    else:
        visited, full, mask_mod = _static_parts(pattern, q_len, kv_len, block_size, heads, q.device)
    if key_padding_mask is not None:
        # Padding makes every tile partial: the padding rule must be evaluated everywhere.
        mask_mod, full = _and_padding(mask_mod, key_padding_mask), torch.zeros_like(full)
    if visited is not None:
        block_mask = _block_mask(visited, full, block_size, mask_mod, q_len, kv_len)

    score_mod = None if softcap is None else _capping(softcap)

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        run = functools.partial(
            _compiled_flex(),
            q,
            k,
            v,
            score_mod=score_mod,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=k.shape[1] != heads,
        )
        if sinks is None:
            return run()
        out, aux = run(return_aux=AuxRequest(lse=True))
        keep = torch.sigmoid(aux.lse - sinks.float().view(1, -1, 1))  # 0 where lse is -inf
        return (out.float() * keep[..., None]).to(out.dtype)

    out = with_nan_rows(attend, q, k, v)
    return out.masked_fill(q.isnan().any(-1, keepdim=True), float("nan"))
