"""Packed sequences: every document is attended as a sequence of its own.

A packed row holds several documents one after another, marked by ``document_ids (B, Lk)``
(models mark them by positions that restart, as TRL's padding-free collator and longswap's
own ``--separate-documents`` send them). The pattern is laid over each document from its own
first token: sinks, windows, global tokens, block boundaries and block selections count
from there, exactly as when the document runs alone. So each document is one attention
call of its own, and a packed row's outputs and gradients are those of its documents run
one by one. A document is a run of equal consecutive ids: an id that comes back after
another starts a new document.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Span:
    """One document of a packed call: row ``row``, keys ``start`` to ``end`` (exclusive) of
    that row, and the queries from index ``first_query`` of the call (queries sit at the end
    of the keys, so a document's queries are the last of its keys)."""

    row: int
    start: int
    end: int
    first_query: int


#: ``attend(span, q, k, v, key_padding_mask)`` for one document, returning ``(1, Hq, Lq, D)``.
Attend = Callable[[Span, Tensor, Tensor, Tensor, "Tensor | None"], Tensor]


def is_packed(document_ids: Tensor | None) -> bool:
    """Whether some row of ``document_ids (B, Lk)`` holds more than one document."""
    return document_ids is not None and bool((document_ids[:, 1:] != document_ids[:, :-1]).any())


def document_spans(document_ids: Tensor, q_len: int) -> list[Span]:
    """The documents of each row of ``document_ids (B, Lk)`` that hold some of the last
    ``q_len`` positions (the queries), row by row, in order."""
    batch, kv_len = document_ids.shape
    offset = kv_len - q_len
    changes = (document_ids[:, 1:] != document_ids[:, :-1]).cpu()
    spans = []
    for row in range(batch):
        cuts = [0, *(torch.nonzero(changes[row]).flatten() + 1).tolist(), kv_len]
        for start, end in zip(cuts[:-1], cuts[1:], strict=True):
            if end > offset:
                spans.append(Span(row, start, end, max(start, offset) - offset))
    return spans


def per_document(
    attend: Attend,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    document_ids: Tensor,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """``attend`` on each document of q ``(B, Hq, Lq, D)`` over k, v ``(B, Hkv, Lk, D)``
    alone, its outputs put back in place: ``(B, Hq, Lq, D)``."""
    offset = k.shape[2] - q.shape[2]
    rows: list[list[Tensor]] = [[] for _ in range(q.shape[0])]
    for span in document_spans(document_ids, q.shape[2]):
        b, keys = span.row, slice(span.start, span.end)
        padding = None if key_padding_mask is None else key_padding_mask[b : b + 1, keys]
        queries = q[b : b + 1, :, span.first_query : span.end - offset]
        rows[b].append(attend(span, queries, k[b : b + 1, :, keys], v[b : b + 1, :, keys], padding))
    return torch.cat([torch.cat(parts, 2) for parts in rows], 0)
