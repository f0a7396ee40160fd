"""Learned absolute positions (GPT-2 and kin): extend the table by copying trained rows.

Longformer initialised its 4,096 positions by repeating RoBERTa's 512 trained ones; the
new rows here repeat the trained table the same way, so every position starts from a
vector the model has seen.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def find_position_embedding(model: nn.Module, config: Any) -> tuple[nn.Module, str] | None:
    """``(parent, attribute)`` of the learned position table, or None for models without one."""
    n = getattr(config, "max_position_embeddings", None)
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if (
            isinstance(module, nn.Embedding)
            and module.num_embeddings == n
            and ("pos" in leaf or leaf == "wpe")
        ):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            return parent, leaf
    return None


@torch.no_grad()
def tile_positions(table: nn.Embedding, length: int) -> nn.Embedding:
    """A ``length``-row copy of ``table`` whose extra rows repeat the trained rows."""
    old = table.weight
    new = nn.Embedding(length, old.shape[1], device=old.device, dtype=old.dtype)
    reps = -(-length // old.shape[0])
    new.weight.copy_(old.repeat(reps, 1)[:length])
    new.weight.requires_grad_(old.requires_grad)
    return new
