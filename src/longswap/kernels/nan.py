"""NaN keys and values: exactly the query rows that see one come out NaN.

A kernel that adds a mask to its scores, or weighs every value row of a tile, lets a NaN
it hides reach rows that do not see it (NaN - inf, 0 * NaN); one that skips masked scores
may drop a NaN that a row does see. :func:`with_nan_rows` gives both kinds the rule of the
dense oracle: the call runs on zeros in place of the NaN keys and values, and a second call
over flags (zero queries and keys, so every visible key weighs the same) finds the rows
that see one. Clean inputs cost two sums.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

#: ``attend(q, k, v) -> (B, Hq, Lq, Dv)``: one attention call of a backend.
Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


def nan_keys(k: Tensor, v: Tensor) -> Tensor | None:
    """``(B, Hkv, Lk)`` bool: the keys whose key or value holds a NaN; None when none does.
    Two sums find out on clean inputs (a NaN sum, from a NaN or from opposite infinities,
    calls for the exact scan), twenty times faster than the scan itself."""
    if not bool(torch.isnan(k.detach().sum() + v.detach().sum())):
        return None
    bad = k.isnan().any(-1) | v.isnan().any(-1)
    return bad if bool(bad.any()) else None


def with_nan_rows(attend: Attend, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``attend(q, k, v)``, with NaN in exactly the rows that see a NaN key or value."""
    bad = nan_keys(k, v)
    if bad is None:
        return attend(q, k, v)
    clean = ~bad[..., None]
    out = attend(q, k.where(clean, 0), v.where(clean, 0))
    flags = bad[..., None].to(v.dtype).expand_as(v).contiguous()
    with torch.no_grad():
        seen = attend(torch.zeros_like(q), torch.zeros_like(k), flags)
    return out.masked_fill(seen[..., :1] > 0, float("nan"))
