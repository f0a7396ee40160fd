"""``bigbird(block_size, window_blocks, global_blocks, random_blocks, seed)``: BigBird, causal.

Positions are cut into blocks of ``block_size``. A query in block ``qb`` sees key block
``kb`` when any of these holds (and always only keys at or before itself):

* neighbours: ``qb - window_blocks <= kb <= qb`` (its own block and ``window_blocks`` before);
* global: ``kb < global_blocks`` (and a query in a global block sees everything earlier);
* random: ``random_blocks`` further earlier blocks, drawn per query block from a hash of
  ``(seed, qb, kb)``. The draw depends only on those, so a block's choice never changes
  with the sequence length: prefill and decoding agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longswap.patterns.base import MaskFn, Pattern, TileGrid, check_int
from longswap.patterns.registry import register

_MASK32 = 0xFFFFFFFF


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer hash (murmur3 finaliser) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


@register
@dataclass(frozen=True)
class BigBird(Pattern):
    """Neighbouring, global and seeded random key blocks, at ``block_size`` granularity."""

    block_size: int = 128
    window_blocks: int = 1
    global_blocks: int = 1
    random_blocks: int = 2
    seed: int = 0

    name = "bigbird"

    def __post_init__(self) -> None:
        check_int(self.name, "block_size", self.block_size, 1)
        check_int(self.name, "window_blocks", self.window_blocks, 0)
        check_int(self.name, "global_blocks", self.global_blocks, 0)
        check_int(self.name, "random_blocks", self.random_blocks, 0)
        check_int(self.name, "seed", self.seed, 0)

    def block_table(self, num_blocks: int, device: torch.device | str = "cpu") -> Tensor:
        """``(num_blocks, num_blocks)`` bool: query block row sees key block column (not causal)."""
        blocks = torch.arange(num_blocks, device=device)
        qb, kb = blocks[:, None], blocks[None, :]
        table = (
            (qb - kb <= self.window_blocks) | (kb < self.global_blocks) | (qb < self.global_blocks)
        )
        table = table & (kb <= qb)
        draws = min(self.random_blocks, num_blocks)
        if draws:
            candidate = (kb >= self.global_blocks) & (kb < qb - self.window_blocks)
            seeded = (qb * 0x9E3779B1 + kb * 0x7F4A7C15 + self.seed * 0x632BE5AB) & _MASK32
            # The hash decides; the column index breaks (rare) ties, independently of length.
            score = _mix(_mix(seeded)) * (1 << 24) + kb
            score = torch.where(candidate, score, -1)
            top = torch.topk(score, draws, dim=-1)
            picked = torch.zeros_like(table).scatter_(-1, top.indices, top.values >= 0)
            table = table | picked
        return table

    def _num_blocks(self, kv_len: int) -> int:
        return max(-(-kv_len // self.block_size), 1)

    def _mask_fn(self, kv_len: int, num_heads: int, device: torch.device) -> MaskFn:
        table = self.block_table(self._num_blocks(kv_len), device)
        last = table.shape[0] - 1
        bb = self.block_size

        def visible(q: Tensor, kv: Tensor, h: Tensor) -> Tensor:
            return table[torch.clamp(q // bb, 0, last), torch.clamp(kv // bb, 0, last)]

        return visible

    def _tiles(self, grid: TileGrid, num_heads: int) -> tuple[Tensor, Tensor]:
        table = self.block_table(self._num_blocks(grid.kv_len), grid.device).to(torch.int64)
        n = table.shape[0]
        prefix = torch.zeros(n + 1, n + 1, dtype=torch.int64, device=grid.device)
        prefix[1:, 1:] = table.cumsum(0).cumsum(1)
        (q_lo, q_hi), (k_lo, k_hi) = grid.q_bounds, grid.k_bounds
        r0, r1 = q_lo // self.block_size, q_hi // self.block_size
        c0, c1 = k_lo // self.block_size, k_hi // self.block_size
        seen = prefix[r1 + 1, c1 + 1] - prefix[r0, c1 + 1] - prefix[r1 + 1, c0] + prefix[r0, c0]
        area = (r1 - r0 + 1) * (c1 - c0 + 1)
        # Within a pair of BigBird blocks every pair is visible; the base class adds kv <= q.
        return seen > 0, seen == area
