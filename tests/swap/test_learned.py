"""Learned selection in a model: selectors added by the swap, saved, reloaded, removed."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import longswap
from longswap.selectors import SELECTOR_ATTR, SELECTOR_FILE, BlockGate

from .conftest import assert_generate_equals_recomputation, make_model

PATTERN = "learned_topk(block_size=8, top_k=2)"
#: The typical use: a window, its sinks, and learned blocks beyond the window.
UNION = "sliding_window(window=12, sinks=2) | learned_topk(block_size=4, top_k=2)"
#: The same, each query head selecting its own blocks.
PER_HEAD = UNION.replace("top_k=2)", "top_k=2, per_head=True)")
#: Blocks scored from pieces of two keys (log-sum-exp of the pieces' scores).
PIECES = UNION.replace("top_k=2)", "top_k=2, sub_block=2)")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def gates_of(model):
    return [m for m in model.modules() if isinstance(m, BlockGate)]


def perturb_selectors(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if SELECTOR_ATTR in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def test_swap_adds_one_gate_per_layer_and_restore_removes_them(tokens):
    model = make_model("llama")
    before = logits(model, tokens)
    report = longswap.swap_attention(model, PATTERN)
    gates = [m.longswap_selector for m in (layer.self_attn for layer in model.model.layers)]
    assert all(isinstance(g, BlockGate) for g in gates) and len(gates) == 2
    per_gate = 2 * 8 * 8 + 3 * 8 * 8  # group 2, head dim 8
    assert report.added_parameters == 2 * per_gate
    assert sum(p.numel() for p in model.parameters()) == report.reused_parameters + 2 * per_gate
    assert not torch.allclose(logits(model, tokens), before)
    longswap.restore(model)
    assert not any(SELECTOR_ATTR in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, tokens), before)


@pytest.mark.parametrize("pattern", [PATTERN, UNION, PER_HEAD, PIECES])
def test_save_and_load_round_trip_trained_selectors(tmp_path, tokens, pattern):
    model = make_model("qwen3")
    longswap.swap_attention(model, pattern)
    perturb_selectors(model)
    expected = logits(model, tokens)
    longswap.save(model, tmp_path / "m")
    assert (tmp_path / "m" / SELECTOR_FILE).is_file()
    loaded = longswap.load(tmp_path / "m").eval()
    torch.testing.assert_close(logits(loaded, tokens), expected, atol=1e-6, rtol=1e-6)
    longswap.swap_attention(loaded, pattern)  # a re-swap keeps the trained gates
    torch.testing.assert_close(logits(loaded, tokens), expected, atol=1e-6, rtol=1e-6)
    trained = gates_of(loaded)
    other = PIECES.replace("sub_block=2", "sub_block=1") if pattern == PIECES else PIECES
    longswap.swap_attention(loaded, other)  # other pieces score otherwise: fresh gates
    assert all(g.sub_block == (1 if pattern == PIECES else 2) for g in gates_of(loaded))
    assert not {id(g) for g in gates_of(loaded)} & {id(g) for g in trained}
    longswap.restore(loaded)
    loaded = longswap.load(tmp_path / "m").eval()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="load checkpoints with learned selection through"):
        plain(tokens)
    selectors = load_file(tmp_path / "m" / SELECTOR_FILE)  # as an earlier gate saved them
    old = {k.replace(".query_map", ".query_map.weight"): v for k, v in selectors.items()}
    save_file(old, tmp_path / "m" / SELECTOR_FILE)
    with pytest.raises(ValueError, match="selectors of an earlier longswap"):
        longswap.load(tmp_path / "m")
    (tmp_path / "m" / SELECTOR_FILE).unlink()
    with pytest.raises(ValueError, match="holds no weights for 4 selector tensors"):
        longswap.load(tmp_path / "m")


@pytest.mark.parametrize(
    ("family", "pattern"),
    [
        ("llama", PATTERN),
        ("gpt2", PATTERN),
        ("llama", UNION),
        ("llama", PER_HEAD),
        ("llama", PIECES),
    ],
)
def test_generate_with_cache_equals_recomputation(family, pattern):
    model = make_model(family)
    longswap.swap_attention(model, pattern, backend="blocks")
    perturb_selectors(model, seed=1)
    prompt = torch.randint(1, 97, (1, 20), generator=torch.Generator().manual_seed(5))
    assert_generate_equals_recomputation(model, prompt, 25)


@pytest.mark.parametrize("pattern", [PATTERN, UNION, PER_HEAD, PIECES])
def test_backends_agree_inside_a_model(tokens, pattern):
    model = make_model("llama")
    longswap.swap_attention(model, pattern, backend="blocks")
    perturb_selectors(model, seed=2)
    fast = logits(model, tokens)
    longswap.swap_attention(model, pattern, backend="reference")  # the gates are kept
    torch.testing.assert_close(fast, logits(model, tokens), atol=1e-5, rtol=1e-5)
