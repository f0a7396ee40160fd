"""``BlockGate``: a small scorer of key blocks (SeerAttention-R's gate), per KV group or head.

Keys are summarised in pieces of ``sub_block`` tokens (by default one piece per block). For
a query token ``t`` of KV group ``g`` and a complete key block ``j`` made of pieces ``p``::

    piece[h, t, p] = (q[h, t] @ query_map[h]) . key_map([max, min, mean] of k[g, piece p])
                     / sqrt(dim)
    score[g, t, j] = max over the heads h of g of  logsumexp over the pieces p of j of
                     piece[h, t, p]

Each query head has its own map; the key side reads each piece's keys pooled three ways
(after RoPE, as attention sees them). With one piece per block the log-sum-exp is the
piece's own score (SeerAttention-R's gate); with pieces smaller than the block, the score
is the log of an attention over piece summaries summed over the block, so a block holding
one key that matches the query strongly stands out, which a summary of the whole block
averages away (at ``sub_block=1`` and an untrained gate it is the log of the head's dense
attention mass on the block, before normalisation). The group's score is the max over its
heads, as the distillation target is (dense attention's block mass, max over the group's
heads): a sum of the heads' products, a single map over the concatenated queries, cannot
be a max. With ``per_head`` the heads' scores are kept apart (``(B, Hq, Lq, n)``): each
head selects for itself, against its own block mass. Every scorer (the tensor path, the
fused prompt kernel, the decoding step's) follows ``torch.logsumexp`` and ``torch.amax`` on
NaN and infinities: a NaN piece makes its block's score NaN (and the group's), a +inf piece
+inf, pieces all -inf give -inf; the other blocks keep their scores. Both inputs are
detached: the gate learns only from its distillation loss, never from the LM loss.
Initialisation makes it MoBA's mean-pooled keys (piece by piece): each head's map is the
identity and the key map takes the mean key, so an untrained gate with one piece per block
scores a block by the best of the group's ``q_h . mean(k)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longswap.kernels.cpp import compiled
from longswap.patterns import Selection

#: Piece scores held at once while scoring (elements): the rows per chunk follow from it.
SCORE_CHUNK = 2**21


class BlockGate(nn.Module):
    """Scores ``(B, Hkv, Lq, n)`` (``per_head``: ``(B, Hq, Lq, n)``) of the ``n`` complete key
    blocks for every query token."""

    def __init__(
        self,
        head_dim: int,
        group: int,
        block_size: int,
        per_head: bool = False,
        sub_block: int | None = None,
    ) -> None:
        super().__init__()
        sub_block = sub_block or block_size
        if block_size % sub_block:
            raise ValueError(f"sub_block {sub_block} must divide the block size {block_size}")
        self.head_dim, self.group, self.block_size = head_dim, group, block_size
        self.per_head, self.sub_block = per_head, sub_block
        self.query_map = nn.Parameter(torch.empty(group, head_dim, head_dim))
        self.key_map = nn.Linear(3 * head_dim, head_dim, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The MoBA start: each head's query against the block's mean key."""
        eye = torch.eye(self.head_dim)
        self.query_map.copy_(eye.expand(self.group, -1, -1))
        self.key_map.weight.copy_(torch.cat([torch.zeros_like(eye)] * 2 + [eye], dim=1))

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        """q ``(B, Hq, Lq, D)``, k ``(B, Hkv, Lk, D)`` -> scores ``(B, Hkv or Hq, Lq, Lk //
        block)``."""
        return self.score(q, self.block_keys(k), offset=k.shape[2] - q.shape[2])

    @staticmethod
    def shape_for(pattern: Selection, head_dim: int, group: int) -> tuple[int, int, int, bool, int]:
        """The :attr:`shape` of the gate ``pattern`` (a selection that ``needs_selector``)
        scores with; ``BlockGate(*shape)`` builds it."""
        sub_block = pattern.sub_block or pattern.block_size
        return head_dim, group, pattern.block_size, pattern.per_head, sub_block

    @property
    def shape(self) -> tuple[int, int, int, bool, int]:
        """What fixes the gate's parameters and meaning: ``(head_dim, group, block_size,
        per_head, sub_block)``; a re-swap keeps a trained gate only if its shape matches."""
        return self.head_dim, self.group, self.block_size, self.per_head, self.sub_block

    def block_keys(self, k: Tensor) -> Tensor:
        """The key side ``(B, Hkv, n, pieces, D)`` of each complete block of k ``(B, Hkv,
        Lk, D)``, each block on its own: a cache computes them once, as blocks complete."""
        batch, hkv, kv_len, dim = k.shape
        if dim != self.head_dim:
            raise ValueError(
                f"this gate was built for head dim {self.head_dim}; got k {tuple(k.shape)}"
            )
        n = kv_len // self.block_size
        keys = k.detach()[:, :, : n * self.block_size].to(self.key_map.weight.dtype)
        pieces = self.block_size // self.sub_block
        keys = keys.reshape(batch, hkv, n, pieces, self.sub_block, dim)  # (B, Hkv, n, m, s, D)
        pooled = torch.cat([keys.amax(4), keys.amin(4), keys.mean(4)], dim=-1)  # (.., m, 3D)
        return self.key_map(pooled)

    def score(self, q: Tensor, block_keys: Tensor, offset: int | None = None) -> Tensor:
        """Scores ``(B, Hkv or Hq, Lq, n)`` of q ``(B, Hq, Lq, D)`` against :meth:`block_keys`.

        ``offset``: the position of the first query row, rows consecutive after it (an
        attention call's queries); blocks at or after a row's own block cannot be selected,
        so only those before the last row's of each chunk of rows are scored, the others get
        ``-inf``: half the work at full length. None (rows sampled anywhere): every block.
        """
        batch, hq, q_len, dim = q.shape
        hkv, n, pieces = block_keys.shape[1:4]
        if dim != self.head_dim or hq != hkv * self.group:
            raise ValueError(
                f"this gate was built for {self.group} query heads per KV head of dim "
                f"{self.head_dim}; got q {tuple(q.shape)} for {hkv} KV heads"
            )
        if q_len == 1 and q.device.type == "cpu" and not torch.is_grad_enabled():
            kernel = compiled("selection_decode")  # a decoding step: one call, not ten
            if kernel is not None:
                seen = n if offset is None else min(n, offset // self.block_size)
                args = (q[:, :, 0], block_keys, self.query_map)
                args = tuple(x.detach().float().contiguous() for x in args)
                step = kernel.gate_scores(*args, self.per_head, seen)  # (B, Hq or Hkv, n)
                return step[:, :, None].to(self.query_map.dtype)
        queries = q.detach().to(self.query_map.dtype).unflatten(1, (hkv, self.group))
        # (B, Hkv, g, Lq, D) @ (g, D, D), scaled here: on Lq x D numbers, not Lq x n x m
        mapped = (queries @ self.query_map) * (1 / math.sqrt(dim))  # (B, Hkv, g, Lq, D)
        kernel = self._prompt_kernel(q, offset) if pieces > 1 else None
        if kernel is not None:  # pieces of a prompt without gradients: one fused call
            return kernel.gate_prompt_scores(  # float32 scores, whatever the gate's dtype
                mapped.flatten(1, 2).float().contiguous(),
                block_keys.float().contiguous(),
                self.per_head,
                offset,
                self.block_size,
            )
        keys = block_keys.flatten(2, 3)[:, :, None].transpose(-1, -2)  # (B, Hkv, 1, D, n * m)
        # Rows in chunks: with pieces, one layer's piece scores at 8k tokens are hundreds
        # of MB, and the log-sum-exp's passes over them run faster from cache.
        rows = max(1, SCORE_CHUNK // max(1, hq * n * pieces))
        out = []
        for start in range(0, q_len, rows):
            stop = min(start + rows, q_len)
            seen = n if offset is None else min(n, (offset + stop - 1) // self.block_size)
            scores = mapped[:, :, :, start:stop] @ keys[..., : seen * pieces]  # (.., r, s * m)
            blocks = _log_sum_exp(scores.unflatten(-1, (seen, pieces)))  # (B, Hkv, g, r, s)
            if self.per_head:
                blocks = blocks.flatten(1, 2)
            else:
                blocks = blocks.amax(2) if self.group > 1 else blocks[:, :, 0]
            out.append(F.pad(blocks, (0, n - seen), value=float("-inf")) if seen < n else blocks)
        return torch.cat(out, 2) if len(out) > 1 else out[0]  # (B, Hq or Hkv, Lq, n)

    def _prompt_kernel(self, q: Tensor, offset: int | None):  # noqa: ANN202 (a module)
        """The compiled prompt scorer (float32 arithmetic) for an attention call's rows on
        CPU when no gradient reaches the gate; else None."""
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if offset is None or trains or q.device.type != "cpu":
            return None
        return compiled("selection_attention")


def _log_sum_exp(scores: Tensor) -> Tensor:
    """``(..., n)``: the log-sum-exp over the last dim of ``scores (..., n, m)``, as
    ``torch.logsumexp`` gives it (NaN when a piece is NaN, +inf when one is +inf, -inf when
    all are -inf); without gradients in place, block by block (fewer passes over memory than
    ``logsumexp``, and as exact)."""
    if scores.shape[-1] == 1:
        return scores[..., 0]
    if torch.is_grad_enabled() and scores.requires_grad:
        return scores.logsumexp(-1)
    top = scores.amax(-1, keepdim=True)
    top.masked_fill_(~top.isfinite(), 0)  # no finite shift: the exponentials say it all
    return scores.sub_(top).exp_().sum(-1).log_().add_(top[..., 0])
