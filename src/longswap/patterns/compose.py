"""Union and intersection of patterns (``a | b``, ``a & b``).

Static patterns combine freely. A union may also hold one selection pattern
(``block_topk``, ``learned_topk``): :class:`SelectionUnion`, the static parts plus the
selected blocks, chosen only among the blocks the static parts do not already show.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch
from torch import Tensor

from longswap.patterns.base import MaskFn, Pattern, TileGrid
from longswap.patterns.block_topk import BlockTopK, Selection

#: The most patterns one pattern may combine: far beyond any hand-written one, and every
#: part costs a mask evaluation per call.
MAX_PARTS = 256


def count_parts(pattern: Pattern) -> int:
    """How many patterns ``pattern`` combines (1 for a pattern that combines none)."""
    if isinstance(pattern, (_Composite, SelectionUnion)):
        return sum(count_parts(p) for p in pattern.parts)
    return 1


def _check_size(name: str, parts: tuple[Pattern, ...]) -> None:
    count = sum(count_parts(p) for p in parts)
    if count > MAX_PARTS:
        raise ValueError(
            f"{name}: combines {count} patterns, more than the {MAX_PARTS} a pattern may hold; "
            "cover the same keys with fewer parts (one sliding_window with a larger window, "
            "one local_global with a list of global tokens)"
        )


@dataclass(frozen=True)
class _Composite(Pattern):
    parts: tuple[Pattern, ...]

    def __post_init__(self) -> None:
        if len(self.parts) < 2 or not all(isinstance(p, Pattern) for p in self.parts):
            raise ValueError(f"{self.name}: needs at least two patterns, got {self.parts!r}")
        dynamic = [p for p in self.parts if p.data_dependent]
        if dynamic:
            raise ValueError(
                f"{self.name}: {dynamic[0].name} selects keys from the data; it can only be "
                "united with static patterns, through `|` or union(...) (for example "
                "sliding_window(window=512, sinks=4) | learned_topk(block_size=64, top_k=16))"
            )
        # Flatten nested compositions of the same kind: (a | b) | c == a | b | c.
        flat: list[Pattern] = []
        for p in self.parts:
            flat.extend(p.parts if type(p) is type(self) else (p,))
        _check_size(self.name, tuple(flat))
        object.__setattr__(self, "parts", tuple(flat))

    @property
    def head_dependent(self) -> bool:  # type: ignore[override]
        """Per head as soon as one part is."""
        return any(p.head_dependent for p in self.parts)

    @property
    def translation_invariant(self) -> bool:  # type: ignore[override]
        """Distance-only when every part is."""
        return all(p.translation_invariant for p in self.parts)

    def check_heads(self, num_heads: int) -> None:
        """Every part must accept the head count."""
        for p in self.parts:
            p.check_heads(num_heads)

    def _mask_fn(self, kv_len: int, num_heads: int, device: torch.device) -> MaskFn:
        rules = [p._mask_fn(kv_len, num_heads, device) for p in self.parts]
        return lambda q, kv, h: functools.reduce(self._op, (r(q, kv, h) for r in rules))

    def _tiles(self, grid: TileGrid, num_heads: int) -> tuple[Tensor, Tensor]:
        tiles = [p._tiles(grid, num_heads) for p in self.parts]
        any_ = functools.reduce(self._op, (t[0] for t in tiles))
        # A union of partial tiles may be full; calling it partial is safe, only slower.
        full = functools.reduce(self._op, (t[1] for t in tiles))
        return any_, full


@dataclass(frozen=True)
class Union(_Composite):
    """A key is visible when any part makes it visible."""

    name = "union"
    _op = staticmethod(operator.or_)

    def reach(self) -> int | None:
        """The farthest of the parts' reaches."""
        reaches = [p.reach() for p in self.parts]
        return None if None in reaches else max(reaches)

    def covers(self, kv_len: int) -> bool:
        """Dense when some part is (a sufficient condition)."""
        return any(p.covers(kv_len) for p in self.parts)


@dataclass(frozen=True)
class Intersection(_Composite):
    """A key is visible when every part makes it visible."""

    name = "intersection"
    _op = staticmethod(operator.and_)

    def reach(self) -> int | None:
        """The nearest of the parts' bounded reaches."""
        reaches = [r for r in (p.reach() for p in self.parts) if r is not None]
        return min(reaches) if reaches else None

    def covers(self, kv_len: int) -> bool:
        """Dense when every part is."""
        return all(p.covers(kv_len) for p in self.parts)


