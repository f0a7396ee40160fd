"""``local_global(window, global_tokens)``: Longformer's window plus global positions.

A query sees the last ``window`` keys (itself included); every query at or after a global
position sees that key, and a query at a global position sees all earlier keys. Global
positions at or beyond the sequence length are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from longswap.patterns.base import MaskFn, Pattern, TileGrid, check_int
from longswap.patterns.registry import register


@register
@dataclass(frozen=True)
class LocalGlobal(Pattern):
    """A sliding window plus tokens that see, and are seen by, everything causal."""

    window: int
    global_tokens: tuple[int, ...] = (0,)

    name = "local_global"

    def __post_init__(self) -> None:
        check_int(self.name, "window", self.window, 1)
        tokens = self.global_tokens
        if isinstance(tokens, int) or not isinstance(tokens, Iterable):
            raise ValueError(
                f"{self.name}: global_tokens must be a list of positions, got {tokens!r}"
            )
        for t in tokens:
            check_int(self.name, "each of global_tokens", t, 0)
        object.__setattr__(self, "global_tokens", tuple(sorted(set(tokens))))

    def _table(self, kv_len: int, device: torch.device) -> Tensor:
        """``(kv_len + 1,)`` bool: True at global positions; the last slot absorbs clamping."""
        table = torch.zeros(kv_len + 1, dtype=torch.bool, device=device)
        inside = [t for t in self.global_tokens if t < kv_len]
        table[inside] = True
        return table

    def _mask_fn(self, kv_len: int, num_heads: int, device: torch.device) -> MaskFn:
        table = self._table(kv_len, device)

        def is_global(x: Tensor) -> Tensor:
            return table[torch.clamp(x, 0, kv_len)]

        return lambda q, kv, h: (q - kv < self.window) | is_global(kv) | is_global(q)

    def _tiles(self, grid: TileGrid, num_heads: int) -> tuple[Tensor, Tensor]:
        (q_lo, q_hi), (k_lo, k_hi) = grid.q_bounds, grid.k_bounds
        prefix = torch.zeros(grid.kv_len + 1, dtype=torch.int64, device=grid.device)
        prefix[1:] = torch.cumsum(self._table(grid.kv_len, grid.device)[:-1], 0)

        def count(lo: Tensor, hi: Tensor) -> Tensor:
            """Number of global positions in [lo, hi] (0 when the range is empty)."""
            lo, hi = torch.broadcast_tensors(lo, hi)
            n = (
                prefix[torch.clamp(hi + 1, 0, grid.kv_len)]
                - prefix[torch.clamp(lo, 0, grid.kv_len)]
            )
            return torch.where(hi >= lo, n, 0)

        global_key = count(k_lo, torch.minimum(k_hi, q_hi)) > 0
        global_query = count(torch.maximum(q_lo, k_lo), q_hi) > 0
        any_ = (q_lo - k_hi < self.window) | global_key | global_query
        full = (
            (q_hi - k_lo < self.window)
            | (count(k_lo, k_hi) == k_hi - k_lo + 1)
            | (count(q_lo, q_hi) == q_hi - q_lo + 1)
        )
        return any_, full
