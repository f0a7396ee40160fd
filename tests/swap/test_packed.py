"""Packed documents are independent sequences: a packed row's losses and gradients equal
those of its documents run one by one, for every pattern and backend."""

import pytest
import torch
import torch.nn.functional as F

import longswap
from longswap.kernels import sparse_attention
from longswap.patterns import (
    bigbird,
    block_topk,
    dilated,
    full,
    learned_topk,
    local_global,
    shifted_groups,
    sliding_window,
)
from tests.swap.conftest import make_model

#: Three documents, as TRL's padding-free collator sends them: positions restart at each
#: document, no attention mask.
LENGTHS = (70, 45, 93)

PATTERNS = [
    full(),
    sliding_window(window=24, sinks=2),
    block_topk(block_size=16, top_k=2),
    sliding_window(window=24, sinks=2) | block_topk(block_size=16, top_k=2),
    local_global(window=16, global_tokens=[0, 1, 2, 3]),
    dilated(4, 5),
    bigbird(16, 1, 1, 1, seed=3),
    shifted_groups(32),
    learned_topk(block_size=16, top_k=2),
    sliding_window(window=24, sinks=2) | learned_topk(block_size=16, top_k=2, sub_block=4),
]


def _documents(seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (1, n), generator=g) for n in LENGTHS]


def _loss_sum(logits, ids):
    """Summed next-token loss of one document's logits ``(1, L, V)`` and ids ``(1, L)``."""
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _packed_and_alone(model, docs):
    """Per-document losses and the summed loss's gradients: packed in one row, then alone."""
    packed = torch.cat(docs, 1)
    positions = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    model.zero_grad()
    logits = model(packed, position_ids=positions).logits
    bounds = torch.tensor([0, *LENGTHS]).cumsum(0).tolist()
    losses = [
        _loss_sum(logits[:, a:b], d) for a, b, d in zip(bounds[:-1], bounds[1:], docs, strict=True)
    ]
    torch.stack(losses).sum().backward()
    packed_grads = _grads(model)
    model.zero_grad()
    alone = [_loss_sum(model(d).logits, d) for d in docs]
    torch.stack(alone).sum().backward()
    return losses, packed_grads, alone, _grads(model)


@pytest.mark.parametrize("backend", ["reference", "blocks"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_row_equals_its_documents_alone(family, pattern, backend):
    model = make_model(family, max_position_embeddings=256).train()
    longswap.swap_attention(model, pattern, backend=backend, block_size=16)
    losses, packed_grads, alone, alone_grads = _packed_and_alone(model, _documents())
    torch.testing.assert_close(torch.stack(losses), torch.stack(alone), rtol=1e-5, atol=1e-5)
    assert packed_grads.keys() == alone_grads.keys() and packed_grads
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, alone_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_second_document_keeps_its_own_sinks():
    """A document that starts mid-row sees its own first tokens as sinks, not the row's."""
    model = make_model("llama", max_position_embeddings=256)
    longswap.swap_attention(model, sliding_window(window=8, sinks=4), backend="blocks")
    docs = _documents()
    packed = torch.cat(docs, 1)
    positions = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    with torch.no_grad():
        out = model(packed, position_ids=positions).logits[:, LENGTHS[0] : sum(LENGTHS[:2])]
        alone = model(docs[1]).logits
    torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "blocks", "auto"])
@pytest.mark.parametrize(
    "pattern",
    [sliding_window(24, sinks=2), block_topk(16, 2), local_global(16, [0, 1, 2, 3])],
    ids=str,
)
@pytest.mark.parametrize("q_len", [208, 100, 1])
def test_sparse_attention_with_document_ids_runs_each_document_alone(pattern, backend, q_len):
    """Through the kernel API: queries at the end of the keys, per document, with grads."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, q_len, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 208, 8, generator=g, requires_grad=True) for _ in range(2))
    docs = torch.tensor([[0] * 70 + [1] * 45 + [2] * 93, [0] * 150 + [4] * 58])
    out = sparse_attention(q, k, v, pattern, backend=backend, document_ids=docs)
    offset = 208 - q_len
    for row, cuts in enumerate(([0, 70, 115, 208], [0, 150, 208])):
        for start, end in zip(cuts[:-1], cuts[1:], strict=True):
            if end <= offset:
                continue
            first = max(start, offset)
            alone = sparse_attention(
                q[row : row + 1, :, first - offset : end - offset],
                k[row : row + 1, :, start:end],
                v[row : row + 1, :, start:end],
                pattern,
                backend="reference",
            )
            torch.testing.assert_close(
                out[row : row + 1, :, first - offset : end - offset], alone, atol=1e-5, rtol=1e-5
            )
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert all(bool(torch.isfinite(x).all()) for x in grads)


def test_block_scores_for_a_packed_row_are_refused():
    q = torch.randn(1, 2, 64, 8)
    docs = torch.tensor([[0] * 32 + [1] * 32])
    with pytest.raises(ValueError, match="call once per document with its own scores"):
        sparse_attention(
            q, q, q, learned_topk(16, 1), block_scores=torch.zeros(1, 2, 64, 4), document_ids=docs
        )


@pytest.mark.flex
def test_flex_packed_row_equals_its_documents_alone():
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 208, 16, generator=g) for _ in range(3))
    docs = torch.tensor([[0] * 70 + [1] * 45 + [2] * 93])
    pattern = sliding_window(24, sinks=2)
    out = sparse_attention(q, k, v, pattern, backend="flex", document_ids=docs)
    ref = sparse_attention(q, k, v, pattern, backend="reference", document_ids=docs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    alone = sparse_attention(
        q[:, :, 70:115], k[:, :, 70:115], v[:, :, 70:115], pattern, backend="reference"
    )
    torch.testing.assert_close(out[:, :, 70:115], alone, atol=1e-5, rtol=1e-5)
