"""Paired comparisons on the same tokens and prompts (`longswap.evaluate.paired`)."""

import math

import pytest
import torch

from longswap.demo.verdict import compared
from longswap.evaluate import paired
from longswap.evaluate.perplexity import _interval


def record(losses, chunk=8, arm="m", length=64):
    """A perplexity record of per-document token losses, as ``perplexity`` writes it."""
    chunks = paired.chunk_sums(losses, chunk)
    nll = float(torch.cat(losses).double().mean())
    low, high = _interval(chunks, 0.95, 1000, 0)
    return {
        "model": f"/runs/{arm}",
        "task": "ppl",
        "length": length,
        "perplexity": math.exp(nll),
        "perplexity_ci": [math.exp(low), math.exp(high)],
        "chunks": chunks,
    }


def shared_text(seed=0, docs=6, tokens=40):
    """Token losses that vary a lot from token to token (the text's difficulty)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(tokens, generator=g) * 6 for _ in range(docs)]


def test_chunks_never_straddle_documents_and_sum_to_the_losses():
    losses = [torch.ones(10), torch.full((3,), 2.0)]
    chunks = paired.chunk_sums(losses, 4)
    assert chunks["counts"] == [4, 4, 2, 3] and chunks["documents"] == [0, 0, 0, 1]
    assert chunks["sums"] == [4.0, 4.0, 2.0, 6.0]


def test_the_paired_ratio_decides_what_the_intervals_cannot():
    """A model 3% better on every token: the per-model intervals overlap widely, the paired
    ratio is exactly -3% in log-loss terms with a narrow interval, and seeded."""
    text = shared_text()
    a, b = record([x - 0.03 for x in text]), record(text)
    assert a["perplexity_ci"][1] > b["perplexity_ci"][0]  # the intervals overlap
    d = paired.ratio(a, b)
    assert d.value == pytest.approx(math.expm1(-0.03), rel=1e-5)  # float32 losses
    assert d.low == pytest.approx(d.value, rel=1e-5) and d.high == pytest.approx(d.value, rel=1e-5)
    assert paired.ratio(a, b) == d
    noisy = record(
        [x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) for x in text]
    )
    n = paired.ratio(noisy, b)
    assert n.low < n.value < n.high and n.high - n.low < 0.2


def test_records_of_other_tokens_or_without_chunks_are_refused():
    a, b = record(shared_text()), record(shared_text()[:5])
    with pytest.raises(ValueError, match="not scored on the same tokens"):
        paired.ratio(a, b)
    del b["chunks"]
    with pytest.raises(ValueError, match="per-chunk loss sums"):
        paired.ratio(a, b)


def test_the_recovered_share_comes_with_its_interval():
    text = shared_text()
    reference, swapped = record(text), record([x + 0.2 for x in text])
    tuned_reference = record([x - 0.5 for x in text])
    tuned = record([x - 0.45 for x in text])  # 0.05 of the 0.2 left: 75% recovered
    d = paired.recovered(swapped, reference, tuned, tuned_reference)
    assert d.value == pytest.approx(0.75, rel=1e-4) and d.low == pytest.approx(0.75, rel=1e-4)
    none_lost = paired.recovered(reference, reference, tuned, tuned_reference)
    assert math.isnan(none_lost.value) and math.isnan(none_lost.low)


def test_the_exact_test_counts_discordant_prompts():
    assert paired.exact_test([True] * 10, [False] * 10) == {
        "a_only": 10,
        "b_only": 0,
        "p_value": 2 / 1024,
    }
    assert paired.exact_test([True, False], [True, False])["p_value"] == 1.0
    eight_of_ten = [True] * 8 + [False] * 2
    half = [True] * 5 + [False] * 5
    assert paired.exact_test(eight_of_ten, half)["p_value"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="the same prompts"):
        paired.exact_test([True], [True, False])


def test_the_verdict_compares_paired_when_the_records_allow_it():
    """`compared` decides "arm a within x1.05 of arm b" from the paired ratio where the
    intervals overlap, and falls back to the intervals for records without chunks."""
    text = shared_text()
    records = [record([x + 0.03 for x in text], arm="a"), record(text, arm="b")]
    holds, evidence = compared(records, ("a", 64), ("b", 64), 1.05, True)
    assert holds is True and "paired: x1.030" in evidence
    holds, _ = compared(records, ("a", 64), ("b", 64), 1.01, True)
    assert holds is False
    for r in records:
        del r["chunks"]
    assert compared(records, ("a", 64), ("b", 64), 1.05, True) == (None, "")


def passkey_records(arm, found, length=1024):
    """Passkey records of one arm: prompt i (key 10000 + i, two per depth) found or not."""
    records = []
    for d in range(0, len(found), 2):
        answers = [
            {"key": 10000 + i, "answered": 10000 + i if found[i] else None} for i in (d, d + 1)
        ]
        records.append(
            {
                "model": f"/runs/{arm}",
                "task": "passkey",
                "length": length,
                "depth": d / len(found),
                "accuracy": sum(found[d : d + 2]) / 2,
                "answers": answers,
            }
        )
    return records


@pytest.mark.parametrize(
    ("arm3", "arm1", "holds"),
    [
        ([True] * 10, [True] * 5 + [False] * 5, True),
        ([False] * 10, [True] * 10, False),  # arm 1 alone on 10 prompts: p = 0.002
        ([True] * 4 + [False] * 6, [True] * 6 + [False] * 4, None),  # fewer, not significant
    ],
)
def test_the_passkey_row_compares_the_same_prompts_exactly(arm3, arm1, holds):
    from longswap.demo.verdict import ARMS, _passkey_vs_dense_row

    records = passkey_records(ARMS[2], arm3) + passkey_records(ARMS[0], arm1)
    _, measured, outcome = _passkey_vs_dense_row(records, 1024)
    assert outcome is holds and "on the same 10 prompts" in measured
