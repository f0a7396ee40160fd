"""The dense oracle: a full boolean mask and a softmax in float32. Every backend equals it.

Two properties of the attention call, not of the pattern, change the softmax itself:
``softcap`` (Gemma 2) caps each score ``s`` to ``softcap * tanh(s / softcap)``; ``sinks``
(gpt-oss), one learned logit per query head, joins each row's softmax denominator and
carries no value, so a row's weights sum to less than one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longswap.patterns import Pattern


def dense_pattern_mask(
    q: Tensor,
    k: Tensor,
    pattern: Pattern,
    key_padding_mask: Tensor | None = None,
    block_scores: Tensor | None = None,
) -> Tensor:
    """Boolean mask ``(B or 1, Hq or 1, Lq, Lk)`` of ``pattern`` for these inputs."""
    q_len, kv_len = q.shape[2], k.shape[2]
    if pattern.data_dependent:
        mask = pattern.token_mask(q, k, key_padding_mask, block_scores)
    else:
        mask = pattern.dense_mask(q_len, kv_len, q.shape[1], q.device)[None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    return mask


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern,
    scale: float,
    key_padding_mask: Tensor | None = None,
    block_scores: Tensor | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Attention through the pattern's dense mask; O(L^2) time and memory.

    Rows with no visible key are zero. Computed in float32 whatever the input dtype.
    """
    mask = dense_pattern_mask(q, k, pattern, key_padding_mask, block_scores)
    return masked_attention(q, k, v, mask, scale, softcap, sinks)


def capped(scores: Tensor, softcap: float | None) -> Tensor:
    """``softcap * tanh(scores / softcap)``, or ``scores`` unchanged when ``softcap`` is None."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    scale: float,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Softmax attention of q ``(B, Hq, Lq, D)`` over k, v ``(B, Hkv, M, D)`` where ``mask``
    (broadcastable to ``(B, Hq, Lq, M)``) is True, in float32; rows with no visible key are
    zero. ``softcap`` and ``sinks (Hq,)`` as in the module docstring. The oracle passes every
    key; the decoding path only the keys it gathered."""
    batch, hq, q_len, _ = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    # Query head h reads key head h // (Hq / Hkv): group the query heads of each key head
    # as extra rows instead of copying keys and values per query head.
    rows = q.float().reshape(batch, hkv, -1, q.shape[-1])
    scores = (rows @ k.float().transpose(-1, -2)).view(batch, hq, q_len, kv_len) * scale
    scores = capped(scores, softcap).masked_fill(~mask, torch.finfo(torch.float32).min)
    has_key = mask.any(-1, keepdim=True)
    if sinks is None:
        probs = torch.softmax(scores, -1)
    else:  # the sink is one more logit in the denominator, with no value
        sink = sinks.float().view(1, hq, 1, 1).expand(batch, hq, q_len, 1)
        probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    probs = probs.reshape(batch, hkv, -1, kv_len)
    out = (probs @ v.float()).view(batch, hq, q_len, v.shape[-1])
    return (out * has_key).to(q.dtype)
