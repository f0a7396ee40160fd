"""``sparse_attention``: validate the inputs once, then dispatch to one backend.

Backends never fall back to each other: a backend that cannot serve a call raises and says
which one can.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Literal, get_args

import torch
from torch import Tensor

from longswap.kernels.band import band_applies
from longswap.kernels.blocks import blocks_attention
from longswap.kernels.cpp import compiled
from longswap.kernels.decode import DECODE_ROWS
from longswap.kernels.documents import Span, is_packed, per_document
from longswap.kernels.flex import flex_attention_backend
from longswap.kernels.reference import reference_attention
from longswap.kernels.window_cpu import window_kernel_applies
from longswap.patterns import Pattern, parse_pattern

Backend = Literal["auto", "reference", "blocks", "flex"]
BACKENDS: tuple[str, ...] = get_args(Backend)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _shapes(q: Tensor, k: Tensor, v: Tensor) -> str:
    return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"


def check_inputs(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> None:
    """Raise ValueError, with the shapes, when q/k/v/mask do not form one attention call."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    shapes = _shapes(q, k, v)
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError(
            f"q, k and v must have 4 dimensions: q (B, Hq, Lq, D), k and v (B, Hkv, Lk, D); "
            f"got {shapes}"
        )
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree on (B, Hkv, Lk); got {shapes}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must agree on batch B and head dim D; got {shapes}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}) "
            f"for grouped-query attention; got {shapes}"
        )
    if q.shape[2] > k.shape[2]:
        raise ValueError(
            f"Lq ({q.shape[2]}) must not exceed Lk ({k.shape[2]}): query i sits at position "
            f"Lk - Lq + i, so every query needs its own key; got {shapes}"
        )
    if min(q.shape) == 0 or min(k.shape) == 0 or min(v.shape) == 0:
        raise ValueError(f"q, k and v must not be empty; got {shapes}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(
            f"q, k and v must share one dtype among float32, bfloat16, float16; got "
            f"{q.dtype}, {k.dtype}, {v.dtype} for {shapes}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device; got {q.device}, {k.device}, {v.device}"
        )
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (
            k.shape[0],
            k.shape[2],
        ):
            raise ValueError(
                f"key_padding_mask must be a bool tensor (B, Lk) = ({k.shape[0]}, {k.shape[2]}), "
                f"True for keys to keep; got {key_padding_mask.dtype} "
                f"{tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != k.device:
            raise ValueError(
                f"key_padding_mask is on {key_padding_mask.device} but k is on {k.device}"
            )


def check_documents(k: Tensor, document_ids: Tensor | None) -> None:
    """Raise ValueError unless ``document_ids`` is an integer ``(B, Lk)`` tensor beside k."""
    if document_ids is None:
        return
    if (
        not isinstance(document_ids, Tensor)
        or document_ids.dtype.is_floating_point
        or document_ids.dtype == torch.bool
        or document_ids.shape != (k.shape[0], k.shape[2])
        or document_ids.device != k.device
    ):
        raise ValueError(
            f"document_ids must be an integer tensor (B, Lk) = ({k.shape[0]}, {k.shape[2]}) "
            f"on {k.device}, one id per key position"
        )


#: Calls without gradients that ``auto`` sends to the dense oracle on CPU, where one masked
#: softmax costs less than the sparse kernels' set-up (benchmarks/small_calls.py; its
#: decoding rows grow the keys by one per call, as a decoding loop does):
#: never for a sliding or dilated window that the C++ kernel serves (it reads only the
#: window: faster from one query over 512 keys on; not with padding or documents), nor for
#: one query row of a selection pattern that the C++ decoding step serves; otherwise
#: decoding steps (up to ``DECODE_ROWS`` queries) over up to this many keys: 2k for the
#: band patterns (their plan is cheap and they read only their reach), 2k for selection
#: patterns without padding (their decoding path gathers only the selected blocks), 32k for the
#: others (their tiles are rebuilt for every new key length);
DENSE_DECODE_KEYS = {"band": 1 << 11, "selecting": 1 << 11, "other": 1 << 15}
#: and prompts up to this many (query, key) pairs: more for block selection, which has
#: more to set up.
DENSE_PROMPT_PAIRS = {"selecting": 1 << 16, "other": 1 << 12}
#: On CUDA, one wide bound for every call: it spares FlexAttention a compilation per
#: decoding shape.
CUDA_DENSE_PAIRS = 1 << 20


def dense_is_cheaper(
    pattern: Pattern | None, q: Tensor, k: Tensor, plain: bool = True, scored: bool = False
) -> bool:
    """Whether the dense oracle beats the sparse backends on this call without gradients.

    ``plain``: no key padding mask, no soft-capping and no sinks. ``scored``: block scores
    were given (a block they score -inf stays unseen even where ``pattern.covers`` the keys).
    """
    q_len, kv_len = q.shape[2], k.shape[2]
    if plain and not scored and pattern is not None and pattern.covers(kv_len):
        return False  # dense attention at this length: SDPA's kernel (``blocks``) is best
    if q.device.type == "cuda":
        return q_len * kv_len <= CUDA_DENSE_PAIRS
    if plain and pattern is not None and window_kernel_applies(pattern, q):
        return False
    selecting = pattern is not None and pattern.data_dependent
    if selecting and plain and q_len == 1 and compiled("selection_decode") is not None:
        return False  # the C++ decoding step reads only what the query sees
    if q_len <= DECODE_ROWS:
        band = pattern is not None and band_applies(pattern, q.shape[1])
        kind = "band" if band else "selecting" if selecting and plain else "other"
        return kv_len <= DENSE_DECODE_KEYS[kind]
    return q_len * kv_len <= DENSE_PROMPT_PAIRS["selecting" if selecting else "other"]


def resolve_backend(
    backend: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern | None = None,
    plain: bool = True,
    scored: bool = False,
) -> str:
    """The concrete backend for ``backend`` on these inputs (``auto`` decides here).

    ``plain``: the call has no key padding mask, no soft-capping and no sinks; ``scored``:
    it has block scores.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not needs_grad and dense_is_cheaper(pattern, q, k, plain, scored):
        return "reference"
    if q.device.type == "cuda":
        return "flex"
    # CPU otherwise: FlexAttention has no backward here, and its compiled forward, though
    # slightly faster on static patterns at 16k (benchmarks/attention.py), costs seconds of
    # compilation for every new shape. `blocks` serves both.
    return "blocks"


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern | str,
    backend: Backend = "auto",
    scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    block_size: int | None = None,
    document_ids: Tensor | None = None,
    block_scores: Tensor | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Attention of q ``(B, Hq, Lq, D)`` over k, v ``(B, Hkv, Lk, D)`` restricted to ``pattern``.

    Query ``i`` sits at absolute position ``Lk - Lq + i``. ``scale`` (finite, positive)
    defaults to ``1/sqrt(D)``; ``key_padding_mask (B, Lk)`` is True for keys to keep;
    ``document_ids (B, Lk)`` marks the documents of packed rows: each document is attended
    as a sequence of its own, the pattern laid over it from its first token
    (``kernels.documents``). Rows
    with no visible key return zeros; on every backend, a row whose query, or a key or value
    it sees, holds a NaN holds NaN. Returns ``(B, Hq, Lq, D)`` in q's dtype. ``block_size``
    is the tile size of the ``blocks`` and ``flex`` kernels, a speed setting that never
    changes the pattern; None picks each backend's measured best (``blocks``: 128;
    ``flex``: 64 on CPU, 128 elsewhere). ``block_scores (B, Hq or Hkv, Lq, n)`` scores the
    ``n`` complete key blocks for a selection pattern (``learned_topk`` needs them: its
    selector computes them; ``block_topk`` computes its own when None). ``softcap`` (Gemma
    2's ``attn_logit_softcapping``) caps each scaled score ``s`` to ``softcap * tanh(s /
    softcap)``; ``sinks (Hq,)`` (gpt-oss) are learned logits, one per query head, that join
    each row's softmax denominator and carry no value (differentiable).
    """
    pattern = parse_pattern(pattern)
    check_inputs(q, k, v, key_padding_mask)
    check_documents(k, document_ids)
    if block_size is not None and (
        isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
    ):
        raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
    pattern.check_heads(q.shape[1])
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, Real) or not 0 < scale < math.inf:
        raise ValueError(
            f"scale must be a finite positive number (it multiplies q k^T; None means "
            f"1/sqrt(D)), got {scale!r}"
        )
    if block_scores is not None and not pattern.data_dependent:
        raise ValueError(f"block_scores were given, but {pattern} selects no blocks from them")
    check_softmax_terms(q, softcap, sinks)
    if is_packed(document_ids):
        if block_scores is not None:
            raise ValueError(
                "block_scores score the key blocks of one sequence, and document_ids pack "
                "several: each document is a sequence of its own, with blocks counted from "
                "its first token; call once per document with its own scores"
            )

        def attend(span: Span, q: Tensor, k: Tensor, v: Tensor, padding: Tensor | None) -> Tensor:
            return sparse_attention(
                q, k, v, pattern, backend, scale, padding, block_size, softcap=softcap, sinks=sinks
            )

        return per_document(attend, q, k, v, document_ids, key_padding_mask)
    plain = all(x is None for x in (key_padding_mask, softcap, sinks))
    chosen = resolve_backend(backend, q, k, v, pattern, plain, block_scores is not None)
    extras = {"block_scores": block_scores, "softcap": softcap, "sinks": sinks}
    if chosen == "reference":
        return reference_attention(q, k, v, pattern, scale, key_padding_mask, **extras)
    run = blocks_attention if chosen == "blocks" else flex_attention_backend
    return run(q, k, v, pattern, scale, key_padding_mask, block_size, **extras)


def check_softmax_terms(q: Tensor, softcap: float | None, sinks: Tensor | None) -> None:
    """Raise a ValueError unless ``softcap`` is None or a finite positive number and
    ``sinks`` is None or a floating tensor of one logit per query head on q's device."""
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, Real) or not 0 < softcap < math.inf
    ):
        raise ValueError(
            f"softcap must be a finite positive number (scores become softcap * tanh(s / "
            f"softcap)) or None, got {softcap!r}"
        )
    if sinks is None:
        return
    if not isinstance(sinks, Tensor) or not sinks.is_floating_point():
        raise ValueError(f"sinks must be a floating-point tensor of shape (Hq,), got {sinks!r}")
    if tuple(sinks.shape) != (q.shape[1],) or sinks.device != q.device:
        raise ValueError(
            f"sinks must hold one logit per query head, shape ({q.shape[1]},), on {q.device}; "
            f"got shape {tuple(sinks.shape)} on {sinks.device}"
        )
