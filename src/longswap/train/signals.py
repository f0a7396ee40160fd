"""Training signals computed inside attention calls, collected through ``swap.observe``.

An observer is installed on a swapped model for one forward pass; each swapped layer hands
it its attention call, and the observer keeps what the loss needs. Nothing global, nothing
written into transformers' objects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longswap.swap import AttentionCall


class AttentionTransfer:
    """Per swapped layer, the MSE between its sparse output and causal dense attention of
    the same queries, keys and values (detached: the teacher). Training on their mean makes
    each sparse layer reproduce what the dense layer computed, whatever the pattern (the
    LoLCATs attention-transfer idea)."""

    def __init__(self) -> None:
        self.losses: list[Tensor] = []

    def __call__(self, call: AttentionCall) -> None:
        """Record the layer's transfer loss."""
        with torch.no_grad():
            dense = F.scaled_dot_product_attention(
                call.query,
                call.key,
                call.value,
                is_causal=True,
                scale=call.scale,
                enable_gqa=call.query.shape[1] != call.key.shape[1],
            )
        self.losses.append(F.mse_loss(call.output.float(), dense.float()))

    def loss(self) -> Tensor:
        """The mean over the layers seen in this forward."""
        if not self.losses:
            raise ValueError("attention transfer needs a swapped model: no layer reported")
        return torch.stack(self.losses).mean()
