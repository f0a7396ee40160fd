"""What trains and judges a block selector: dense attention pooled to key blocks.

Dense attention probabilities are computed a chunk of query rows at a time and pooled to
complete key blocks as they are produced, so a layer never holds its ``L x L`` map (at 8k
tokens a chunk of 256 rows of 9 heads is 75 MB in float32). A selector is trained with the
KL divergence from the pooled dense mass (max over the query heads of a KV group, as
SeerAttention-R does; normalised over the candidate blocks) to the softmax of its scores.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from longswap.kernels.reference import capped
from longswap.patterns import Pattern
from longswap.patterns.block_topk import top_places


def _dense_chunks(
    q: Tensor,
    k: Tensor,
    scale: float | None,
    chunk: int,
    softcap: float | None = None,
    align: int = 1,
    picked: Tensor | None = None,
) -> Iterator[tuple[slice, slice | Tensor, Tensor]]:
    """``(slots, rows, p)``: causal dense attention ``p (B, Hq, rows, reach)``, by chunks of
    the query rows (``picked``, sorted indices: only those rows; ``slots``: the chunk's
    places among them, ``rows`` its rows of q): scores in the inputs' precision (a bfloat16
    model's products run at its speed), soft-capped when the model caps them, softmax in
    float32. ``reach`` stops after the chunk's last row's own key, rounded up to a multiple
    of ``align`` (within ``Lk``): the keys after it have no mass, and skipping them halves
    the work. A model's learned sinks are left out: the targets are distributions over
    keys."""
    batch, hq, q_len, dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = scale if scale is not None else 1 / math.sqrt(dim)
    positions = torch.arange(kv_len, device=q.device)
    total = q_len if picked is None else picked.numel()
    for start in range(0, total, chunk):
        slots = slice(start, min(start + chunk, total))
        rows = slots if picked is None else picked[slots].to(q.device)
        own = positions[kv_len - q_len :][rows]
        reach = min(kv_len, -(-(int(own.max()) + 1) // align) * align)
        qc = q.detach()[:, :, rows].reshape(batch, hkv, group, -1, dim)
        keys = k.detach()[:, :, :reach]
        scores = capped(torch.einsum("bhgld,bhkd->bhglk", qc, keys).float() * scale, softcap)
        scores.masked_fill_(positions[None, :reach] > own[:, None], float("-inf"))
        yield slots, rows, scores.softmax(-1).reshape(batch, hq, -1, reach)


def _block_sums(p: Tensor, block_size: int, n: int) -> Tensor:
    """``(B, H, rows, n)``: the mass of each of the first ``n`` complete key blocks (zero for
    blocks beyond ``p``'s keys)."""
    held = min(n, p.shape[-1] // block_size)
    sums = p[..., : held * block_size].unflatten(-1, (held, block_size)).sum(-1)
    return F.pad(sums, (0, n - held))


@torch.no_grad()
def dense_block_mass(
    q: Tensor,
    k: Tensor,
    block_size: int,
    scale: float | None = None,
    chunk: int = 256,
    softcap: float | None = None,
    static: Pattern | None = None,
    per_head: bool = False,
    picked: Tensor | None = None,
) -> Tensor:
    """``(B, Hkv, Lq, n)``: for each query, dense causal attention's mass on each complete
    key block, the max over the query heads of its KV group (``per_head``: ``(B, Hq, Lq,
    n)``, each head's own). q is ``(B, Hq, Lq, D)``, k ``(B, Hkv, Lk, D)``; query ``i`` sits
    at position ``Lk - Lq + i``; ``softcap``: the model's logit cap. ``static``: a
    head-independent pattern of keys the query sees whatever is selected (a union's window,
    sinks and own block); their mass is left out, so that a block's target is what selecting
    it adds (a sink's large mass would otherwise swamp every other block's). ``picked``
    (sorted indices of query rows): only those rows, ``(B, H, len(picked), n)``, at the cost
    of those rows alone."""
    batch, hq, q_len, _ = q.shape
    kv_len, hkv = k.shape[2], k.shape[1]
    n = kv_len // block_size
    rows_out = q_len if picked is None else picked.numel()
    out = torch.empty(batch, hq if per_head else hkv, rows_out, n, device=q.device)
    for slots, rows, p in _dense_chunks(q, k, scale, chunk, softcap, block_size, picked):
        if static is not None:
            shown = static.dense_mask(q_len, kv_len, device=q.device, rows=rows, keys=p.shape[-1])
            p = p.masked_fill(shown, 0)
        mass = _block_sums(p, block_size, n)  # (B, Hq, rows, n)
        out[:, :, slots] = mass if per_head else mass.unflatten(1, (hkv, hq // hkv)).amax(2)
    return out


def selector_kl(
    scores: Tensor, target: Tensor, candidates: Tensor, selected: Tensor | None = None
) -> Tensor:
    """Mean over query rows of ``KL(target || softmax(scores))`` over the candidate blocks.

    ``scores`` and ``target`` are ``(B, Hkv or Hq, Lq, n)``; ``candidates`` (broadcastable bool)
    marks the blocks a query may select; ``selected`` restricts both distributions further
    (DSA's sparse stage: the selected set only). Rows without a candidate, or on which the
    target puts no mass, do not count. Differentiable in ``scores`` only.
    """
    keep = candidates.expand_as(scores)
    if selected is not None:
        keep = keep & selected
    target = torch.where(keep, target.float(), 0.0)
    total = target.sum(-1, keepdim=True)
    rows = (total[..., 0] > 0) & keep.any(-1)
    p = target / total.clamp_min(1e-30)
    log_q = F.log_softmax(scores.float().masked_fill(~keep, float("-inf")), dim=-1)
    terms = torch.where(keep & (p > 0), p * (p.clamp_min(1e-30).log() - log_q), 0.0)
    per_row = terms.sum(-1)
    if bool(rows.any()):
        return per_row[rows].mean()
    # Nothing to learn: a zero that keeps the graph (masked scores may hold -inf).
    return scores.float().nan_to_num(0.0, posinf=0.0, neginf=0.0).sum() * 0.0


class Shares(NamedTuple):
    """What a selection keeps of dense attention, averaged over heads and queries."""

    #: Share of the dense mass on the keys seen.
    kept: float
    #: The same for the best selection of the budget (None when not asked for).
    oracle: float | None
    #: Mean of ``-log(kept)`` per query and head, in nats: the KL divergence of dense
    #: attention restricted to the keys seen (renormalised) from dense attention. A query
    #: that keeps half its mass costs 0.69 nats whatever the others keep; the mean share
    #: hides such queries among many that keep everything.
    kept_nats: float
    #: The same for the best selection of the budget.
    oracle_nats: float | None


@torch.no_grad()
def captured_mass(
    q: Tensor,
    k: Tensor,
    static: Pattern,
    selected: Tensor,
    block_size: int,
    scale: float | None = None,
    chunk: int = 256,
    oracle_top_k: int | None = None,
    candidates: Tensor | None = None,
    softcap: float | None = None,
) -> Shares:
    """The share of dense attention mass a selection keeps (and its ``-log``, see
    :class:`Shares`); with ``oracle_top_k``, the same for the best selection of that budget
    (each head's ``oracle_top_k`` ``candidates`` blocks with the most mass), in one pass.

    ``static``: a head-independent pattern of the keys visible whatever is selected (own
    block, window, sinks); ``selected (B, Hkv or Hq, Lq, n)`` bool: the complete key blocks each
    query of a KV group (or of a head) selected; a block's keys that ``static`` shows count
    once, with ``static``. ``softcap``: the model's logit cap.
    """
    hq, q_len, hkv, kv_len = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    sums = torch.zeros(4, dtype=torch.float64)  # kept, best, and their -log
    rows_seen = 0
    n = kv_len // block_size
    for _, rows, p in _dense_chunks(q, k, scale, chunk, softcap, block_size):
        shown = static.dense_mask(q_len, kv_len, device=q.device, rows=rows, keys=p.shape[-1])
        always = (p * shown).sum(-1)  # (B, Hq, rows)
        mass = _block_sums(p.masked_fill(shown, 0), block_size, n)  # (B, Hq, rows, n)
        chosen = selected[:, :, rows]
        if chosen.shape[1] != hq:
            chosen = chosen.repeat_interleave(hq // hkv, dim=1)
        shares = [always + (mass * chosen).sum(-1)]
        if oracle_top_k is not None:
            allowed = candidates[rows] if candidates is not None else torch.ones_like(mass[0, 0])
            top = top_blocks(mass, allowed.bool(), oracle_top_k)
            shares.append(always + (mass * top).sum(-1))
        for i, share in enumerate(shares):
            sums[i] += float(share.sum())
            sums[2 + i] += float(-share.clamp_min(1e-30).log().sum())
        rows_seen += always.numel()
    kept, best, kept_nats, best_nats = (sums / max(rows_seen, 1)).tolist()
    asked = oracle_top_k is not None
    return Shares(kept, best if asked else None, kept_nats, best_nats if asked else None)


def top_blocks(scores: Tensor, candidates: Tensor, places: int) -> Tensor:
    """``(B, Hkv or Hq, Lq, n)`` bool: the blocks the kernels select from ``scores`` given
    ``places`` per query among ``candidates`` (broadcastable bool), by :func:`top_places`
    (NaN selected first, ties to the more recent block, -inf never chosen; fewer when a row
    has fewer such blocks)."""
    blocks, chosen = top_places(scores, candidates, min(places, scores.shape[-1]))
    out = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return out.scatter_(-1, blocks, chosen)
