"""``sliding_window(window, sinks=0)``: Mistral's window, with StreamingLLM's attention sinks.

``window=w`` lets the query at ``i`` see keys ``j`` with ``i - w < j <= i``: ``w`` keys,
itself included (the Hugging Face convention). ``sinks=s`` keeps keys ``j < s`` visible
to every query at or after them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longswap.patterns.base import MaskFn, Pattern, TileGrid, check_int
from longswap.patterns.registry import register


@register
@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """The last ``window`` keys (itself included), plus the first ``sinks`` keys."""

    window: int
    sinks: int = 0

    name = "sliding_window"

    def __post_init__(self) -> None:
        check_int(self.name, "window", self.window, 1)
        check_int(self.name, "sinks", self.sinks, 0)

    @property
    def translation_invariant(self) -> bool:  # type: ignore[override]
        """Sinks sit at absolute positions; a plain window depends on distance only."""
        return self.sinks == 0

    def reach(self) -> int | None:
        """A window reaches ``window - 1`` back; sinks reach arbitrarily far."""
        return None if self.sinks else self.window - 1

    def covers(self, kv_len: int) -> bool:
        """Dense while the window and the sinks together span every earlier key."""
        return self.window + self.sinks >= kv_len

    def _mask_fn(self, kv_len: int, num_heads: int, device: torch.device) -> MaskFn:
        if not self.sinks:  # the common case: one comparison per pair (flex evaluates it)
            return lambda q, kv, h: q - kv < self.window
        return lambda q, kv, h: (q - kv < self.window) | (kv < self.sinks)

    def _tiles(self, grid: TileGrid, num_heads: int) -> tuple[Tensor, Tensor]:
        (q_lo, q_hi), (k_lo, k_hi) = grid.q_bounds, grid.k_bounds
        any_ = (q_lo - k_hi < self.window) | (k_lo < self.sinks)
        full = (q_hi - k_lo < self.window) | (k_hi < self.sinks)
        return any_, full
