"""``full()``: causal dense attention, the baseline and the identity swap."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longswap.patterns.base import MaskFn, Pattern, TileGrid
from longswap.patterns.registry import register


@register
@dataclass(frozen=True)
class Full(Pattern):
    """Every query sees every earlier key and itself."""

    name = "full"

    def covers(self, kv_len: int) -> bool:
        """Always dense."""
        return True

    translation_invariant = True

    def _mask_fn(self, kv_len: int, num_heads: int, device: torch.device) -> MaskFn:
        return lambda q, kv, h: kv == kv

    def _tiles(self, grid: TileGrid, num_heads: int) -> tuple[Tensor, Tensor]:
        every = torch.ones((1, 1), dtype=torch.bool, device=grid.device)
        return every, every
