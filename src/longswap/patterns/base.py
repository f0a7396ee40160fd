"""What every attention pattern offers: an element view and a block view.

A pattern answers one question, "may the query at absolute position ``q`` see the key
at absolute position ``kv`` in head ``h``?", in two forms:

* the element view, :meth:`Pattern.mask_fn` (and the FlexAttention-style
  :meth:`Pattern.mask_mod`), which the dense oracle and FlexAttention evaluate;
* the block view, :meth:`Pattern.block_structure`: for each query block, the key blocks
  that hold at least one visible pair, and which of those are fully visible. Sparse
  kernels only touch these blocks.

Subclasses describe their rule without causality (:meth:`Pattern._mask_fn`,
:meth:`Pattern._tiles`); this base class intersects both views with the causal rule
``kv <= q``, so every pattern is causal by construction.

The block view may over-approximate (list a block that turns out empty) and may
under-approximate fullness (call a full block partial); both only cost speed. It must
never omit a block with a visible pair nor call a block full that is not, and the tests
check exactly that against the element view.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

#: ``(q, kv, h) -> bool tensor``: absolute positions and head index, broadcastable.
MaskFn = Callable[[Tensor, Tensor, Tensor], Tensor]
#: FlexAttention's signature: ``(b, h, q_idx, kv_idx) -> bool tensor``.
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


#: Largest value any pattern parameter may take (windows, sinks, block and group sizes,
#: dilations, counts, positions, seeds): 2**31 - 1. The product of two parameters (a
#: dilated window's span, a hashed seed) then fits in int64, and the C++ and BLAS kernels
#: take every length as a 32-bit int. No context comes near it.
MAX_PARAMETER = 2**31 - 1


def check_int(owner: str, name: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an integer in ``[minimum, MAX_PARAMETER]``, else raise a
    ValueError that names it and the bound it broke."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")
    if value > MAX_PARAMETER:
        raise ValueError(
            f"{owner}: {name} must be at most {MAX_PARAMETER} (2**31 - 1, the limit of every "
            f"pattern parameter), got {value!r}"
        )
    return value


@dataclass(frozen=True)
class TileGrid:
    """The tiles of a ``(q_len, kv_len)`` attention problem cut into square blocks.

    Query row ``i`` sits at absolute position ``kv_len - q_len + i`` (a KV cache holds the
    earlier keys). Key blocks start at position 0; query blocks start at the first query.
    ``q_lo``/``q_hi`` are ``(nQ, 1)`` and ``k_lo``/``k_hi`` are ``(1, nK)`` int64 tensors of
    inclusive absolute bounds, clipped to the real lengths.
    """

    q_len: int
    kv_len: int
    block_size: int
    device: torch.device

    @property
    def q_offset(self) -> int:
        """Absolute position of the first query row."""
        return self.kv_len - self.q_len

    @property
    def num_q_blocks(self) -> int:
        """Number of query blocks, the last one possibly short."""
        return -(-self.q_len // self.block_size)

    @property
    def num_kv_blocks(self) -> int:
        """Number of key blocks, the last one possibly short."""
        return -(-self.kv_len // self.block_size)

    def _bounds(self, n_blocks: int, length: int, offset: int) -> tuple[Tensor, Tensor]:
        start = torch.arange(n_blocks, device=self.device, dtype=torch.int64) * self.block_size
        end = torch.clamp(start + self.block_size, max=length) - 1
        return start + offset, end + offset

    @functools.cached_property
    def q_bounds(self) -> tuple[Tensor, Tensor]:
        """``(q_lo, q_hi)``, each ``(nQ, 1)``."""
        lo, hi = self._bounds(self.num_q_blocks, self.q_len, self.q_offset)
        return lo[:, None], hi[:, None]

    @functools.cached_property
    def k_bounds(self) -> tuple[Tensor, Tensor]:
        """``(k_lo, k_hi)``, each ``(1, nK)``."""
        lo, hi = self._bounds(self.num_kv_blocks, self.kv_len, 0)
        return lo[None, :], hi[None, :]


@dataclass(frozen=True)
class BlockStructure:
    """For each (head, query block), the key blocks to visit.

    ``kv_indices``: ``(Hs, nQ, S)`` int64 key-block indices, visible blocks first in
    ascending order; unused slots repeat index 0 and have ``kv_valid`` False.
    ``kv_full``: ``(Hs, nQ, S)`` True where every pair of the tile is visible.
    ``Hs`` is 1 when the pattern is the same for all heads, else the number of heads.
    """

    block_size: int
    q_len: int
    kv_len: int
    kv_indices: Tensor
    kv_valid: Tensor
    kv_full: Tensor

    @property
    def num_heads(self) -> int:
        """1 for head-independent patterns, else the number of query heads."""
        return self.kv_indices.shape[0]

    @property
    def kv_counts(self) -> Tensor:
        """``(Hs, nQ)`` number of key blocks each query block visits."""
        return self.kv_valid.sum(-1)

    @classmethod
    def from_tiles(cls, grid: TileGrid, any_: Tensor, full: Tensor) -> BlockStructure:
        """Compact ``(Hs, nQ, nK)`` boolean tile maps into per-row index lists."""
        any_ = any_.expand(any_.shape[0], grid.num_q_blocks, grid.num_kv_blocks)
        indices, valid = compact(any_)
        return cls(
            block_size=grid.block_size,
            q_len=grid.q_len,
            kv_len=grid.kv_len,
            kv_indices=indices,
            kv_valid=valid,
            kv_full=torch.gather(full.expand_as(any_), -1, indices) & valid,
        )

    def tile_maps(self) -> tuple[Tensor, Tensor]:
        """Dense ``(Hs, nQ, nK)`` maps of the visited tiles and of the fully visible ones."""
        shape = (*self.kv_indices.shape[:2], -(-self.kv_len // self.block_size))
        # Unused slots point at block 0 with a False flag: accumulate, so they cannot erase it.
        counts = torch.zeros(shape, dtype=torch.int32, device=self.kv_indices.device)
        visited = counts.scatter_add(-1, self.kv_indices, self.kv_valid.int()) > 0
        full = counts.scatter_add(-1, self.kv_indices, self.kv_full.int()) > 0
        return visited, full


def compact(flags: Tensor, width: int | None = None) -> tuple[Tensor, Tensor]:
    """Positions of the True entries of ``flags (..., n)``, ascending, in ``width`` slots.

    Returns ``(indices, valid)``; unused slots hold index 0 and ``valid`` False. ``width``
    defaults to the largest count of any row (at least 1).
    """
    if width is None:
        width = max(int(flags.sum(-1).max()), 1) if flags.numel() else 1
    # A stable descending sort of the flags puts the True positions first, in order.
    order = torch.sort(flags.to(torch.int8), dim=-1, descending=True, stable=True).indices
    order = order[..., :width]
    valid = torch.gather(flags, -1, order)
    return torch.where(valid, order, 0), valid


class Pattern:
    """Base class of all patterns. Subclasses are frozen dataclasses (hashable, comparable)."""

    #: Registry name, as written in pattern strings: ``sliding_window(window=512)``.
    name: ClassVar[str] = ""
    #: True when the pattern differs between heads (it then needs ``num_heads``).
    head_dependent: ClassVar[bool] = False
    #: True when which keys are visible depends on q and k (top-k selection).
    data_dependent: ClassVar[bool] = False
    #: True when the selection's scores come from a learned selector module that the swap
    #: attaches to each attention layer (``learned_topk``), not from the pattern itself.
    needs_selector: ClassVar[bool] = False
    #: True when visibility depends only on the distance q - kv, so shifting every position
    #: by the same amount (left padding) changes nothing.
    translation_invariant: ClassVar[bool] = False

    # -- what subclasses implement -------------------------------------------------------
    def _mask_fn(self, kv_len: int, num_heads: int, device: torch.device) -> MaskFn:
        """Element rule without causality, valid for absolute positions below ``kv_len``."""
        raise NotImplementedError

    def _tiles(self, grid: TileGrid, num_heads: int) -> tuple[Tensor, Tensor]:
        """Tile rule without causality: ``(any, full)`` broadcastable to ``(Hs, nQ, nK)``."""
        raise NotImplementedError

    def check_heads(self, num_heads: int) -> None:
        """Raise ValueError when the pattern cannot be used with ``num_heads`` heads."""
        check_int(self.name, "num_heads", num_heads, 1)

    def reach(self) -> int | None:
        """Largest distance ``q - kv`` a query may see, or None when unbounded."""
        return None

    def covers(self, kv_len: int) -> bool:
        """True when, among the first ``kv_len`` positions, every causal pair is visible (the
        pattern is dense attention there); False when some pair is hidden, or unknown."""
        return False

    # -- what every pattern gets -------------------------------------------------------
    def mask_fn(
        self, kv_len: int, num_heads: int = 1, device: torch.device | str = "cpu"
    ) -> MaskFn:
        """Causal element rule ``(q, kv, h) -> bool`` on absolute positions below ``kv_len``."""
        self.check_heads(num_heads)
        rule = self._mask_fn(kv_len, num_heads, torch.device(device))

        def visible(q: Tensor, kv: Tensor, h: Tensor) -> Tensor:
            return (kv <= q) & rule(q, kv, h)

        return visible

    def mask_mod(
        self, q_len: int, kv_len: int, num_heads: int = 1, device: torch.device | str = "cpu"
    ) -> MaskMod:
        """FlexAttention ``mask_mod``; query index ``i`` is position ``kv_len - q_len + i``."""
        visible = self.mask_fn(kv_len, num_heads, device)
        offset = kv_len - q_len

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return visible(q_idx + offset, kv_idx, h)

        return mask_mod

    def dense_mask(
        self,
        q_len: int,
        kv_len: int,
        num_heads: int = 1,
        device: torch.device | str = "cpu",
        rows: slice | Tensor = slice(None),
        keys: int | None = None,
    ) -> Tensor:
        """Boolean ``(Hs, q_len, kv_len)`` mask; ``Hs`` is 1 unless the pattern is per head.
        ``rows`` (of the ``q_len`` query rows: a slice or indices) and ``keys`` (the first
        ``keys`` keys) cut a piece of it, computed alone: what a loop over chunks of queries
        needs."""
        device = torch.device(device)
        q = torch.arange(kv_len - q_len, kv_len, device=device)[rows][None, :, None]
        kv = torch.arange(kv_len if keys is None else keys, device=device)[None, None, :]
        heads = torch.arange(self.mask_heads(num_heads), device=device)[:, None, None]
        out = self.mask_fn(kv_len, num_heads, device)(q, kv, heads)
        return out.expand(heads.shape[0], q.shape[1], kv.shape[2])

    def mask_heads(self, num_heads: int) -> int:
        """How many distinct head masks the pattern has: 1, or ``num_heads``."""
        return num_heads if self.head_dependent else 1

    def block_structure(
        self,
        q_len: int,
        kv_len: int,
        block_size: int = 128,
        num_heads: int = 1,
        device: torch.device | str = "cpu",
    ) -> BlockStructure:
        """Key blocks per query block; O((L / block_size)^2), never O(L^2)."""
        check_int(self.name, "block_size", block_size, 1)
        self.check_heads(num_heads)
        grid = TileGrid(q_len, kv_len, block_size, torch.device(device))
        (q_lo, q_hi), (k_lo, k_hi) = grid.q_bounds, grid.k_bounds
        any_, full = self._tiles(grid, num_heads)
        any_ = any_ & (k_lo <= q_hi)
        full = full & (k_hi <= q_lo)
        if any_.dim() == 2:
            any_ = any_[None]
        if full.dim() == 2:
            full = full[None]
        return BlockStructure.from_tiles(grid, any_, full)

    def head_index(self, num_heads: int, device: torch.device) -> Tensor:
        """``(Hs, 1, 1)`` head indices for evaluating per-head rules on tiles."""
        return torch.arange(self.mask_heads(num_heads), device=device)[:, None, None]

    def __or__(self, other: Pattern) -> Pattern:
        from longswap.patterns.compose import union

        return union((self, other))

    def __and__(self, other: Pattern) -> Pattern:
        from longswap.patterns.compose import Intersection

        return Intersection((self, other))

    def __str__(self) -> str:
        from longswap.patterns.parse import format_pattern

        return format_pattern(self)
