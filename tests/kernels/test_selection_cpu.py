"""The C++ block-selection kernels of ``blocks`` (float32 and bfloat16 on CPU): the static
part through the window kernel (its own-block argument), the selected blocks grouped by key
block, and the compiled top-k."""

import pytest
import torch

from longswap.kernels import blocks, selection_cpu, window_cpu
from longswap.kernels.reference import reference_attention
from longswap.patterns import parse_pattern
from tests.kernels.test_band import inputs


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls ``blocks`` makes to the selection kernels."""
    calls = []

    def counted(*args):
        calls.append(args[3])
        return selection_cpu.selection_attention(*args)

    monkeypatch.setattr(blocks, "selection_attention", counted)
    return calls


def _scores(pattern, q, k, seed=1):
    """Block scores for a learned selection (its selector's place), None otherwise."""
    if not getattr(pattern, "needs_selector", False):
        return None
    heads = q.shape[1] if pattern.per_head else k.shape[1]
    n = pattern.num_candidate_blocks(k.shape[2])
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q.shape[0], heads, q.shape[2], n, generator=g)


def _outputs_and_grads(fn, q, k, v, w):
    out = fn(q, k, v)
    return (out.detach(), *torch.autograd.grad((out * w).sum(), (q, k, v)))


@pytest.mark.parametrize(
    ("batch", "heads", "q_len", "kv_len", "pattern"),
    [
        (2, (4, 2), 1000, 1000, "block_topk(block_size=64, top_k=4)"),
        (1, (4, 1), 300, 700, "block_topk(block_size=32, top_k=3)"),  # cached keys first
        (2, (2, 2), 129, 129, "block_topk(block_size=16, top_k=2)"),  # short last block
        (2, (4, 2), 777, 777, "sliding_window(window=128, sinks=4) | block_topk(32, 3)"),
        (1, (6, 2), 500, 900, "sliding_window(window=100, sinks=40) | block_topk(32, 5)"),
        (1, (4, 2), 600, 600, "sliding_window(window=1, sinks=0) | block_topk(16, 40)"),
        (1, (4, 2), 600, 600, "sliding_window(64, sinks=4) | learned_topk(16, 4, per_head=True)"),
        (1, (4, 2), 600, 611, "sliding_window(64, sinks=4) | learned_topk(16, 4)"),
        (2, (2, 2), 333, 333, "learned_topk(block_size=16, top_k=4)"),
        (1, (2, 1), 400, 400, "sliding_window(window=600, sinks=4) | block_topk(32, 3)"),
    ],
    ids=str,
)
def test_kernel_equals_reference(batch, heads, q_len, kv_len, pattern, kernel_calls):
    """Outputs and gradients of q, k and v equal the dense oracle's, per head and per group,
    with GQA, sinks inside and beyond blocks, cached keys and lengths off the block grid."""
    pattern = parse_pattern(pattern)
    q, k, v = inputs(batch, *heads, q_len, kv_len, dim=16)
    scores = _scores(pattern, q, k)
    scale = q.shape[-1] ** -0.5
    w = torch.randn(batch, heads[0], q_len, 16)
    ref = _outputs_and_grads(
        lambda *x: reference_attention(*x, pattern, scale, block_scores=scores), q, k, v, w
    )
    got = _outputs_and_grads(
        lambda *x: blocks.blocks_attention(*x, pattern, scale, block_scores=scores), q, k, v, w
    )
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert kernel_calls == ([] if pattern.covers(kv_len) else [pattern])


