"""A KV cache that stays bounded under window and sink patterns during decoding.

For a layer swapped to ``sliding_window(window, sinks)``, no future query can see a key
that is neither a sink nor among the last ``window - 1``; this cache drops every other
key after each step, so memory per layer stops growing at ``sinks + window - 1`` entries.

The attention then runs on the compacted cache as if its entries were consecutive: sinks
keep their positions, and the recent keys plus the new queries keep their distances to
each other, so the window rule gives exactly the keys it would on the full cache. Keys
carry their rotary positions from when they were written.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from longswap.patterns import SlidingWindow
from longswap.swap.attention import spec_of


class SinkWindowLayer(DynamicLayer):
    """Keeps the first ``sinks`` and the last ``window - 1`` keys and values of one layer."""

    is_sliding = True

    def __init__(self, window: int, sinks: int = 0) -> None:
        super().__init__()
        self.window, self.sinks = window, sinks
        self.cumulative_length = 0

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Return all states for this step's attention; keep only what later steps can see."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values = self._trim(keys), self._trim(values)
        return keys, values

    def _trim(self, x: Tensor) -> Tensor:
        recent = self.window - 1
        if x.shape[-2] <= self.sinks + recent:
            return x
        tail = x[..., x.shape[-2] - recent :, :]
        return torch.cat([x[..., : self.sinks, :], tail], dim=-2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Keys the next step attends to: the kept entries plus the new ones."""
        kept = 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]
        return kept + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens seen so far (the position of the next token)."""
        return self.cumulative_length

    def get_max_length(self) -> int:
        """Entries kept at most between steps."""
        return self.sinks + self.window - 1

    def crop(self, tokens_to_remove: int) -> None:
        """Rolling back is impossible once keys were dropped."""
        raise ValueError("a bounded longswap cache cannot be cropped (its old keys are gone)")


def bounded_cache(model: Any) -> Cache:
    """A cache for ``model.generate(past_key_values=...)`` that bounds window/sink layers.

    Layers swapped to ``sliding_window`` keep ``sinks + window - 1`` entries; all others
    keep everything, as the default cache does. Batches must not contain padding.
    """
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    spec = spec_of(config)
    layers = []
    for i in range(len(spec.layers)):
        pattern = spec.pattern(i)
        if isinstance(pattern, SlidingWindow):
            layers.append(SinkWindowLayer(pattern.window, pattern.sinks))
        else:
            layers.append(DynamicLayer())
    return Cache(layers=layers)
