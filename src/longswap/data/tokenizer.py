"""The byte-level tokenizer of the embedded default model: one token per byte, plus EOS.

Built with the ``tokenizers`` library as a byte-level BPE without merges, so it is a normal
``PreTrainedTokenizerFast``: it saves with the model and loads offline with AutoTokenizer.
Token ``b`` is byte ``b``; bits per byte equal bits per token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from longswap.checkpoint import gguf_tokenizer, is_gguf

EOS = "<|endoftext|>"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with ids 0..255 for bytes and 256 for ``<|endoftext|>``."""
    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=EOS)
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    visible = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = visible[:]
    extra = 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(visible, chars, strict=True)}


def tokenizer_for(model_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``model_dir`` (or inside a ``.gguf`` file), or the byte
    tokenizer when there is none."""
    if is_gguf(model_dir):
        return gguf_tokenizer(model_dir)
    if any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        return AutoTokenizer.from_pretrained(model_dir)
    return byte_tokenizer()


def fingerprint(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """A digest of everything that decides a fast tokenizer's ids (its whole definition,
    added tokens included): two tokenizers with one fingerprint tokenise alike. None for
    a slow tokenizer, which has no such definition."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else hashlib.sha256(backend.to_str().encode()).hexdigest()


def token_counter(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], int]:
    """``text -> number of tokens`` (no special tokens), for sizing prompts in tokens."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
