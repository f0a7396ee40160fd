"""The selector warm-up: dense targets computed once per sequence, many selector updates each.

With the base frozen, what a learned selector should learn from a sequence never changes:
each layer's queries and keys, and dense attention's mass on each key block (the target).
Computing that target is the expensive part of a warm-up step (dense attention over the
sequence, chunk by chunk, in every layer: minutes at 8k tokens on a CPU), while scoring the
blocks with a selector costs almost nothing. So the warm-up reads each sequence once
(:class:`Teacher`: one forward of the model with dense attention, as DeepSeek's warm-up
runs it, observed through ``swap.observe``; targets pooled to blocks layer by layer as they
are produced) and then takes ``reuse`` optimiser steps
from it, each on a fresh random sample of its query rows (:class:`SelectorStudent`). It
runs on the Trainer like every other method: checkpoints, the learning-rate schedule and
resuming come from there; the rows of every step derive from the seed and the step alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset

from longswap.selectors import SELECTOR_ATTR, selector_kl
from longswap.swap import AttentionCall, observe
from longswap.swap.model import attention_modules
from longswap.train.signals import selection_target, step_generator

#: Validation sequences the warm-up evaluates on (each costs a forward and dense targets).
EVAL_SEQUENCES = 2


@dataclass(frozen=True)
class LayerTarget:
    """One layer's view of one sequence: detached queries ``(1, Hq, L, D)`` and keys
    ``(1, Hkv, L, D)``, dense block mass ``(1, Hkv, L, n)`` and candidates ``(L, n)``.
    ``start``: where it begins in its row (a packed row's documents are one view each)."""

    layer: int
    query: Tensor
    key: Tensor
    target: Tensor
    candidates: Tensor
    start: int = 0

    def rows(self, picked: Tensor) -> Tensor:
        """The rows of ``picked`` (positions in the packed row) inside this view, counted
        from its first."""
        inside = (picked >= self.start) & (picked < self.start + self.query.shape[2])
        return picked[inside] - self.start


class Teacher:
    """Per sequence of ``sequences``, the :class:`LayerTarget` of every layer with a
    selector, computed on first use; the last ``keep`` sequences stay in memory."""

    def __init__(self, model: Any, sequences: Dataset, keep: int = 2) -> None:
        self.model, self.sequences, self.keep = model, sequences, keep
        self.kept: dict[int, list[LayerTarget]] = {}

    def __call__(self, index: int) -> list[LayerTarget]:
        """The targets of sequence ``index``."""
        if index not in self.kept:
            self.kept[index] = self._read(index)
            while len(self.kept) > self.keep:
                del self.kept[next(iter(self.kept))]
        return self.kept[index]

    def _read(self, index: int) -> list[LayerTarget]:
        item = self.sequences[index]
        inputs = {k: item[k][None] for k in ("input_ids", "position_ids") if k in item}
        layers: list[LayerTarget] = []

        def record(call: AttentionCall) -> None:
            if not call.pattern.needs_selector:
                return
            q, k, pattern = call.query.detach(), call.key.detach(), call.pattern
            target = selection_target(call)
            candidates = pattern.candidates(q.shape[2], k.shape[2], q.device)
            layers.append(LayerTarget(call.layer, q, k, target, candidates, call.start))

        was_training = self.model.training
        self.model.eval()
        with observe(self.model, record, dense=True), torch.no_grad():
            self.model(**inputs, logits_to_keep=1)
        self.model.train(was_training)
        return layers


class RowSamples(IterableDataset):
    """The warm-up's steps, in order: step ``i`` reads sequence ``i // reuse`` (cycling over
    the set) and ``rows`` query rows drawn from the seed and ``i`` alone (all rows when the
    sequence has fewer). Sequence-major, so that each sequence's targets are computed once.
    """

    def __init__(
        self, sequences: int, length: int, rows: int, reuse: int, steps: int, seed: int
    ) -> None:
        self.sequences, self.length, self.rows = sequences, length, min(rows, length)
        self.reuse, self.steps, self.seed = reuse, steps, seed

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Any:
        for step in range(self.steps):
            g = step_generator(self.seed, step)
            rows = torch.randperm(self.length, generator=g, device="cpu")[: self.rows].sort().values
            yield {"sequence": torch.tensor((step // self.reuse) % self.sequences), "rows": rows}


def warm_up_samples(
    train_set: Dataset, val_set: Dataset, rows: int, reuse: int, steps: int, seed: int
) -> tuple[RowSamples, RowSamples]:
    """The warm-up's training steps, and its evaluation: every row of the first
    :data:`EVAL_SEQUENCES` validation sequences."""
    length = train_set[0]["input_ids"].numel()
    evaluated = min(EVAL_SEQUENCES, len(val_set))
    return (
        RowSamples(len(train_set), length, rows, reuse, steps, seed),
        RowSamples(evaluated, length, length, 1, evaluated, seed),
    )


class SelectorStudent(nn.Module):
    """What the Trainer optimises in the warm-up: the model's selectors (the same modules,
    so the swapped model holds what is learned), scored on sampled rows of cached targets.

    ``forward(sequence, rows)`` returns ``{"loss": ...}``: the mean over layers and batch
    items of ``KL(target || softmax(scores))`` over each row's candidate blocks.
    """

    def __init__(self, model: Any, train_set: Dataset, val_set: Dataset) -> None:
        super().__init__()
        modules = attention_modules(model)
        self.selectors = nn.ModuleDict(
            {
                str(i): getattr(m, SELECTOR_ATTR)
                for i, m in modules.items()
                if hasattr(m, SELECTOR_ATTR)
            }
        )
        # Plain attributes: the frozen model is not part of what the Trainer saves.
        self.__dict__["teachers"] = {
            "train": Teacher(model, train_set),
            "eval": Teacher(model, val_set, keep=EVAL_SEQUENCES),
        }

    def forward(
        self, sequence: Tensor, rows: Tensor, return_loss: bool = True
    ) -> dict[str, Tensor]:
        """The loss of a batch: ``sequence (B,)`` indices, ``rows (B, R)`` query rows
        (``return_loss`` tells the Trainer that evaluation has a loss without labels)."""
        teacher = self.teachers["train" if self.training else "eval"]
        terms = []
        for index, picked in zip(sequence.tolist(), rows, strict=True):
            for t in teacher(index):
                if not (rows := t.rows(picked)).numel():
                    continue
                selector = self.selectors[str(t.layer)]
                scores = selector.score(t.query[:, :, rows], selector.block_keys(t.key))
                terms.append(selector_kl(scores, t.target[:, :, rows], t.candidates[rows]))
        return {"loss": torch.stack(terms).mean()}
