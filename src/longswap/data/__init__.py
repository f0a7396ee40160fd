"""Data: local corpora, the embedded default corpus, packing, and synthetic long-context tasks."""

from longswap.data.corpus import Document, local_documents, split_documents, stdlib_documents
from longswap.data.packing import Packed, pack_documents
from longswap.data.synthetic import (
    associative_recall,
    first_integer,
    heldout_key,
    passkey_prompt,
    synthetic_texts,
)
from longswap.data.tokenizer import byte_tokenizer

__all__ = [
    "Document",
    "Packed",
    "associative_recall",
    "byte_tokenizer",
    "first_integer",
    "heldout_key",
    "local_documents",
    "pack_documents",
    "passkey_prompt",
    "split_documents",
    "stdlib_documents",
    "synthetic_texts",
]
