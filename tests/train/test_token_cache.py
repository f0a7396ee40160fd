"""The embedded corpus's token ids are kept between runs, per tokenizer and text."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from longswap.data.corpus import Document
from longswap.train import data


def word_tokenizer(words):
    """A fast tokenizer with one id per word of ``words`` (and ``<eos>``, ``<unk>``)."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "TOKEN_CACHE", tmp_path / "tokens")
    return tmp_path / "tokens"


def test_a_second_run_reads_the_ids_back_without_tokenising(cache, monkeypatch):
    tokenizer = word_tokenizer(["a", "b", "c"])
    docs = [Document("x", "a b c a"), Document("y", "c c"), Document("z", "b d")]
    first = data._token_arrays(docs, tokenizer, cached=True)
    assert [list(ids) for ids in first] == [[2, 3, 4, 2], [4, 4], [3, 0]]
    assert len(list(cache.glob("*.npz"))) == 1 and not list(cache.glob("*.partial*"))

    def refuse(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(type(tokenizer), "__call__", refuse)
    again = data._token_arrays(docs, tokenizer, cached=True)
    assert [list(ids) for ids in again] == [list(ids) for ids in first]
    with pytest.raises(AssertionError, match="tokenised again"):  # other text: no entry
        data._token_arrays([Document("x", "a b")], tokenizer, cached=True)


def test_another_tokenizer_or_a_damaged_entry_tokenises_again(cache):
    docs = [Document("x", "a b c")]
    assert [list(i) for i in data._token_arrays(docs, word_tokenizer(["a", "b", "c"]), True)] == [
        [2, 3, 4]
    ]
    other = data._token_arrays(docs, word_tokenizer(["c", "b", "a"]), cached=True)
    assert [list(ids) for ids in other] == [[4, 3, 2]]
    assert len(list(cache.glob("*.npz"))) == 2
    for entry, damage in zip(sorted(cache.glob("*.npz")), ("garbage", "cut"), strict=True):
        entry.write_bytes(b"not a numpy file" if damage == "garbage" else entry.read_bytes()[:60])
    again = data._token_arrays(docs, word_tokenizer(["c", "b", "a"]), cached=True)
    assert [list(ids) for ids in again] == [[4, 3, 2]]
    readable = []
    for entry in cache.glob("*.npz"):
        try:
            readable.append(np.load(entry)["ids"].tolist())
        except Exception:  # noqa: BLE001 (the first tokenizer's entry, still damaged)
            continue
    assert readable == [[4, 3, 2]]  # written again, whole


def test_uncached_calls_write_nothing(cache):
    data._token_arrays([Document("x", "a b")], word_tokenizer(["a", "b"]))
    assert not cache.exists()