def relative_error(a, b):
    """``|a - b| / |b|`` over the whole tensor, in float32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize(
    ("heads", "q_len", "kv_len", "pattern"),
    [
        ((4, 2), 1000, 1000, "block_topk(block_size=64, top_k=4)"),
        ((4, 2), 777, 777, "sliding_window(window=128, sinks=4) | block_topk(32, 3)"),
        ((6, 2), 500, 900, "sliding_window(window=100, sinks=40) | block_topk(32, 5)"),
        ((4, 2), 600, 611, "sliding_window(64, sinks=4) | learned_topk(16, 4, per_head=True)"),
    ],
    ids=str,
)
def test_bfloat16_kernel_equals_reference(heads, q_len, kv_len, pattern, kernel_calls):
    """bfloat16 inputs run the kernels (bfloat16 products, float32 accumulation): outputs
    and gradients, in bfloat16, within bfloat16's rounding of the float32 oracle's on the
    same (rounded) inputs, per head and per group, with cached keys and sinks."""
    pattern = parse_pattern(pattern)
    q, k, v = inputs(2, *heads, q_len, kv_len, dim=64, dtype=torch.bfloat16)
    exact = [x.detach().float().requires_grad_() for x in (q, k, v)]
    scores = _scores(pattern, q, k)
    w = torch.randn(2, heads[0], q_len, 64)
    ref = _outputs_and_grads(
        lambda *x: reference_attention(*x, pattern, 0.125, block_scores=scores), *exact, w
    )
    got = _outputs_and_grads(
        lambda *x: blocks.blocks_attention(*x, pattern, 0.125, block_scores=scores).float(),
        q,
        k,
        v,
        w,
    )
    assert kernel_calls == [pattern]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        assert relative_error(a, b) < 8e-3, name  # bfloat16 keeps 8 bits: 2**-8 = 3.9e-3
    assert all(g.dtype == torch.bfloat16 for g in got[1:])


def test_nan_stays_in_its_row():
    """A NaN query makes its own row NaN and no other (IEEE, as the oracle)."""
    pattern = parse_pattern("sliding_window(window=32, sinks=2) | block_topk(16, 2)")
    q, k, v = (x.detach().clone() for x in inputs(1, 2, 1, 200, 200))
    q[0, 0, 150, 0] = float("nan")
    out = blocks.blocks_attention(q, k, v, pattern, 0.25)
    assert torch.isnan(out[0, 0, 150]).all()
    assert not torch.isnan(out[0, 0, :150]).any() and not torch.isnan(out[0, 1]).any()


def test_window_kernel_own_block():
    """The window kernel's own block: keys from min(p - window + 1, p - p % own_block)."""
    q, k, v = inputs(1, 4, 2, 300, 300, dim=16)
    ext = window_cpu.extension()
    qc, kc, vc = (x.contiguous() for x in (q, k, v))
    out, _ = ext.forward(qc, kc, vc, 8, 3, 0.25, window_cpu.BLOCK, 64)
    p = torch.arange(300)
    start = torch.minimum(p - 8 + 1, p - p % 64)[:, None]
    visible = ((p[None] >= start) | (p[None] < 3)) & (p[None] <= p[:, None])
    scores = (qc @ kc.repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    expected = scores.masked_fill(~visible, -torch.inf).softmax(-1) @ vc.repeat_interleave(2, 1)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_other_patterns_keep_their_paths():
    """Only block selections and their unions with one window take the kernels."""
    q = torch.randn(1, 2, 100, 16)
    for text in (
        "sliding_window(64)",
        "bigbird(16, 1, 1)",
        "sliding_window(8) | dilated(4, 8) | block_topk(16, 2)",
    ):
        assert not selection_cpu.selection_kernel_applies(parse_pattern(text), q)
    assert selection_cpu.selection_kernel_applies(parse_pattern("block_topk(16, 2)"), q)
    assert selection_cpu.selection_kernel_applies(parse_pattern("block_topk(16, 2)"), q.bfloat16())
    for other in (q.double(), q.half()):
        assert not selection_cpu.selection_kernel_applies(parse_pattern("block_topk(16, 2)"), other)


def test_selection_kernel_checks_its_arguments():
    """Called directly, the kernel refuses what it cannot read, naming what was wrong."""
    ext = selection_cpu.compiled("selection_attention")
    q, k, v = torch.randn(1, 2, 64, 8), torch.randn(1, 1, 64, 8), torch.randn(1, 1, 64, 8)
    blocks_, chosen = torch.zeros(1, 2, 64, 2, dtype=torch.long), torch.ones(1, 2, 64, 2).bool()
    out, lse = torch.zeros(1, 2, 64, 8), torch.zeros(1, 2, 64)
    settings = (8, 16, 0, 16, 0.5)  # window, own block, sinks, block size, scale
    with pytest.raises(RuntimeError, match="blocks \\(int64\\) and chosen \\(bool\\)"):
        ext.forward(q, k, v, blocks_.int(), chosen, out, lse, *settings)
    with pytest.raises(RuntimeError, match="is not a complete key block"):
        ext.forward(q, k, v, blocks_ + 4, chosen, out, lse, *settings)
    with pytest.raises(RuntimeError, match="out_static"):
        ext.forward(q, k, v, blocks_, chosen, out[:, :1], lse, *settings)
    with pytest.raises(RuntimeError, match="scale must be a finite positive number"):
        ext.forward(q, k, v, blocks_, chosen, out, lse, 8, 16, 0, 16, float("nan"))
    with pytest.raises(RuntimeError, match="places \\(5\\) exceed the blocks \\(4\\)"):
        ext.top_blocks(torch.zeros(1, 3, 4), torch.ones(3, 4).bool(), 5)


@pytest.mark.parametrize("per_head", [True, False], ids=["per-head", "per-group"])
@pytest.mark.parametrize("sub_block", [4, 16])
def test_fused_gate_scores_equal_pure_pytorch(per_head, sub_block):
    """A gate's fused prompt scorer gives the pure-PyTorch scores on every block a row can
    select (cached keys before the queries included), and only runs without gradients."""
    from longswap.selectors import BlockGate

    gate = BlockGate(16, 2, 32, per_head=per_head, sub_block=sub_block)
    with torch.no_grad():
        for p in gate.parameters():
            p.add_(0.2 * torch.randn_like(p))
    q, k = torch.randn(1, 4, 300, 16), torch.randn(1, 2, 400, 16)
    own = (torch.arange(100, 400) // 32)[:, None]
    can_select = torch.arange(400 // 32)[None] < own  # (Lq, n)
    with torch.no_grad():
        fused = gate(q, k)
        assert gate._prompt_kernel(q, 100) is not None
    assert gate._prompt_kernel(q, 100) is None  # the gate's parameters want gradients
    expected = gate(q, k).detach()
    torch.testing.assert_close(fused[..., can_select], expected[..., can_select])


def test_fused_gate_scores_a_bfloat16_gate():
    """A bfloat16 gate (a bfloat16 model's) scores through the fused kernel in float32: the
    pure-PyTorch bfloat16 scores within their rounding."""
    from longswap.selectors import BlockGate

    gate = BlockGate(16, 2, 32, per_head=True, sub_block=4).bfloat16().requires_grad_(False)
    q, k = torch.randn(1, 4, 300, 16).bfloat16(), torch.randn(1, 2, 400, 16).bfloat16()
    own = (torch.arange(100, 400) // 32)[:, None]
    can_select = torch.arange(400 // 32)[None] < own  # (Lq, n)
    with torch.no_grad():
        assert gate._prompt_kernel(q, 100) is not None
        fused = gate.score(q, gate.block_keys(k), offset=100)
        gate._prompt_kernel = lambda q, offset: None  # the pure-PyTorch scores
        expected = gate.score(q, gate.block_keys(k), offset=100)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(
        fused[..., can_select], expected[..., can_select].float(), atol=0.05, rtol=0.02
    )
