"""``HeadSlice``: a per-head pattern seen from some of its heads.

Under head-parallel attention (DeepSpeed Ulysses sequence parallelism) each process runs
attention over the whole sequence for a contiguous share of the query heads. A pattern
that differs between heads (``shifted_groups``: the second half of the heads shifts its
groups) must then apply the rules of those heads, not of heads ``0..n-1``:
``HeadSlice(pattern, start, total)`` is ``pattern`` for a model with ``total`` heads,
restricted to heads ``start, start + 1, ...`` (as many as the call has). Not a pattern a
user writes: the swapped attention builds it for the call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longswap.patterns.base import MaskFn, Pattern, TileGrid


@dataclass(frozen=True)
class HeadSlice(Pattern):
    """Heads ``start ..`` of ``inner`` (a static pattern) for a model of ``total`` heads."""

    inner: Pattern
    start: int
    total: int

    name = "head_slice"
    head_dependent = True

    def __post_init__(self) -> None:
        if self.inner.data_dependent:
            raise ValueError(f"head_slice: {self.inner} selects from the data; slice its input")
        if not 0 <= self.start < self.total:
            raise ValueError(f"head_slice: start {self.start} outside the {self.total} heads")

    @property
    def translation_invariant(self) -> bool:  # type: ignore[override]
        """As the sliced pattern."""
        return self.inner.translation_invariant

    def reach(self) -> int | None:
        """As the sliced pattern."""
        return self.inner.reach()

    def covers(self, kv_len: int) -> bool:
        """As the sliced pattern (a sufficient condition for these heads)."""
        return self.inner.covers(kv_len)

    def check_heads(self, num_heads: int) -> None:
        """The call's heads must fit after ``start`` among the ``total``."""
        if self.start + num_heads > self.total:
            raise ValueError(
                f"head_slice: heads {self.start}..{self.start + num_heads - 1} are not all "
                f"among the model's {self.total}"
            )
        self.inner.check_heads(self.total)

    def _mask_fn(self, kv_len: int, num_heads: int, device: torch.device) -> MaskFn:
        rule = self.inner._mask_fn(kv_len, self.total, device)
        return lambda q, kv, h: rule(q, kv, h + self.start)

    def _tiles(self, grid: TileGrid, num_heads: int) -> tuple[Tensor, Tensor]:
        tiles = self.inner._tiles(grid, self.total)  # broadcastable to (total or 1, nQ, nK)
        return tuple(  # type: ignore[return-value]
            t[self.start : self.start + num_heads] if t.dim() == 3 and t.shape[0] > 1 else t
            for t in tiles
        )