@dataclass(frozen=True)
class SelectionUnion(Selection):
    """``static | selection``: the static pattern's keys, the selection's own block, and
    ``top_k`` selected blocks among those the static pattern does not already show.

    A key block is a candidate for a query when it is complete, lies before the query's own
    block, and the static pattern does not show all of its keys to every query of the
    query's (aligned) block: with ``sliding_window(window=512, sinks=4) |
    learned_topk(64, 16)`` the 16 blocks are spent beyond the window (the block holding
    the sinks, and the one the window's edge cuts, stay candidates). Whether a block is a
    candidate depends only on positions, the same in a prompt and in a decoding step.
    """

    static: Pattern
    selection: BlockTopK

    name = "union"

    def __post_init__(self) -> None:
        if not isinstance(self.selection, BlockTopK) or self.static.data_dependent:
            raise ValueError(
                "a union holds at most one selection pattern (block_topk or learned_topk); "
                f"got {self.static} and {self.selection}"
            )
        if self.static.head_dependent:
            raise ValueError(
                f"union: {self.static} differs between heads, so the blocks it leaves unseen "
                "would too; unite a selection only with head-independent patterns"
            )
        _check_size(self.name, (self.static, self.selection))

    @property
    def parts(self) -> tuple[Pattern, ...]:
        """The static parts, then the selection."""
        static = self.static.parts if isinstance(self.static, Union) else (self.static,)
        return (*static, self.selection)

    @property
    def block_size(self) -> int:  # type: ignore[override]
        """The selection's block size."""
        return self.selection.block_size

    @property
    def top_k(self) -> int:  # type: ignore[override]
        """The selection's number of blocks per query."""
        return self.selection.top_k

    @property
    def per_head(self) -> bool:  # type: ignore[override]
        """Whether the selection is made per query head."""
        return self.selection.per_head

    @property
    def sub_block(self) -> int | None:  # type: ignore[override]
        """Tokens per key summary of the selection's learned selector."""
        return self.selection.sub_block

    @property
    def needs_selector(self) -> bool:  # type: ignore[override]
        """Whether the selection's scores come from a learned selector."""
        return self.selection.needs_selector

    def covers(self, kv_len: int) -> bool:
        """Dense when the static part is, or when every candidate block is selected."""
        return self.static.covers(kv_len) or super().covers(kv_len)

    def check_heads(self, num_heads: int) -> None:
        """Every part must accept the head count."""
        self.static.check_heads(num_heads)
        self.selection.check_heads(num_heads)

    def _mask_fn(self, kv_len: int, num_heads: int, device: torch.device) -> MaskFn:
        static = self.static._mask_fn(kv_len, num_heads, device)
        own = self.selection._mask_fn(kv_len, num_heads, device)
        return lambda q, kv, h: static(q, kv, h) | own(q, kv, h)

    def _tiles(self, grid: TileGrid, num_heads: int) -> tuple[Tensor, Tensor]:
        (s_any, s_full), (o_any, o_full) = (
            p._tiles(grid, num_heads) for p in (self.static, self.selection)
        )
        return s_any | o_any, s_full | o_full

    def block_scores(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """The selection's scores."""
        return self.selection.block_scores(q, k, key_padding_mask)

    def block_keys(self, k: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """The selection's block summaries."""
        return self.selection.block_keys(k, key_padding_mask)

    def score_blocks(self, q: Tensor, block_keys: Tensor) -> Tensor:
        """The selection's scores against its block summaries."""
        return self.selection.score_blocks(q, block_keys)

    def static_cover(
        self, q_len: int, kv_len: int, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor]:
        """``(some, every)``, each ``(Lq, n)`` bool over the ``n`` complete key blocks: the
        static pattern shows some key of the block to some query of the query's (aligned)
        block; it shows every key of the block to every query of that block."""
        device, bs = torch.device(device), self.block_size
        first, last = (kv_len - q_len) // bs, (kv_len - 1) // bs
        # Aligned query blocks first..last against aligned key blocks 0..last.
        grid = TileGrid((last - first + 1) * bs, (last + 1) * bs, bs, device)
        (q_lo, q_hi), (k_lo, k_hi) = grid.q_bounds, grid.k_bounds
        rows = torch.arange(kv_len - q_len, kv_len, device=device) // bs - first
        n = self.num_candidate_blocks(kv_len)
        some, every = self.static._tiles(grid, 1)
        some, every = some & (k_lo <= q_hi), every & (k_hi <= q_lo)  # (nQ, nK), or (1, nQ, nK)
        return tuple(x.reshape(-1, *x.shape[-2:])[0][rows, :n] for x in (some, every))

    def candidates(self, q_len: int, kv_len: int, device: torch.device | str = "cpu") -> Tensor:
        """``(Lq, n)`` bool: complete blocks before the query's own block that the static
        pattern does not show in full to every query of that block."""
        _, shown = self.static_cover(q_len, kv_len, device)
        return super().candidates(q_len, kv_len, device) & ~shown


def union(parts: tuple[Pattern, ...]) -> Pattern:
    """``parts[0] | parts[1] | ...``: a :class:`Union` of static patterns, or a
    :class:`SelectionUnion` when one part selects blocks."""
    flat: list[Pattern] = []
    for p in parts:
        flat.extend(p.parts if isinstance(p, (Union, SelectionUnion)) else (p,))
    chosen = [p for p in flat if p.data_dependent]
    if not chosen:
        return Union(tuple(flat))
    if len(chosen) > 1:
        raise ValueError(
            f"union: {len(chosen)} selection patterns ({', '.join(map(str, chosen))}); a union "
            "holds at most one: select more blocks with one pattern's top_k instead"
        )
    static = [p for p in flat if not p.data_dependent]
    if not static:
        return chosen[0]
    return SelectionUnion(static[0] if len(static) == 1 else Union(tuple(static)), chosen[0])
