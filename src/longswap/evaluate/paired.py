"""Paired comparisons of models scored on the same tokens, and of retrieval on the same prompts.

Two perplexity records of the same held-out tokens (the same ``chunks``: see
:func:`chunk_sums`) differ far less in their mean log-loss than either one's own interval
says: most of each token's loss is the text's, shared by both models. So a comparison is
decided from the paired difference: the chunks (consecutive targets of one document) are
resampled with replacement, the same draws for both records, and the difference of the two
mean losses is computed on each draw (a seeded percentile bootstrap). With chunks of one
document resampled together, a document's correlated tokens stay together.

Retrieval (passkey, needles) on identical prompts is compared by the exact test of the
discordant pairs (McNemar's, exact binomial): the prompts one model solves and the other
does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

#: Resamples and seed of every paired interval (the same draws for every comparison of a run).
RESAMPLES, SEED = 2000, 0


class Difference(NamedTuple):
    """A paired estimate with its interval: ``value`` and ``[low, high]``."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:+.2%} [{self.low:+.2%}, {self.high:+.2%}]"


def chunk_sums(losses: Sequence[Tensor], chunk: int) -> dict[str, Any]:
    """Per-chunk loss sums of the per-document token losses ``losses``: each document's
    targets cut into chunks of ``chunk`` consecutive tokens (the last one shorter), never
    straddling two documents. The record any paired comparison is computed from."""
    sums, counts, documents = [], [], []
    for index, doc in enumerate(losses):
        for piece in doc.double().split(chunk):
            sums.append(float(piece.sum()))
            counts.append(piece.numel())
            documents.append(index)
    return {"size": chunk, "sums": sums, "counts": counts, "documents": documents}


def _checked(records: Sequence[dict[str, Any]]) -> tuple[Tensor, Tensor]:
    """``(sums (R, C), counts (C,))`` of records scored on the same chunks; ValueError else."""
    missing = [i for i, r in enumerate(records) if "chunks" not in r]
    if missing:
        raise ValueError(
            "a paired comparison needs each record's per-chunk loss sums ('chunks'); records "
            f"{missing} have none (written before they were kept): evaluate again"
        )
    first = records[0]["chunks"]
    for r in records[1:]:
        other = r["chunks"]
        if other["counts"] != first["counts"] or other["documents"] != first["documents"]:
            raise ValueError(
                "these records were not scored on the same tokens (their chunks differ): "
                "evaluate every model with the same documents, targets and context"
            )
    sums = torch.tensor([r["chunks"]["sums"] for r in records], dtype=torch.float64)
    return sums, torch.tensor(first["counts"], dtype=torch.float64)


def _draws(chunks: int, resamples: int, seed: int) -> Tensor:
    """``(resamples, chunks)`` chunk indices drawn with replacement, seeded."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, chunks, (resamples, chunks), generator=generator)


def _estimate(point: float, draws: Tensor, confidence: float) -> Difference:
    """``point`` with the percentile interval of the draws that have a value (NaN: none)."""
    kept = draws[~draws.isnan()]
    if kept.numel() == 0:
        return Difference(point, math.nan, math.nan)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(kept, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return Difference(point, float(low), float(high))


def ratio(
    a: dict[str, Any],
    b: dict[str, Any],
    confidence: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Difference:
    """``perplexity(a) / perplexity(b) - 1`` on the same tokens, with its paired interval
    (negative: ``a`` is better)."""
    sums, counts = _checked([a, b])
    draws = _draws(counts.numel(), resamples, seed)
    gap = (sums[0] - sums[1])[draws].sum(1) / counts[draws].sum(1)
    point = float((sums[0] - sums[1]).sum() / counts.sum())
    return _estimate(math.expm1(point), torch.expm1(gap), confidence)


def recovered(
    swapped: dict[str, Any],
    reference: dict[str, Any],
    tuned: dict[str, Any],
    tuned_reference: dict[str, Any],
    confidence: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Difference:
    """The share of the swap's loss that fine-tuning recovered, ``1 - gap after / gap
    before`` (gaps in mean log-loss: ``swapped - reference`` before, ``tuned -
    tuned_reference`` after), all four on the same tokens, its interval from the same
    resamples. A draw whose gap before is not positive has no share (left out)."""
    sums, counts = _checked([swapped, reference, tuned, tuned_reference])
    draws = _draws(counts.numel(), resamples, seed)
    before, after = sums[0] - sums[1], sums[2] - sums[3]
    drawn = 1 - after[draws].sum(1) / before[draws].sum(1)
    drawn[before[draws].sum(1) <= 0] = math.nan
    point = 1 - float(after.sum() / before.sum()) if float(before.sum()) > 0 else math.nan
    return _estimate(point, drawn, confidence)


def exact_test(a_hits: Sequence[bool], b_hits: Sequence[bool]) -> dict[str, Any]:
    """McNemar's exact test on identical prompts: ``a_hits[i]`` and ``b_hits[i]`` say
    whether each model solved prompt ``i``. Returns the discordant counts (``a_only``,
    ``b_only``) and the two-sided p-value of "both solve as often" (1 when none differ)."""
    if len(a_hits) != len(b_hits):
        raise ValueError(
            f"an exact paired test needs the same prompts for both: {len(a_hits)} results "
            f"against {len(b_hits)}"
        )
    a_only = sum(1 for x, y in zip(a_hits, b_hits, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a_hits, b_hits, strict=True) if y and not x)
    n, k = a_only + b_only, min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, 2 * tail)}
