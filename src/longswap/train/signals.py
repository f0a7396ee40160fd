"""Training signals computed inside attention calls, collected through ``swap.observe``.

An observer is installed on a swapped model for one forward pass; each swapped layer hands
it its attention call, and the observer keeps what the loss needs. Nothing global, nothing
written into transformers' objects. Inside the call an observer only computes its targets
(without gradients) and keeps tensors; the losses are formed in ``loss()``, after the
forward. Under activation checkpointing the layer's forward runs again in the backward
pass, without the observer, and must save exactly the tensors it saved the first time:
an operation with gradients inside the call would break that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longswap.kernels import sparse_attention
from longswap.patterns import full
from longswap.selectors import dense_block_mass, selector_kl
from longswap.selectors.distill import top_blocks
from longswap.swap import AttentionCall


class AttentionTransfer:
    """Per swapped layer, the MSE between its sparse output and causal dense attention of
    the same queries, keys and values (detached: the teacher). Training on their mean makes
    each sparse layer reproduce what the dense layer computed, whatever the pattern (the
    LoLCATs attention-transfer idea)."""

    def __init__(self) -> None:
        self.pairs: list[tuple[Tensor, Tensor]] = []

    def __call__(self, call: AttentionCall) -> None:
        """Keep the layer's output and its dense teacher."""
        with torch.no_grad():  # the model's dense attention, with its cap and sinks if any
            dense = sparse_attention(
                call.query,
                call.key,
                call.value,
                full(),
                scale=call.scale,
                softcap=call.softcap,
                sinks=call.sinks,
            )
        self.pairs.append((call.output, dense))

    def loss(self) -> Tensor:
        """The mean over the layers seen in this forward."""
        if not self.pairs:
            raise ValueError("attention transfer needs a swapped model: no layer reported")
        return torch.stack([F.mse_loss(o.float(), d.float()) for o, d in self.pairs]).mean()


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """A CPU generator for what step ``step`` samples (its ``micro``-th forward when it
    accumulates gradients), from the run's seed and those alone (so that a resumed run
    samples as the uninterrupted one did)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + (micro << 32))


def selection_target(call: AttentionCall, picked: Tensor | None = None) -> Tensor:
    """``(B, Hkv, Lq, n)``: what a learned selector imitates in this call: dense attention's
    mass on each complete key block, max over a KV group's heads (``(B, Hq, Lq, n)``, each
    head's own, when the pattern selects per head), without the keys the pattern shows
    anyway (own block, a union's window and sinks). ``picked``: only those query rows."""
    pattern = call.pattern
    return dense_block_mass(
        call.query,
        call.key,
        pattern.block_size,
        call.scale,
        softcap=call.softcap,
        static=pattern,
        per_head=pattern.per_head,
        picked=picked,
    )


class SelectorDistillation:
    """Per layer with a learned selector, the KL divergence from dense attention's mass on
    each key block (max over the query heads of a KV group, computed chunk by chunk) to the
    softmax of the selector's scores, over the blocks the selector chose (DeepSeek's sparse
    stage, trained along with the model: the selector keeps ranking its blocks as dense
    attention would). The warm-up, over every candidate block, is ``train.teacher``.

    The dense targets cost a dense attention per layer: on ``rows`` query rows of each
    layer, drawn from ``generator`` among the rows with a block to select (all rows when
    there are no more), they cost that share of it, and the loss is the mean over those
    rows.
    """

    def __init__(self, rows: int, generator: torch.Generator) -> None:
        self.rows, self.generator = rows, generator
        self.terms: list[tuple[Tensor, Tensor, Tensor, Tensor | None]] = []

    def __call__(self, call: AttentionCall) -> None:
        """Keep the layer's scores and dense target (layers without a selector are skipped)."""
        scores = call.block_scores
        if scores is None:
            return
        pattern, q_len = call.pattern, call.query.shape[2]
        candidates = pattern.candidates(q_len, call.key.shape[2], scores.device)
        eligible = candidates.any(-1).nonzero().flatten().cpu()  # rows with a block to select
        picked = None
        if self.rows < eligible.numel():
            draw = torch.randperm(eligible.numel(), generator=self.generator, device="cpu")
            picked = eligible[draw[: self.rows]].sort().values.to(scores.device)
            scores, candidates = scores[:, :, picked], candidates[picked]
        target = selection_target(call, picked)
        selected = top_blocks(scores.detach(), candidates, pattern.top_k)
        self.terms.append((scores, target, candidates, selected))

    def loss(self) -> Tensor:
        """The mean over the layers seen in this forward."""
        if not self.terms:
            raise ValueError(
                "selector distillation needs a model with learned selection: no layer reported "
                "selector scores"
            )
        return torch.stack([selector_kl(*term) for term in self.terms]).mean()
