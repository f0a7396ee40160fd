"""A KV cache for decoding swapped models: bounded for windows, summarised for selections.

For a layer swapped to ``sliding_window(window, sinks)``, no future query can see a key
that is neither a sink nor among the last ``window - 1``; :class:`SinkWindowLayer` drops
every other key, so memory per layer stops growing at ``sinks + window - 1`` entries plus
a little spare room (at least 64, a sixteenth of the window) that new keys are written
into in place.

For a layer that selects key blocks (``block_topk``, ``learned_topk``, and their unions
with static patterns), :class:`BlockSummaryLayer` keeps every key (any block may be
selected later) plus one summary per complete block (its mean key, or the learned
selector's block key), computed once when the block completes: a decoding step scores
``L / block`` summaries instead of reading all ``L`` keys. The layer hands itself to its
attention call through the attention module (the call takes it back at once).

The attention then runs on the compacted cache as if its entries were consecutive: sinks
keep their positions, and the recent keys plus the new queries keep their distances to
each other, so the window rule gives exactly the keys it would on the full cache. Keys
carry their rotary positions from when they were written.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer

from longswap.patterns import SlidingWindow
from longswap.swap.attention import CACHE_LAYER_ATTR
from longswap.swap.model import swap_spec


class _Buffered(DynamicLayer):
    """A cache layer whose keys and values live in preallocated buffers: ``keys`` and
    ``values`` are views of their filled part, so appending a token writes it in place
    instead of copying the whole cache (transformers' ``DynamicLayer`` concatenates)."""

    def __init__(self) -> None:
        super().__init__()
        self._buffers: tuple[Tensor, Tensor] | None = None

    def _filled(self) -> int:
        return self.keys.shape[-2] if self.keys.dim() == 4 else 0  # empty until the first

    def _owned(self, new: Tensor) -> bool:
        """Whether the buffers still hold this layer's entries (nothing reordered, cropped
        or replaced them) in ``new``'s batch and heads."""
        buffers = self._buffers
        return (
            buffers is not None
            and buffers[0].data_ptr() == self.keys.data_ptr()
            and buffers[0].shape[:2] == new.shape[:2]
        )

    def _fits(self, new: Tensor, length: int) -> bool:
        """Whether ``new`` states go into the buffers after ``length`` entries."""
        return self._owned(new) and self._buffers[0].shape[-2] >= length + new.shape[-2]

    def _check_batch(self, new: Tensor) -> None:
        """Refuse states of a batch of another size than the entries held: generating on
        top of another batch's entries would be silently wrong."""
        if self._filled() and new.shape[0] != self.keys.shape[0]:
            raise ValueError(
                f"this sparse_cache holds {self._filled()} tokens of a batch of "
                f"{self.keys.shape[0]} sequences and cannot continue a batch of {new.shape[0]}; "
                "pass a new longswap.swap.sparse_cache(model) to each generate call"
            )

    def _capacity(self, total: int) -> int:
        """Entries to allocate for ``total`` filled ones: a quarter more, and 256."""
        return total * 5 // 4 + 256

    def _append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Views of the buffers after writing the new states at the end of the filled part;
        new buffers (:meth:`_capacity`) when they do not fit."""
        length, new = self._filled(), keys.shape[-2]
        if not self._fits(keys, length):
            grown = []
            capacity = self._capacity(length + new)
            for old, fresh in ((self.keys, keys), (self.values, values)):
                buffer = fresh.new_empty(*fresh.shape[:2], capacity, fresh.shape[-1])
                buffer[..., :length, :] = old[..., :length, :] if length else 0
                grown.append(buffer)
            self._buffers = (grown[0], grown[1])
        buffers = self._buffers
        for buffer, fresh in zip(buffers, (keys, values), strict=True):
            buffer[..., length : length + new, :] = fresh
        return buffers[0][..., : length + new, :], buffers[1][..., : length + new, :]


class SinkWindowLayer(_Buffered):
    """Keeps the first ``sinks`` and the last ``window - 1`` keys and values of one layer.

    New entries go into spare room at the end of the buffers (``spare``: at least 64, a
    sixteenth of the window); when it runs out, the last ``window - 1`` entries move down
    behind the sinks, once per ``spare`` tokens, where concatenating would copy the whole
    window at every step. Entries older than the window may stay in
    between: the window rule masks them, since the recent entries stay consecutive.
    """

    is_sliding = True

    def __init__(self, window: int, sinks: int = 0) -> None:
        super().__init__()
        self.window, self.sinks = window, sinks
        self.spare = max(64, window // 16)
        self.cumulative_length = 0

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Return all states for this step's attention; keep only what later steps can see."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_batch(key_states)
        self.cumulative_length += key_states.shape[-2]
        length = self._filled()
        if self._owned(key_states) and not self._fits(key_states, length):
            length = self._compact(length)  # room again, in the same buffers
        if self._fits(key_states, length) or key_states.shape[-2] <= self.spare:
            self.keys, self.values = self._append(key_states, value_states)
            return self.keys, self.values
        # A long prompt: this step sees all of it; the buffers keep what later steps can.
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        kept_keys, kept_values = self._trim(keys), self._trim(values)
        self._buffers = None
        self.keys, self.values = kept_keys[..., :0, :], kept_values[..., :0, :]
        self.keys, self.values = self._append(kept_keys, kept_values)
        return keys, values

    def _capacity(self, total: int) -> int:
        """Room to grow by a quarter, up to the window's entries plus the spare room."""
        bound = self.sinks + self.window - 1 + self.spare
        return max(total, min(total * 5 // 4 + self.spare, bound))

    def _compact(self, length: int) -> int:
        """Move the last ``window - 1`` entries down behind the sinks; the new length."""
        recent = self.window - 1
        if length <= self.sinks + recent:
            return length
        for buffer in self._buffers:
            buffer[..., self.sinks : self.sinks + recent, :] = buffer[
                ..., length - recent : length, :
            ].clone()
        self.keys, self.values = (b[..., : self.sinks + recent, :] for b in self._buffers)
        return self.sinks + recent

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
        """Entries kept at most between steps (the spare room included)."""
        return self.sinks + self.window - 1 + self.spare

    def crop(self, tokens_to_remove: int) -> None:
        """Rolling back is impossible once keys were dropped."""
        raise ValueError("a bounded longswap cache cannot be cropped (its old keys are gone)")


class BlockSummaryLayer(_Buffered):
    """Keeps every key and value of one layer, and a summary of each complete key block.

    Keys and values live in buffers that grow by a quarter (and 256 tokens) when full:
    appending a token costs O(1) amortised.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._module = weakref.ref(module)
        self._summaries: Tensor | None = None

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Append the states and hand this layer to the attention call that follows."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_batch(key_states)
        self.keys, self.values = self._append(key_states, value_states)
        module = self._module()
        if module is not None:
            module.__dict__[CACHE_LAYER_ATTR] = self
        return self.keys, self.values

    def block_keys(
        self, keys: Tensor, summarize: Callable[[Tensor], Tensor], block_size: int
    ) -> Tensor:
        """Summaries ``(B, Hkv, n, ...)`` of the ``n`` complete blocks of ``keys`` (this
        layer's keys); ``summarize`` runs only on blocks completed since the last call."""
        n = keys.shape[2] // block_size
        if self._summaries is None:
            self._summaries = summarize(keys[:, :, : n * block_size])
        elif n > self._summaries.shape[2]:
            new = summarize(keys[:, :, self._summaries.shape[2] * block_size : n * block_size])
            self._summaries = torch.cat([self._summaries, new], 2)
        return self._summaries[:, :, :n]

    def _forget(self) -> None:
        """The keys changed other than by appending: summaries are recomputed on next use."""
        self._summaries = None

    def crop(self, max_length: int) -> None:
        """Drop the last tokens (assisted decoding) and the summaries with them."""
        super().crop(max_length)
        self._forget()

    def reset(self) -> None:
        """Empty the layer."""
        super().reset()
        self._forget()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch (beam search)."""
        super().reorder_cache(beam_idx)
        self._forget()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch row (beam search set-up)."""
        super().batch_repeat_interleave(repeats)
        self._forget()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep some batch rows (contrastive search)."""
        super().batch_select_indices(indices)
        self._forget()


def sparse_cache(model: Any) -> Cache:
    """A cache for ``model.generate(cache=...)`` that decodes each swapped layer sparsely.

    Layers swapped to ``sliding_window`` keep ``sinks + window - 1`` entries; layers that
    select key blocks keep everything plus block summaries (so a decoding step reads only
    the summaries, its static keys and its selected blocks); all others keep everything,
    as the default cache does. Batches must not contain padding.
    """
    spec = swap_spec(model)
    if spec is None:
        raise ValueError("sparse_cache is for swapped models; this one is not swapped")
    modules = {m.layer_idx: m for m in model.modules() if hasattr(m, "layer_idx")}
    layers: list[DynamicLayer] = []
    for i in range(len(spec.layers)):
        pattern = spec.pattern(i)
        if isinstance(pattern, SlidingWindow):
            layers.append(SinkWindowLayer(pattern.window, pattern.sinks))
        elif pattern.data_dependent:
            layers.append(BlockSummaryLayer(modules[i]))
        else:
            layers.append(DynamicLayer())
    return Cache(layers=layers)
