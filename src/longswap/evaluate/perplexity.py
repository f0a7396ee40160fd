"""Perplexity against context length, on the same target tokens at every length.

The last ``targets`` tokens of a text are scored at every length L. Windows of L tokens end
every ``stride`` tokens across the targets, and each window scores only its last
``stride`` tokens, so every target is scored exactly once and with at least
``L - stride`` tokens of context (the strided sliding-window convention). Because the
targets never change, numbers compare across lengths and across models.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def perplexity(
    model: Any, tokens: Tensor, length: int, targets: int, stride: int | None = None
) -> dict[str, Any]:
    """Perplexity of ``model`` on the last ``targets`` of ``tokens`` with windows of ``length``.

    ``tokens`` is a 1-D tensor of token ids; ``stride`` defaults to ``length // 2``, capped
    at ``targets``. Returns the record: mean negative log-likelihood in nats, perplexity,
    bits per token, and the convention used.
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D tensor of ids, got shape {tuple(tokens.shape)}")
    stride = min(stride or max(length // 2, 1), targets)
    if not 1 <= stride <= length:
        raise ValueError(f"stride must be within [1, length={length}], got {stride}")
    if targets + 1 > tokens.numel():
        raise ValueError(
            f"{targets} target tokens need at least {targets + 1} tokens, got {tokens.numel()}"
        )
    first, end = tokens.numel() - targets, tokens.numel()
    if first < length - stride:
        raise ValueError(
            f"at length {length} the first target needs {length - stride} tokens of context "
            f"but the text has {first} before it; use a longer text or fewer targets"
        )
    total, counted, scored = 0.0, 0, first
    device = next(model.parameters()).device
    with torch.no_grad():
        for stop in range(first + stride, end + stride, stride):
            stop = min(stop, end)
            new, scored = stop - scored, stop  # the targets this window scores
            start = max(0, stop - length)
            window = tokens[start:stop].to(device)[None]
            logits = model(window).logits[0, :-1].float()
            loss = F.cross_entropy(logits[-new:], window[0, 1:][-new:], reduction="sum")
            total, counted = total + float(loss), counted + new
    nll = total / counted
    return {
        "length": length,
        "stride": stride,
        "target_tokens": counted,
        "nll": nll,
        "perplexity": math.exp(nll),
        "bits_per_token": nll / math.log(2),
        "convention": (
            f"the last {counted} tokens, each scored once with at least {length - stride} "
            "tokens of context (strided sliding windows)"
        ),
    }
