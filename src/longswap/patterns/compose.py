"""Union and intersection of static patterns (``a | b``, ``a & b``)."""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch
from torch import Tensor

from longswap.patterns.base import MaskFn, Pattern, TileGrid


@dataclass(frozen=True)
class _Composite(Pattern):
    parts: tuple[Pattern, ...]

    def __post_init__(self) -> None:
        if len(self.parts) < 2 or not all(isinstance(p, Pattern) for p in self.parts):
            raise ValueError(f"{self.name}: needs at least two patterns, got {self.parts!r}")
        dynamic = [p for p in self.parts if p.data_dependent]
        if dynamic:
            raise ValueError(
                f"{self.name}: {dynamic[0].name} selects keys from the data and cannot be "
                "combined with other patterns; use it alone"
            )
        # Flatten nested compositions of the same kind: (a | b) | c == a | b | c.
        flat: list[Pattern] = []
        for p in self.parts:
            flat.extend(p.parts if type(p) is type(self) else (p,))
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


@dataclass(frozen=True)
class Intersection(_Composite):
    """A key is visible when every part makes it visible."""

    name = "intersection"
    _op = staticmethod(operator.and_)

    def reach(self) -> int | None:
        """The nearest of the parts' bounded reaches."""
        reaches = [r for r in (p.reach() for p in self.parts) if r is not None]
        return min(reaches) if reaches else None
