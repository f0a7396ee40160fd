"""The training and validation sets of a run: local or embedded documents, packed."""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from longswap.data import (
    local_documents,
    pack_documents,
    split_documents,
    stdlib_documents,
    synthetic_texts,
)
from longswap.data.corpus import Document
from longswap.data.packing import Packed
from longswap.data.tokenizer import EOS, fingerprint, token_counter
from longswap.train.config import TrainingFields

#: Token ids of the embedded corpus per tokenizer and corpus text: tokenising its 12 MB
#: takes seconds at every run (each of the demo's arms), reading them back a fraction.
TOKEN_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "longswap/tokens"


class PackedDataset(Dataset):
    """Fixed-length token sequences for causal language modelling.

    With ``position_ids`` (restarting at each document), attention stays inside documents.
    """

    def __init__(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> None:
        self.input_ids, self.position_ids = input_ids, position_ids

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def with_positions(self) -> PackedDataset:
        """The same sequences, each item with its ``position_ids`` (counting from 0 where
        documents are not separated): what sequence parallelism needs in every batch."""
        if self.position_ids is not None:
            return self
        count, length = self.input_ids.shape
        return PackedDataset(self.input_ids, torch.arange(length).expand(count, length))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        item = {"input_ids": ids, "labels": ids}
        if self.position_ids is not None:
            item["position_ids"] = self.position_ids[i]
        return item


def _token_arrays(
    docs: list[Document], tokenizer: PreTrainedTokenizerBase, cached: bool = False
) -> list[Any]:
    """The token ids of each document; ``cached``: kept in :data:`TOKEN_CACHE` for the next
    run with the same tokenizer and documents (the embedded corpus: every run reads it)."""
    if len(tokenizer) == 257 and tokenizer.eos_token == EOS:  # the byte tokenizer
        return [np.frombuffer(d.text.encode("utf-8"), dtype=np.uint8) for d in docs]
    known = fingerprint(tokenizer) if cached else None  # fast tokenizers only
    if known is None:
        return tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    key = hashlib.sha256(known.encode())
    for doc in docs:
        key.update(f"{doc.name}\0{len(doc.text)}\0{doc.text}\0".encode())
    file = TOKEN_CACHE / f"{key.hexdigest()[:40]}.npz"
    try:
        with np.load(file) as stored:
            return np.split(stored["ids"], stored["ends"][:-1])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # absent or damaged
        pass
    arrays = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    ends = np.cumsum([len(ids) for ids in arrays])
    try:  # a cache that cannot be written costs time, nothing else
        TOKEN_CACHE.mkdir(parents=True, exist_ok=True)
        partial = file.with_name(f"{file.stem}.{os.getpid()}.partial.npz")
        ids = np.concatenate([np.asarray(a, dtype=np.int32) for a in arrays])
        np.savez(partial, ids=ids, ends=ends)
        os.replace(partial, file)  # whole or not at all, also with several processes
    except OSError:
        pass
    return arrays


def datasets(
    config: TrainingFields, tokenizer: PreTrainedTokenizerBase
) -> tuple[PackedDataset, PackedDataset]:
    """Packed train and validation sets (validation capped at 64 sequences, 65,536 tokens).

    Documents are split by name (``validation_share``). When either side cannot fill one
    sequence (one file, or a few long ones), the last whole sequences of all the data are
    held out instead, with a warning that says so.
    """
    docs = (
        local_documents(config.data, config.text_field)
        if config.data
        else stdlib_documents("train")
    )
    train_docs, val_docs = split_documents(docs, config.validation_share)
    cached = not config.data  # the embedded corpus
    train_part = _pack(train_docs, config, tokenizer, cached)
    val_part = _pack(val_docs, config, tokenizer, cached)
    if train_part is None or val_part is None:
        train_part, val_part = _split_sequences(docs, config, tokenizer)
    # Enough to compare, cheap at any length (unless the run says how many).
    val_cap = config.validation_sequences or max(1, min(64, 2**16 // config.seq_len))
    sets = []
    for packed, cap in ((train_part, None), (val_part, val_cap)):
        positions = packed.position_ids()[:cap] if config.separate_documents else None
        sets.append(PackedDataset(packed.input_ids[:cap], positions))
    if config.synthetic_ratio:
        sets[0] = _with_synthetic(sets[0], config, tokenizer)
    return sets[0], sets[1]


def _pack(
    docs: list[Document],
    config: TrainingFields,
    tokenizer: PreTrainedTokenizerBase,
    cached: bool = False,
) -> Packed | None:
    """``docs`` packed into sequences of ``seq_len``, or None when they cannot fill one
    (``cached``: their token ids kept for the next run)."""
    if not docs:
        return None
    try:
        return pack_documents(
            _token_arrays(docs, tokenizer, cached), config.seq_len, tokenizer.eos_token_id
        )
    except ValueError:
        return None


def _split_sequences(
    docs: list[Document], config: TrainingFields, tokenizer: PreTrainedTokenizerBase
) -> tuple[Packed, Packed]:
    """All documents packed; the last ``validation_share`` of the sequences (at least one)
    held out for validation."""
    packed = pack_documents(_token_arrays(docs, tokenizer), config.seq_len, tokenizer.eos_token_id)
    n = packed.input_ids.shape[0]
    if n < 2:
        raise ValueError(
            f"the data fills only {n} sequence of {config.seq_len} tokens; training and "
            "validation need one each: add data or lower --seq-len"
        )
    held = min(n - 1, max(1, round(n * config.validation_share)))
    warnings.warn(
        f"the held-out documents cannot fill one sequence of {config.seq_len} tokens (or "
        f"the rest cannot): validation uses the last {held} of the {n} packed sequences "
        "instead (whole sequences, never seen in training)",
        stacklevel=3,
    )
    return (
        Packed(packed.input_ids[:-held], packed.document_ids[:-held]),
        Packed(packed.input_ids[-held:], packed.document_ids[-held:]),
    )


def _with_synthetic(
    train_set: PackedDataset, config: TrainingFields, tokenizer: PreTrainedTokenizerBase
) -> PackedDataset:
    """Mix synthetic task sequences into ``train_set`` at ``config.synthetic_ratio``."""
    real = len(train_set)
    n = max(1, round(config.synthetic_ratio / (1 - config.synthetic_ratio) * real))

    texts = synthetic_texts(n, config.seq_len - 1, config.seed, token_counter(tokenizer))
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    pad = tokenizer.eos_token_id
    # One task per sequence; a task longer than the sequence keeps its end (the answer).
    rows = [row[-config.seq_len :] + [pad] * (config.seq_len - len(row)) for row in ids]
    synthetic = torch.tensor(rows, dtype=torch.long)
    positions = train_set.position_ids
    if positions is not None:
        fresh = torch.arange(config.seq_len).expand(len(rows), -1)
        positions = torch.cat([positions, fresh])
    return PackedDataset(torch.cat([train_set.input_ids, synthetic]), positions)
