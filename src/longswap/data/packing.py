"""Packing documents into fixed-length sequences, keeping where each document starts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Packed:
    """``input_ids (N, L)`` and ``document_ids (N, L)``: which document each token came from."""

    input_ids: Tensor
    document_ids: Tensor

    def position_ids(self) -> Tensor:
        """Positions that restart at 0 at every document start inside a sequence.

        Feeding these (and no attention mask) keeps attention from crossing documents in
        models and kernels that honour packed positions.
        """
        starts = torch.ones_like(self.document_ids, dtype=torch.bool)
        starts[:, 1:] = self.document_ids[:, 1:] != self.document_ids[:, :-1]
        index = torch.arange(self.input_ids.shape[1]).expand_as(self.input_ids)
        last_start = torch.where(starts, index, 0).cummax(dim=1).values
        return index - last_start


def pack_documents(
    token_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int | None = None
) -> Packed:
    """Concatenate documents (each followed by ``eos_id``) and cut into ``seq_len`` pieces.

    The remainder that does not fill a last sequence is dropped. Raises ValueError when
    the data cannot fill even one sequence.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    ids: list[int] = []
    docs: list[int] = []
    for d, tokens in enumerate(token_lists):
        piece = list(tokens) + ([eos_id] if eos_id is not None else [])
        ids += piece
        docs += [d] * len(piece)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(
            f"the data holds {len(ids)} tokens, too few to fill a single sequence of "
            f"{seq_len}; add data or lower the sequence length"
        )
    keep = n * seq_len
    return Packed(
        torch.tensor(ids[:keep], dtype=torch.long).view(n, seq_len),
        torch.tensor(docs[:keep], dtype=torch.long).view(n, seq_len),
    )
