"""Perplexity against context length, on held-out documents, with a bootstrap interval.

Which tokens are scored (the targets): the last tokens of each document, at most
``ceil(targets / spread)`` per document, taken from the documents in order until
``targets`` are found, so that they spread over at least ``spread`` documents. Every
target has at least ``context`` tokens of its own document before it; a document too short
for that is passed over. The targets depend on ``context`` but not on ``length``: pass the
same ``context`` at every length and the same tokens are scored at every length, so the
numbers compare across lengths and across models.

How they are scored (the strided sliding-window convention): within a document, windows of
at most ``length`` tokens end every ``stride`` tokens across its targets, and each window
scores only its last ``stride`` tokens (or fewer), so every target is scored exactly once,
with at least ``min(context, length - stride)`` tokens of context, all from its own document.
Only the logits of scored positions are computed (``logits_to_keep``), so a long window with
a large vocabulary never materialises ``length x vocabulary`` logits.

The 95% interval resamples chunks of ``chunk`` consecutive targets (never straddling two
documents) with replacement, seeded: the same inputs give the same interval. The record
keeps each chunk's loss sum, so that two models scored on the same targets can be compared
by their paired difference (``longswap.evaluate.paired``), far tighter than their
intervals.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from longswap.environment import peak_memory
from longswap.evaluate.paired import chunk_sums


def select_targets(
    documents: Iterable[Tensor], targets: int, context: int, spread: int = 8
) -> list[tuple[Tensor, int]]:
    """``(document, number of targets at its end)`` pairs holding ``targets`` in all.

    ``documents`` (1-D tensors of token ids) are consumed lazily, only as far as needed.
    Raises ValueError, with the count found, when they hold too few targets.
    """
    if targets < 1 or spread < 1 or context < 0:
        raise ValueError(
            f"need targets >= 1, spread >= 1 and context >= 0; got {targets}, {spread}, {context}"
        )
    share, chosen, found = math.ceil(targets / spread), [], 0
    for doc in documents:
        if doc.dim() != 1:
            raise ValueError(f"documents must be 1-D tensors of ids, got shape {tuple(doc.shape)}")
        first = max(context, 1)  # the first token of a document has nothing to predict it
        take = min(share, doc.numel() - first, targets - found)
        if take > 0:
            chosen.append((doc, take))
            found += take
        if found == targets:
            return chosen
    raise ValueError(
        f"the documents hold only {found} of the {targets} targets asked for (at most {share} "
        f"per document, each with {context} tokens of context before it); give more or longer "
        "documents, fewer targets, or a shorter context"
    )


def _window_losses(model: Any, window: Tensor, new: int, state: dict[str, bool]) -> Tensor:
    """Per-token NLL of the last ``new`` tokens of ``window`` (1, W); logits only where scored."""
    if state["keep"]:
        try:
            logits = model(window, logits_to_keep=new + 1).logits
        except TypeError:  # a model without ``logits_to_keep``: full logits, then sliced
            state["keep"] = False
    if not state["keep"]:
        logits = model(window).logits
    logits = logits[0, -(new + 1) : -1].float()  # (new, V): position i predicts token i + 1
    return F.cross_entropy(logits, window[0, -new:], reduction="none")


def _interval(
    chunks: dict[str, Any], confidence: float, resamples: int, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean NLL over the chunks of consecutive targets
    (:func:`longswap.evaluate.paired.chunk_sums`)."""
    sums = torch.tensor(chunks["sums"], dtype=torch.float64)
    counts = torch.tensor(chunks["counts"], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, len(sums), (resamples, len(sums)), generator=generator)
    means = sums[draws].sum(1) / counts[draws].sum(1)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(low), float(high)


def perplexity(
    model: Any,
    documents: Tensor | Sequence[Tensor],
    length: int,
    targets: int = 16384,
    stride: int | None = None,
    context: int | None = None,
    spread: int = 8,
    chunk: int = 128,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``targets`` held-out tokens with windows of ``length``.

    Call it with token documents (1-D id tensors; one tensor is one document)::

        docs = [torch.tensor(tok(t, add_special_tokens=False, verbose=False)["input_ids"])
                for t in texts]
        for n in (4096, 8192, 32768):
            r = perplexity(model, docs, n, targets=16384, context=32768 // 2)
            print(n, r["perplexity"], r["perplexity_ci"], r["seconds"], r["peak_memory_mb"])

    ``stride`` defaults to ``length // 2``; ``context`` (tokens of its own document before
    every target) defaults to ``length - stride``; pass the longest length's value at every
    length to score the same targets everywhere. ``spread``: the targets come from at least
    this many documents (from all of them when fewer are given).

    Returns the record: ``nll`` (mean, nats), ``perplexity``,
    ``perplexity_ci`` and ``nll_ci`` (``confidence`` bootstrap intervals), ``bits_per_token``,
    ``target_tokens``, ``documents``, ``windows``, ``seconds`` and ``peak_memory_mb`` of the
    forwards (device memory on CUDA, resident-set growth on CPU), the convention in words, and
    ``chunks``: the loss sums of the chunks the interval resamples, from which two records of
    the same tokens are compared pairwise (``longswap.evaluate.paired``).
    """
    docs = [documents] if isinstance(documents, Tensor) else list(documents)
    stride = stride or max(length // 2, 1)
    if not 1 <= stride <= length:
        raise ValueError(f"stride must be within [1, length={length}], got {stride}")
    context = length - stride if context is None else context
    chosen = select_targets(docs, targets, context, min(spread, len(docs)))
    device = next(model.parameters()).device
    losses, windows, state = [], 0, {"keep": True}
    start_time = time.perf_counter()
    with peak_memory(device) as memory, torch.no_grad():
        for doc, count in chosen:
            end = doc.numel()
            scored, parts = end - count, []
            while scored < end:
                stop = min(scored + stride, end)
                window = doc[max(0, stop - length) : stop].to(device)[None]  # (1, W)
                parts.append(_window_losses(model, window, stop - scored, state).cpu())
                scored, windows = stop, windows + 1
            losses.append(torch.cat(parts))
    seconds = time.perf_counter() - start_time
    nll = float(torch.cat(losses).double().mean())
    chunks = chunk_sums(losses, chunk)
    low, high = _interval(chunks, confidence, resamples, seed)
    least = min(context, length - stride)
    return {
        "length": length,
        "stride": stride,
        "context": context,
        "target_tokens": targets,
        "documents": len(chosen),
        "windows": windows,
        "nll": nll,
        "nll_ci": [low, high],
        "perplexity": math.exp(nll),
        "perplexity_ci": [math.exp(low), math.exp(high)],
        "confidence": confidence,
        "bits_per_token": nll / math.log(2),
        "seconds": seconds,
        "peak_memory_mb": memory["peak_memory_mb"],
        "logits_kept_only_where_scored": state["keep"],
        "convention": (
            f"{targets} tokens at the ends of {len(chosen)} documents, each scored once with at "
            f"least {least} tokens of its own document as context (strided sliding windows); "
            f"{confidence:.0%} interval: bootstrap over chunks of {chunk} targets"
        ),
        "chunks": chunks,
    }
