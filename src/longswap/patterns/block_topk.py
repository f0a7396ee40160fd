"""``block_topk(block_size, top_k)``: MoBA's mixture of block attention, strictly causal.

Keys are cut into blocks of ``block_size``. Each query token attends to its own block
(causally) plus the ``top_k`` earlier complete blocks whose mean-pooled keys score highest
against that query, per query token and per head. Selection is parameter-free and
depends only on the query and earlier keys; ties go to the more recent block, NaN scores
rank first and -inf ones are never chosen (:func:`top_places`, the rule of every path).

Selecting once per query *block* (as some implementations do) would let later tokens of a
block steer an earlier token's choice, which leaks the future; this pattern never does.
The element and block views of this class describe the static part (the own block); the
selected blocks come from :meth:`Selection.select`. :class:`Selection` is what every
pattern that selects blocks shares (``learned_topk``, and a union of static patterns with
one selection, ``sliding_window(window=512, sinks=4) | block_topk(...)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from longswap.patterns.base import MaskFn, Pattern, TileGrid, check_int
from longswap.patterns.registry import register

#: ``top(scores (..., Lq, n) float32, valid (Lq, n) bool, places) -> (blocks, chosen)``:
#: :func:`top_places`, or a compiled copy of its rule (the same blocks in the same places).
TopPlaces = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]


class Selection(Pattern):
    """Base of the patterns that select key blocks from the data, per query token.

    A selection pattern has a static part (its element and block views: the own block,
    plus whatever it is united with) and ``top_k`` complete key blocks of ``block_size``
    keys that each query token selects among its :meth:`candidates` by
    :meth:`block_scores`. Subclasses give ``block_size``, ``top_k`` and the scores.
    """

    data_dependent = True
    block_size: int
    top_k: int
    #: Whether each query head selects its own blocks (MoBA); False: the query heads of a
    #: KV group share one selection (NSA, InfLLM-V2).
    per_head: bool = True
    #: Tokens per key summary of a learned selector (``learned_topk``); None: one per block.
    sub_block: int | None = None

    def block_scores(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Scores ``(B, Hq or Hkv, Lq, n)`` of the ``n`` complete key blocks."""
        return self.score_blocks(q, self.block_keys(k, key_padding_mask))

    def block_keys(self, k: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """One summary ``(B, Hkv, n, D)`` per complete key block, each block on its own (a
        decoding cache computes them once, as blocks complete)."""
        raise NotImplementedError

    def score_blocks(self, q: Tensor, block_keys: Tensor) -> Tensor:
        """Scores ``(B, Hq or Hkv, Lq, n)`` of q ``(B, Hq, Lq, D)`` against :meth:`block_keys`."""
        raise NotImplementedError

    def num_candidate_blocks(self, kv_len: int) -> int:
        """Complete key blocks, the only ones a query can select."""
        return kv_len // self.block_size

    def covers(self, kv_len: int) -> bool:
        """Dense while ``top_k`` places hold every complete block (each query sees its own
        block and selects all earlier ones)."""
        return self.num_candidate_blocks(kv_len) <= self.top_k

    def candidates(self, q_len: int, kv_len: int, device: torch.device | str = "cpu") -> Tensor:
        """``(Lq, n)`` bool: the complete key blocks each query may select (those before
        its own block)."""
        own = (torch.arange(kv_len - q_len, kv_len, device=device) // self.block_size)[:, None]
        return torch.arange(self.num_candidate_blocks(kv_len), device=device)[None, :] < own

    @torch.no_grad()
    def select_blocks(
        self,
        q: Tensor,
        k: Tensor,
        key_padding_mask: Tensor | None = None,
        block_scores: Tensor | None = None,
        top: TopPlaces | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(blocks, chosen)``, each ``(B, Hq, Lq, P)``: the complete key blocks each query
        token selects, ``P = min(top_k, complete blocks)`` places per token.

        q is ``(B, Hq, Lq, D)``, k is ``(B, Hkv, Lk, D)``; query ``i`` sits at absolute
        position ``Lk - Lq + i``. ``block_scores`` ``(B, Hq or Hkv, Lq, n)`` replaces the
        pattern's own scores (:meth:`block_scores`); scored per KV group, a selection is
        shared by the group's query heads. ``chosen`` is False for places left empty (a
        token with fewer earlier blocks than ``top_k``). Key blocks whose keys are all
        padding are never selected. Given scores that hold NaN where q and k hold none raise
        ValueError. Places follow :func:`top_places` (ties, NaN and -inf there); ``top``
        picks them without padding (a compiled copy of the rule, faster; see
        :data:`TopPlaces`); None: :func:`top_places` itself.
        """
        batch, hq, q_len, _ = q.shape
        kv_len = k.shape[2]
        n = self.num_candidate_blocks(kv_len)
        places = min(self.top_k, n)
        if places == 0:
            empty = torch.zeros(batch, hq, q_len, 0, dtype=torch.long, device=q.device)
            return empty, empty.bool()
        scores = self.block_scores(q, k, key_padding_mask) if block_scores is None else block_scores
        self.check_scores(scores, q, kv_len)
        if block_scores is not None:
            self.refuse_nan(scores, q, k)
        valid = _candidates(self, q_len, kv_len, q.device)
        if key_padding_mask is None and top is not None:
            blocks, chosen = top(scores.float().contiguous(), valid, places)
        else:
            valid = valid[None, None]
            if key_padding_mask is not None:
                usable = key_padding_mask[:, : n * self.block_size].reshape(batch, n, -1).any(-1)
                valid = valid & usable[:, None, None, :]
            blocks, chosen = top_places(scores, valid, places)
        share = hq // scores.shape[1]  # query heads per row of scores
        if share > 1:
            blocks, chosen = (x.repeat_interleave(share, dim=1) for x in (blocks, chosen))
        return blocks, chosen

    def check_scores(self, scores: Tensor, q: Tensor, kv_len: int) -> None:
        """Raise ValueError unless ``scores`` is ``(B, Hq or a divisor, Lq, n)`` for q
        ``(B, Hq, Lq, D)`` over ``kv_len`` keys (``n`` complete blocks)."""
        batch, hq, q_len = q.shape[:3]
        n = self.num_candidate_blocks(kv_len)
        if scores.shape[0] != batch or scores.shape[2:] != (q_len, n) or hq % scores.shape[1]:
            raise ValueError(
                f"{self.name}: block scores must be (B, Hq or Hkv, Lq, n) = ({batch}, {hq} or a "
                f"divisor, {q_len}, {n}), got {tuple(scores.shape)}"
            )

    def refuse_nan(self, scores: Tensor, q: Tensor, k: Tensor) -> None:
        """Raise ValueError where given scores hold NaN that their query row and block's
        keys do not explain (NaN inputs give NaN rows whatever is selected)."""
        nan = scores.isnan()  # (B, S, Lq, n), S query heads or groups of them
        if not bool(nan.any()):
            return
        batch, rows, q_len, n = scores.shape
        bad_q = q.isnan().any(-1).view(batch, rows, -1, q_len).any(2)  # (B, S, Lq)
        keys = k[:, :, : n * self.block_size].isnan().any(-1).any(1)  # (B, n * block_size)
        bad_k = keys.view(batch, n, self.block_size).any(-1)  # (B, n)
        nan &= ~bad_q[..., None] & ~bad_k[:, None, None, :]
        if bool(nan.any()):
            b, h, i, j = nan.nonzero()[0].tolist()
            raise ValueError(
                f"{self.name}: block_scores hold NaN for finite queries and keys ({int(nan.sum())} "
                f"of {nan.numel()}; first: batch {b}, row {h}, query {i}, block {j}); a block "
                "scored NaN could never be selected: give finite scores (-inf for a block that "
                "must not be selected)"
            )

    def select(
        self,
        q: Tensor,
        k: Tensor,
        key_padding_mask: Tensor | None = None,
        block_scores: Tensor | None = None,
    ) -> Tensor:
        """Boolean ``(B, Hq, Lq, n)`` over the ``n`` complete key blocks: the selected ones
        (see :meth:`select_blocks`)."""
        blocks, chosen = self.select_blocks(q, k, key_padding_mask, block_scores)
        n = self.num_candidate_blocks(k.shape[2])
        out = torch.zeros(*q.shape[:3], n, dtype=torch.bool, device=q.device)
        return out.scatter_(-1, blocks, chosen)

    def token_mask(
        self,
        q: Tensor,
        k: Tensor,
        key_padding_mask: Tensor | None = None,
        block_scores: Tensor | None = None,
    ) -> Tensor:
        """Boolean ``(B, Hq, Lq, Lk)``: the full element view for these inputs (for the oracle)."""
        kv_len = k.shape[2]
        selected = self.select(q, k, key_padding_mask, block_scores)  # (B, Hq, Lq, n)
        n = selected.shape[-1]
        spread = selected.repeat_interleave(self.block_size, dim=-1)
        tail = kv_len - n * self.block_size
        spread = torch.nn.functional.pad(spread, (0, tail))
        local = self.dense_mask(q.shape[2], kv_len, device=q.device)  # (1, Lq, Lk)
        return spread | local[None]


@register
@dataclass(frozen=True)
class BlockTopK(Selection):
    """Own block plus the ``top_k`` best-matching earlier blocks, chosen per token and head."""

    block_size: int = 128
    top_k: int = 4

    name = "block_topk"

    def __post_init__(self) -> None:
        check_int(self.name, "block_size", self.block_size, 1)
        check_int(self.name, "top_k", self.top_k, 0)

    def _mask_fn(self, kv_len: int, num_heads: int, device: torch.device) -> MaskFn:
        bb = self.block_size
        return lambda q, kv, h: q // bb == kv // bb

    def _tiles(self, grid: TileGrid, num_heads: int) -> tuple[Tensor, Tensor]:
        bb = self.block_size
        (q_lo, q_hi), (k_lo, k_hi) = grid.q_bounds, grid.k_bounds
        any_ = (q_lo // bb <= k_hi // bb) & (k_lo // bb <= q_hi // bb)
        full = (q_lo // bb == q_hi // bb) & (k_lo // bb == k_hi // bb) & (q_lo // bb == k_lo // bb)
        return any_, full

    def block_keys(self, k: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """MoBA's block summary: the mean key ``(B, Hkv, n, D)`` of each complete block, in
        float32 (padded keys left out of the mean)."""
        batch, hkv, kv_len, dim = k.shape
        n, bb = self.num_candidate_blocks(kv_len), self.block_size
        keys = k[:, :, : n * bb].float().reshape(batch, hkv, n, bb, dim)
        if key_padding_mask is None:
            return keys.mean(3)
        keep = key_padding_mask[:, : n * bb].reshape(batch, 1, n, bb, 1).float()
        return (keys * keep).sum(3) / keep.sum(3).clamp_min(1)

    def score_blocks(self, q: Tensor, block_keys: Tensor) -> Tensor:
        """MoBA's scores ``(B, Hq, Lq, n)``: each query against each block's mean key."""
        batch, hq, q_len, dim = q.shape
        hkv, n = block_keys.shape[1], block_keys.shape[2]
        qg = q.float().reshape(batch, hkv, (hq // hkv) * q_len, dim)
        return (qg @ block_keys.transpose(-1, -2)).reshape(batch, hq, q_len, n)


@functools.lru_cache(maxsize=8)
def _candidates(pattern: Selection, q_len: int, kv_len: int, device: torch.device) -> Tensor:
    """``pattern.candidates``, kept for the next call of the same shape (the next layer's)."""
    return pattern.candidates(q_len, kv_len, device)


#: Rank orders (see :func:`_rank_keys`) of a NaN score, of a block the query may not select
#: (below -inf's), and the smallest rank key of a chosen block (just above -inf's).
_NAN_ORDER, _NOT_CANDIDATE = 2**31 - 1, -(2**31)
_FIRST_CHOSEN = (-0x7F800000 + 1) * 2**32


def top_places(scores: Tensor, valid: Tensor, places: int) -> tuple[Tensor, Tensor]:
    """The rule by which every path selects key blocks (this function, the compiled top-k
    of ``csrc/selection_attention.cpp`` and the decoding step of ``csrc/selection_decode.cpp``).

    Each row of ``scores (..., Lq, n)`` ranks the blocks that ``valid`` (broadcast to it)
    marks; the ``places`` best, best first, fill its places. A NaN score ranks above every
    number (+inf included), as in ``torch.topk`` and ``torch.amax``: a block scored NaN is
    selected, so the NaN that a query or the block's keys put in its score reaches the row,
    as it would in dense attention. Ties (-0 with +0, NaN with NaN) go to the more recent
    block. A block scored -inf is never chosen, nor is one that ``valid`` leaves out; they
    fill the last places (-inf ones first, each the more recent first) only when a row has
    fewer other blocks. Returns ``(blocks, chosen)``, each ``(..., Lq, places)``: int64
    block indices, distinct within a row (so ``chosen`` can be scattered by ``blocks``), and
    whether each place is chosen.
    """
    top = torch.topk(_rank_keys(scores, valid), places, dim=-1)
    return top.indices, top.values >= _FIRST_CHOSEN


def _rank_keys(scores: Tensor, valid: Tensor) -> Tensor:
    """int64 keys ``(..., n)``, distinct within a row, whose order is :func:`top_places`'s
    ranking: the rank order of the score (its float32 bits as sign and magnitude, so -0 and
    +0 tie; NaN above +inf, blocks left out below -inf) times 2**32, plus the block."""
    bits = scores.float().view(torch.int32).long()
    magnitude = bits & 0x7FFFFFFF
    order = torch.where(bits < 0, -magnitude, magnitude)
    order.masked_fill_(scores.isnan(), _NAN_ORDER).masked_fill_(~valid, _NOT_CANDIDATE)
    return order.mul_(2**32).add_(torch.arange(scores.shape[-1], device=scores.device))
