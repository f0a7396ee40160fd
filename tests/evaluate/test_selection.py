"""The selection task: the dense attention mass a block selection keeps, against an oracle."""

import pytest
import torch

import longswap
from longswap.evaluate.selection import selection
from tests.swap.conftest import make_model

TOKENS = torch.randint(1, 97, (64,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "pattern",
    [
        "block_topk(block_size=8, top_k=2)",
        "learned_topk(8, 2)",
        "sliding_window(window=16, sinks=2) | learned_topk(8, 2)",
    ],
)
def test_selection_keeps_at_most_the_oracle_and_more_with_more_blocks(pattern):
    model = make_model("llama")
    longswap.swap_attention(model, pattern)
    record = selection(model, TOKENS, 64)
    assert [r["layer"] for r in record["layers"]] == [0, 1]
    for r in record["layers"]:
        assert 0 < r["captured"] <= r["oracle"] + 1e-6 <= 1 + 1e-6
    wider = pattern.replace("top_k=2", "top_k=7").replace("(8, 2)", "(8, 7)")
    longswap.swap_attention(model, wider)  # every earlier block: dense attention exactly
    everything = selection(model, TOKENS, 64)
    assert everything["captured_mass"] == pytest.approx(1.0, abs=1e-5)
    assert everything["captured_mass"] > record["captured_mass"]


def test_selection_needs_a_selecting_pattern_and_enough_text():
    model = make_model("llama")
    longswap.swap_attention(model, "sliding_window(window=8)")
    with pytest.raises(ValueError, match="no layer of this model selects key blocks"):
        selection(model, TOKENS, 64)
    with pytest.raises(ValueError, match="needs that much text"):
        selection(model, TOKENS, 65)
