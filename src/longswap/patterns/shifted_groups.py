"""``shifted_groups(group_size)``: LongLoRA's shifted sparse attention (S2-Attn), causal.

Tokens attend within groups of ``group_size``. Heads ``h >= num_heads // 2`` use groups
shifted by ``group_size // 2``: boundaries at ``group_size // 2 + k * group_size``, so their
first group is ``[0, group_size // 2)``. With an odd number of heads the shifted half is the
larger one (9 heads: 4 unshifted, 5 shifted), so models such as SmolLM2 (9 heads) can use
it. There is no wrap-around: LongLoRA's ``roll`` moves
the last tokens into the first group, which leaks the future into the past.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from longswap.patterns.base import MaskFn, Pattern, TileGrid, check_int
from longswap.patterns.registry import register


@register
@dataclass(frozen=True)
class ShiftedGroups(Pattern):
    """Causal attention within groups; the second half of the heads shifts the groups."""

    group_size: int

    name = "shifted_groups"
    head_dependent = True

    def __post_init__(self) -> None:
        check_int(self.name, "group_size", self.group_size, 2)

    def check_heads(self, num_heads: int) -> None:
        """The heads split into an unshifted and a shifted part, so there must be two."""
        check_int(self.name, "num_heads", num_heads, 2)

    def reach(self) -> int | None:
        """No query sees farther back than its group."""
        return self.group_size - 1

    def _group_fn(self, num_heads: int) -> Callable[[Tensor, Tensor], Tensor]:
        g = self.group_size

        def group(x: Tensor, h: Tensor) -> Tensor:
            shift = torch.where(h >= num_heads // 2, g // 2, 0)
            return (x + g - shift) // g

        return group

    def _mask_fn(self, kv_len: int, num_heads: int, device: torch.device) -> MaskFn:
        group = self._group_fn(num_heads)
        return lambda q, kv, h: group(q, h) == group(kv, h)

    def _tiles(self, grid: TileGrid, num_heads: int) -> tuple[Tensor, Tensor]:
        group = self._group_fn(num_heads)
        (q_lo, q_hi), (k_lo, k_hi) = grid.q_bounds, grid.k_bounds
        h = self.head_index(num_heads, grid.device)
        gq_lo, gq_hi, gk_lo, gk_hi = (group(x, h) for x in (q_lo, q_hi, k_lo, k_hi))
        any_ = (gq_lo <= gk_hi) & (gk_lo <= gq_hi)
        full = (gq_lo == gq_hi) & (gk_lo == gk_hi) & (gq_lo == gk_lo)
        return any_, full
