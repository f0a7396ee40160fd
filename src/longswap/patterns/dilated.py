"""``dilated(window, dilation)``: every ``dilation``-th earlier key, ``window`` of them.

Distance ``d = q - kv`` is visible iff ``d % dilation == 0`` and ``d < window * dilation``,
so the query itself (``d = 0``) is always one of the ``window`` keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longswap.patterns.base import MaskFn, Pattern, TileGrid, check_int
from longswap.patterns.registry import register


@register
@dataclass(frozen=True)
class Dilated(Pattern):
    """A strided window: keys at distances 0, r, 2r, ..., (window - 1) * r."""

    window: int
    dilation: int

    name = "dilated"
    translation_invariant = True

    def __post_init__(self) -> None:
        check_int(self.name, "window", self.window, 1)
        check_int(self.name, "dilation", self.dilation, 1)

    def reach(self) -> int | None:
        """The farthest visible key is ``(window - 1) * dilation`` back."""
        return (self.window - 1) * self.dilation

    def covers(self, kv_len: int) -> bool:
        """Dense only without gaps, over a window as long as the keys."""
        return self.dilation == 1 and self.window >= kv_len

    def _mask_fn(self, kv_len: int, num_heads: int, device: torch.device) -> MaskFn:
        span = self.window * self.dilation
        return lambda q, kv, h: ((q - kv) % self.dilation == 0) & (q - kv < span)

    def _tiles(self, grid: TileGrid, num_heads: int) -> tuple[Tensor, Tensor]:
        (q_lo, q_hi), (k_lo, k_hi) = grid.q_bounds, grid.k_bounds
        r = self.dilation
        # Distances in a tile form the whole range [q_lo - k_hi, q_hi - k_lo]; intersect it
        # with the reachable range and ask whether a multiple of r is left.
        lo = torch.clamp(q_lo - k_hi, min=0)
        hi = torch.clamp(q_hi - k_lo, max=self.window * r - 1)
        any_ = (lo <= hi) & ((lo + r - 1) // r * r <= hi)
        full = (q_hi - k_lo < self.window) if r == 1 else torch.zeros_like(any_)
        return any_, full
