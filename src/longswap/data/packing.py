"""Packing documents into fixed-length sequences, keeping where each document starts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
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
    token_lists: Sequence[Sequence[int] | np.ndarray], seq_len: int, eos_id: int | None = None
) -> Packed:
    """Concatenate documents (each followed by ``eos_id``) and cut into ``seq_len`` pieces.

    The remainder that does not fill a last sequence is dropped. Raises ValueError when
    the data cannot fill even one sequence.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    eos = [] if eos_id is None else [eos_id]
    pieces = [np.concatenate([np.asarray(t, dtype=np.int64).reshape(-1), eos]) for t in token_lists]
    lengths = [len(p) for p in pieces]
    total = sum(lengths)
    n = total // seq_len
    if n == 0:
        raise ValueError(
            f"the data holds {total} tokens, too few to fill a single sequence of "
            f"{seq_len}; add data or lower the sequence length"
        )
    keep = n * seq_len
    ids = np.concatenate(pieces)[:keep]
    docs = np.repeat(np.arange(len(pieces)), lengths)[:keep]
    return Packed(torch.from_numpy(ids).view(n, seq_len), torch.from_numpy(docs).view(n, seq_len))
