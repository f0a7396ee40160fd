"""Perplexity against length: known answers, documents, the interval, logits kept."""

import math

import pytest
import torch
import torch.nn.functional as F

import longswap
from longswap.evaluate import perplexity, select_targets

from ..swap.conftest import make_model


def _ids(n, seed):
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed))


def test_uniform_model_has_the_vocabulary_size_as_perplexity():
    model = make_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: the uniform distribution
    docs = [_ids(150, 0), _ids(170, 1)]
    for length in (16, 64):
        record = perplexity(model, docs, length=length, targets=100, spread=2)
        assert record["perplexity"] == pytest.approx(97, rel=1e-4)
        assert record["perplexity_ci"] == pytest.approx([97, 97], rel=1e-4)
        assert record["bits_per_token"] == pytest.approx(math.log2(97), rel=1e-4)
        assert record["target_tokens"] == 100 and record["documents"] == 2


def test_every_length_scores_the_same_targets_once():
    model = make_model("qwen2")
    tokens = _ids(200, 1)
    whole = model(tokens[None]).logits[0, :-1]
    direct = F.cross_entropy(whole[-50:], tokens[1:][-50:]).item()
    # With windows as long as the text, the strided score is the plain one-pass score.
    record = perplexity(model, tokens, length=200, targets=50, stride=50)
    assert record["nll"] == pytest.approx(direct, rel=1e-5)
    assert "at least 150 tokens of its own document" in record["convention"]
    for length, stride in ((20, 7), (64, 32)):
        assert perplexity(model, tokens, length, 50, stride)["target_tokens"] == 50


def test_windows_take_context_only_from_their_own_document():
    model = make_model("llama")
    docs = [_ids(90, 3), _ids(120, 4), _ids(70, 5)]
    # 30 targets over 3 documents: the last 10 of each, each scored with its whole document.
    expected = []
    for doc in docs:
        logits = model(doc[None]).logits[0, :-1]
        expected.append(F.cross_entropy(logits[-10:], doc[1:][-10:], reduction="none"))
    direct = torch.cat(expected).mean().item()
    # Windows of 128 tokens would reach into the previous document if they could.
    record = perplexity(model, docs, length=128, targets=30, stride=10, context=0, spread=3)
    assert record["documents"] == 3 and record["windows"] == 3
    assert record["nll"] == pytest.approx(direct, rel=1e-5)


def test_targets_spread_over_documents_and_stay_put_across_lengths():
    docs = [_ids(n, i) for i, n in enumerate((40, 300, 300, 300, 300, 300))]
    chosen = select_targets(iter(docs), targets=100, context=64, spread=4)
    # The first document is too short for 64 tokens of context; 25 targets from each of 4.
    assert [take for _, take in chosen] == [25, 25, 25, 25]
    assert [doc is docs[i] for i, (doc, _) in enumerate(chosen, 1)] == [True] * 4
    with pytest.raises(ValueError, match="hold only 75 of the 100 targets"):
        select_targets(docs[:4], targets=100, context=64, spread=4)
    model = make_model("llama")
    records = [perplexity(model, docs, n, 100, context=64, spread=4) for n in (16, 128)]
    assert [r["documents"] for r in records] == [4, 4]
    assert records[0]["convention"].startswith("100 tokens at the ends of 4 documents")
    # The same tokens at both lengths: the same chunks, whose sums make the mean loss.
    chunks = [r["chunks"] for r in records]
    assert chunks[0]["counts"] == chunks[1]["counts"] and sum(chunks[0]["counts"]) == 100
    for r in records:
        assert sum(r["chunks"]["sums"]) / 100 == pytest.approx(r["nll"])


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate():
    model = make_model("llama")
    docs = [_ids(400, i) for i in range(4)]
    one = perplexity(model, docs, 64, targets=800, spread=4, chunk=32)
    two = perplexity(model, docs, 64, targets=800, spread=4, chunk=32)
    low, high = one["perplexity_ci"]
    assert low < one["perplexity"] < high
    assert one["perplexity_ci"] == two["perplexity_ci"]
    assert one["nll_ci"] == pytest.approx([math.log(low), math.log(high)])
    other_seed = perplexity(model, docs, 64, targets=800, spread=4, chunk=32, seed=1)
    assert other_seed["perplexity_ci"] != one["perplexity_ci"]
    assert one["seconds"] > 0 and one["peak_memory_mb"] >= 0


class NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward takes only the ids (no ``logits_to_keep``)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        return self.inner(ids)


def test_logits_only_at_scored_positions_with_a_fallback():
    model = make_model("llama")
    rows = []
    model.lm_head.register_forward_hook(lambda m, i, o: rows.append(o.shape[1]))
    tokens = _ids(300, 6)
    record = perplexity(model, tokens, length=128, targets=96, stride=32)
    assert record["logits_kept_only_where_scored"] and record["windows"] == 3
    assert rows == [33, 33, 33]  # the 32 scored positions and the one before them, not 128
    fallback = perplexity(NoLogitsToKeep(model), tokens, length=128, targets=96, stride=32)
    assert not fallback["logits_kept_only_where_scored"]
    assert fallback["nll"] == pytest.approx(record["nll"], rel=1e-5)


def test_swapped_model_and_errors():
    model = make_model("llama")
    longswap.swap_attention(model, "sliding_window(window=8)")
    tokens = _ids(120, 2)
    assert math.isfinite(perplexity(model, tokens, 32, 40)["perplexity"])
    with pytest.raises(ValueError, match="hold only 104 of the 110 targets"):
        perplexity(model, tokens, 32, 110)
    with pytest.raises(ValueError, match="1-D tensors"):
        perplexity(model, [tokens[None]], 32, 10)
    with pytest.raises(ValueError, match="stride must be within"):
        perplexity(model, tokens, 32, 10, stride=33)
