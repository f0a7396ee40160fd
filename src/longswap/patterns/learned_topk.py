"""``learned_topk(block_size, top_k)``: own block plus the top-k earlier blocks by learned scores.

The pattern of DeepSeek's sparse attention and SeerAttention-R at block granularity: a
small selector scores every complete earlier key block for every query token, per KV group
(the group's query heads share one selection, as in NSA and InfLLM-V2; ``per_head=True``:
each query head selects its own, as MoBA does), and the query attends to its own block
(causally) plus the ``top_k`` best blocks, ranked as ``block_topk`` ranks them
(``longswap.patterns.block_topk.top_places``: ties to the more recent block, NaN first).
``sub_block``: the selector summarises keys in pieces of this many tokens and scores a block
by the log-sum-exp of its pieces' scores (default: one summary per block), so that one
strongly matching key is not averaged away by its block (see ``BlockGate``). The pattern
itself stays a pure definition: it declares that it needs a selector (``needs_selector``),
and the swap gives each layer one (``longswap.selectors.BlockGate``), whose scores reach the
kernels as ``block_scores``.
Selection is strictly causal and not differentiable: the selector learns from its
distillation loss only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from longswap.patterns.base import check_int
from longswap.patterns.block_topk import BlockTopK
from longswap.patterns.registry import register


@register
@dataclass(frozen=True)
class LearnedTopK(BlockTopK):
    """Own block plus the ``top_k`` earlier blocks a learned selector scores highest."""

    block_size: int = 64
    top_k: int = 16
    per_head: bool = False
    sub_block: int | None = None

    name = "learned_topk"
    needs_selector: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k == 0:
            raise ValueError(
                "learned_topk: top_k must be at least 1, got 0 (a selector that selects "
                "nothing learns nothing; for each query's own block alone use "
                "block_topk(top_k=0))"
            )
        if not isinstance(self.per_head, bool):
            raise ValueError(f"learned_topk: per_head must be True or False, got {self.per_head!r}")
        if self.sub_block is not None:
            check_int("learned_topk", "sub_block", self.sub_block, minimum=1)
            if self.block_size % self.sub_block:
                raise ValueError(
                    f"learned_topk: sub_block ({self.sub_block}) must divide block_size "
                    f"({self.block_size}), e.g. sub_block=16 with block_size=64"
                )

    def block_scores(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Never computed by the pattern: its learned selector provides them."""
        raise ValueError(
            "learned_topk scores key blocks with a learned selector: swap it into a model "
            "(longswap.swap_attention attaches one per layer) or pass block_scores "
            "(B, Hkv, Lq, n) to sparse_attention"
        )
