"""``BlockGate``: a small scorer of key blocks (SeerAttention-R's gate), per KV group or head.

For a query token ``t`` of KV group ``g`` and a complete key block ``j``::

    score[g, t, j] = max over the heads h of g of
                     (q[h, t] @ query_map[h]) . key_map([max, min, mean] of k[g, block j])
                     / sqrt(dim)

Each query head has its own map; the key side reads the block's keys pooled three ways
(after RoPE, as attention sees them). The group's score is the max over its heads, as the
distillation target is (dense attention's block mass, max over the group's heads): a sum of
the heads' products, a single map over the concatenated queries, cannot be a max. With
``per_head`` the heads' scores are kept apart (``(B, Hq, Lq, n)``): each head selects for
itself, against its own block mass. Both
inputs are detached: the gate learns only from its distillation loss, never from the LM
loss. Initialisation makes it MoBA's mean-pooled keys: each head's map is the identity and
the key map takes the mean key, so an untrained gate scores a block by the best of the
group's ``q_h . mean(k)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class BlockGate(nn.Module):
    """Scores ``(B, Hkv, Lq, n)`` (``per_head``: ``(B, Hq, Lq, n)``) of the ``n`` complete key
    blocks for every query token."""

    def __init__(self, head_dim: int, group: int, block_size: int, per_head: bool = False) -> None:
        super().__init__()
        self.head_dim, self.group, self.block_size = head_dim, group, block_size
        self.per_head = per_head
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
        return self.score(q, self.block_keys(k))

    def block_keys(self, k: Tensor) -> Tensor:
        """The key side ``(B, Hkv, n, D)`` of each complete block of k ``(B, Hkv, Lk, D)``,
        each block on its own: a cache computes them once, as blocks complete."""
        batch, hkv, kv_len, dim = k.shape
        if dim != self.head_dim:
            raise ValueError(
                f"this gate was built for head dim {self.head_dim}; got k {tuple(k.shape)}"
            )
        n = kv_len // self.block_size
        keys = k.detach()[:, :, : n * self.block_size].to(self.key_map.weight.dtype)
        keys = keys.reshape(batch, hkv, n, self.block_size, dim)  # (B, Hkv, n, bs, D)
        pooled = torch.cat([keys.amax(3), keys.amin(3), keys.mean(3)], dim=-1)  # (B, Hkv, n, 3D)
        return self.key_map(pooled)

    def score(self, q: Tensor, block_keys: Tensor) -> Tensor:
        """Scores ``(B, Hkv or Hq, Lq, n)`` of q ``(B, Hq, Lq, D)`` against :meth:`block_keys`."""
        batch, hq, q_len, dim = q.shape
        hkv = block_keys.shape[1]
        if dim != self.head_dim or hq != hkv * self.group:
            raise ValueError(
                f"this gate was built for {self.group} query heads per KV head of dim "
                f"{self.head_dim}; got q {tuple(q.shape)} for {hkv} KV heads"
            )
        queries = q.detach().to(self.query_map.dtype).unflatten(1, (hkv, self.group))
        mapped = torch.einsum("bhgld,gde->bhgle", queries, self.query_map)  # (B, Hkv, g, Lq, D)
        scores = mapped @ block_keys[:, :, None].transpose(-1, -2)  # (B, Hkv, g, Lq, n)
        pooled = scores.flatten(1, 2) if self.per_head else scores.amax(2)  # (B, Hq or Hkv, ..)
        return pooled / math.sqrt(self.head_dim)
