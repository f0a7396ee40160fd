"""Learning from the dense parent: the recovery objective of a swapped model.

The parent is the model being fine-tuned as it was before: the same weights, with the
original (full) attention. With LoRA+ it is the model itself with its adapters disabled
(PEFT keeps the original embeddings and norms beside their trained copies), so it costs no
second copy; with the other methods it is a frozen copy taken before the first step. A
step's loss mixes the language-model loss with the KL divergence from the parent's
next-token distribution to the model's, at every predicted position:
``(1 - w) * LM + w * KL(parent || model)``, each a mean over the predicted tokens.

Logits are never held for a whole sequence (16,384 x 49,152 floats are 3.2 GB), with or
without the parent (``longswap finetune`` computes its plain LM loss this way too): the
final hidden states are computed once, and the logits of each chunk of
:data:`CHUNK` positions are computed from them, reduced to the chunk's loss and recomputed
in the backward pass (activation checkpointing), so a step holds one chunk's logits at a
time.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from longswap.swap import Observer, observe
from longswap.swap.spec import CONFIG_KEY

#: Positions whose logits a step holds at once (one chunk of both models' logits in
#: float32: 1,024 x 49,152 x 4 bytes = 0.2 GB each for SmolLM2's vocabulary).
CHUNK = 1024
#: The label the Trainer's datasets and collators use for "not predicted".
IGNORE = -100


def causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM inside ``model`` (a PEFT wrapper's base model, or ``model``)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _logits(lm: nn.Module, hidden: Tensor) -> Tensor:
    """Float32 logits of ``hidden (B, C, H)`` through ``lm``'s head (and its final logit cap,
    Gemma 2's ``final_logit_softcapping``)."""
    logits = lm.get_output_embeddings()(hidden).float()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


class DenseParent:
    """The dense parent of ``model`` (the model about to be trained; see the module)."""

    def __init__(self, model: nn.Module) -> None:
        self.adapters = hasattr(model, "disable_adapter")
        self.frozen = None
        if not self.adapters:
            self.frozen = copy.deepcopy(model).requires_grad_(False).eval()

    @contextlib.contextmanager
    def active(self, model: nn.Module, attention: bool = True) -> Iterator[nn.Module]:
        """A context in which the yielded causal LM computes as the parent, without
        gradients; ``attention=False``: for its head alone (no attention runs)."""
        parent = model if self.frozen is None else self.frozen
        lm = causal_lm(parent)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if self.adapters:
                stack.enter_context(model.disable_adapter())
            if attention and getattr(lm.config, CONFIG_KEY, None) is not None:
                stack.enter_context(observe(parent, lambda call: None, dense=True))
            yield lm

    def to(self, device: torch.device) -> DenseParent:
        """The frozen copy (if any) on ``device``."""
        if self.frozen is not None:
            self.frozen.to(device)
        return self


def recovery_loss(
    model: nn.Module,
    parent: DenseParent | None,
    inputs: dict[str, Tensor],
    weight: float,
    chunk: int = CHUNK,
    observer: Observer | None = None,
) -> Tensor:
    """``(1 - weight) * LM + weight * KL(parent || model)`` over ``inputs`` (``input_ids``,
    ``labels`` and, for packed documents, ``position_ids``; an ``attention_mask`` if any),
    each term a mean over the predicted tokens; ``chunk`` positions' logits at a time.
    ``parent`` None: the LM loss alone (``weight`` 0), computed the same way, so a long
    sequence never holds its whole logits. ``observer`` sees the model's attention calls
    (not the parent's), as ``swap.observe`` hands them."""
    if parent is None and weight:
        raise ValueError(f"a KL weight ({weight}) needs the dense parent")
    kept = {k: inputs[k] for k in ("input_ids", "position_ids", "attention_mask") if k in inputs}
    targets = inputs["labels"][:, 1:]  # (B, L - 1): position i predicts token i + 1
    lm = causal_lm(model)
    taught = None
    if parent is not None:
        parent.to(targets.device)
        with parent.active(model) as teacher:
            taught = teacher.base_model(**kept).last_hidden_state[:, :-1]
    with contextlib.nullcontext() if observer is None else observe(model, observer):
        hidden = lm.base_model(**kept).last_hidden_state[:, :-1]  # (B, L - 1, H)

    def chunk_loss(student: Tensor, labels: Tensor, dense: Tensor | None = None) -> Tensor:
        log_q = F.log_softmax(_logits(lm, student), -1)  # (B, C, V)
        valid = labels != IGNORE
        loss = -log_q.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
        if dense is not None:
            with parent.active(model, attention=False) as teacher:
                log_p = F.log_softmax(_logits(teacher, dense), -1)
            loss = (1 - weight) * loss + weight * (log_p.exp() * (log_p - log_q)).sum(-1)
        return (loss * valid).sum()

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[1], chunk):
        part = slice(start, start + chunk)
        extra = () if taught is None else (taught[:, part],)
        total = total + checkpoint(
            chunk_loss, hidden[:, part], targets[:, part], *extra, use_reentrant=False
        )
    return total / (targets != IGNORE).sum().clamp_min(1)


def recovery_problems(config: Any) -> list[str]:
    """Why ``--kl-weight`` cannot run with the rest of ``config`` (told before any work)."""
    weight = config.kl_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
        return [
            f"kl_weight must be a number in [0, 1] (the KL's share of the loss), got {weight!r}"
        ]
    if not weight:
        return []
    found = []
    if config.method == "selector":
        found.append(
            "--kl-weight with --method selector: the selector warm-up trains the gates on "
            "dense attention's block mass, not on next-token distributions; leave out one"
        )
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if config.deepspeed or config.sequence_parallel > 1 or processes > 1:
        found.append(
            "--kl-weight runs on one process: the dense parent's forward (adapters disabled, "
            "or a frozen copy) is not set up for data-parallel wrappers, sharded parameters "
            "(--deepspeed) or a split sequence (--sequence-parallel); fine-tune with the KL "
            "on one process, or without it"
        )
    return found
