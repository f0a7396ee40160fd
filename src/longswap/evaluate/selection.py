"""The ``selection`` task: how much of dense attention a block selection keeps, per layer.

One forward over ``length`` tokens of held-out text; every swapped layer that selects key
blocks (``block_topk``, ``learned_topk``) is observed (``swap.observe``). For each, the
share of dense attention's probability mass that falls on the keys the layer sees (its
own block plus its selected blocks), averaged over heads and queries, next to the share an
oracle keeps with the same budget: for each head, the ``top_k`` blocks holding most of its
dense mass (no selection with that budget keeps more). Dense attention is computed a chunk
of queries at a time, so an 8k-token layer never holds its ``L x L`` map.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from longswap.patterns import Selection
from longswap.selectors import captured_mass
from longswap.selectors.distill import top_blocks
from longswap.swap import AttentionCall, observe


def _layer_shares(call: AttentionCall) -> dict[str, Any] | None:
    """Captured and oracle mass of one layer's call, or None when it selects no blocks."""
    pattern = call.pattern
    if not isinstance(pattern, Selection):
        return None
    q, k, bs = call.query, call.key, pattern.block_size
    q_len, kv_len = q.shape[2], k.shape[2]
    candidates = pattern.candidates(q_len, kv_len, q.device)
    if call.block_scores is not None:  # learned: one selection per KV group or per head
        selected = top_blocks(call.block_scores, candidates, pattern.top_k)
    else:  # MoBA: one per head
        selected = pattern.select(q, k)
    shares = captured_mass(
        q,
        k,
        pattern,
        selected,
        bs,
        call.scale,
        oracle_top_k=pattern.top_k,
        candidates=candidates,
        softcap=call.softcap,
    )
    return {
        "layer": call.layer,
        "captured": shares.kept,
        "oracle": shares.oracle,
        "kept_nats": shares.kept_nats,
        "oracle_nats": shares.oracle_nats,
    }


def selection(model: Any, tokens: Tensor, length: int) -> dict[str, Any]:
    """The selection record of ``model`` on the first ``length`` of ``tokens`` (1-D ids)."""
    if tokens.numel() < length:
        raise ValueError(f"selection at {length} tokens needs that much text, got {tokens.numel()}")
    layers: list[dict[str, Any]] = []

    def record(call: AttentionCall) -> None:
        shares = _layer_shares(call)
        if shares is not None:
            layers.append(shares)

    device = next(model.parameters()).device
    with torch.no_grad(), observe(model, record):
        model(tokens[:length].to(device)[None], logits_to_keep=1)
    if not layers:
        raise ValueError(
            "no layer of this model selects key blocks: the selection task measures "
            "block_topk and learned_topk swaps"
        )
    captured, oracle, kept_nats, oracle_nats = (
        sum(r[name] for r in layers) / len(layers)
        for name in ("captured", "oracle", "kept_nats", "oracle_nats")
    )
    return {
        "length": length,
        "captured_mass": captured,
        "oracle_mass": oracle,
        "share_of_oracle": captured / oracle if oracle else 0.0,
        "kept_nats": kept_nats,
        "oracle_nats": oracle_nats,
        "layers": layers,
        "convention": (
            "share of dense attention mass on the keys each query sees (own block + "
            "selected blocks), mean over layers, heads and queries; oracle: each head's "
            "top_k blocks by its dense mass, the most any selection of that budget keeps; "
            "kept_nats: mean over layers, heads and queries of -log(mass kept), the KL "
            "divergence of dense attention restricted to the keys seen from dense attention "
            "(a query that keeps half its mass costs 0.69 whatever the others keep)"
        ),
    }
