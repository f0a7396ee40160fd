"""The attention and mask functions longswap registers with transformers, by name, once.

transformers calls ``longswap_attention`` for every attention layer of a model whose
``config._attn_implementation`` is ``"longswap"``; other models in the process never see
it. The layer's pattern comes from that model's own config (``config.longswap``), so each
instance carries its own swap.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from longswap.kernels import sparse_attention
from longswap.kernels.documents import Span, per_document
from longswap.patterns import Pattern, Selection, SlidingWindow, full
from longswap.patterns.head_slice import HeadSlice
from longswap.selectors import SELECTOR_ATTR
from longswap.swap.spec import ATTN_NAME, CONFIG_KEY, SwapSpec

#: The attribute under which :func:`observing` hangs an observer on an attention module.
OBSERVER_ATTR = "longswap_observer"
#: The attribute through which a summarising cache layer hands itself to the attention call
#: that follows its update (``swap.cache``); the call takes it back at once.
CACHE_LAYER_ATTR = "longswap_cache_layer"
#: The attribute under which :func:`sharding_heads` tells an attention module which share
#: of the query heads its calls hold (head-parallel attention).
HEAD_SHARD_ATTR = "longswap_head_shard"


@dataclass(frozen=True)
class AttentionCall:
    """One swapped layer's attention call, as an observer sees it.

    ``query (B, Hq, L, D)`` after RoPE, ``key``/``value (B, Hkv, S, D)``, ``output
    (B, Hq, L, D)``; ``scale`` as the layer passed it (None: ``1/sqrt(D)``);
    ``block_scores (B, Hkv, L, S // block)``: the layer's learned selector's scores (with
    their graph, for distillation), or None for patterns without a selector. ``softcap`` and
    ``sinks (Hq,)``: the model's logit cap (Gemma 2) and learned sinks (gpt-oss), if any.
    ``start``: where the call's first key sits in its row. A packed row's documents are
    attended, and observed, one call each, with ``B = 1`` (``kernels.documents``).
    """

    layer: int
    pattern: Pattern
    query: Tensor
    key: Tensor
    value: Tensor
    output: Tensor
    scale: float | None
    block_scores: Tensor | None = None
    softcap: float | None = None
    sinks: Tensor | None = None
    start: int = 0


#: Receives every swapped attention call of a model while :func:`observing` it.
Observer = Callable[[AttentionCall], None]


@contextlib.contextmanager
def observing(
    modules: Iterable[torch.nn.Module], observer: Observer, dense: bool = False
) -> Iterator[None]:
    """Within the context, each swapped attention call of these modules goes to ``observer``.

    The one way for training signals (attention transfer, selector distillation) to leave
    an attention call: ``train/`` builds the observer and decides what to compute; the
    attention function only hands it the call. Nothing is left on the modules afterwards.
    ``dense=True``: the layers compute full causal attention instead of their patterns (a
    teacher pass over the dense model's own activations); the observer still sees each
    layer's pattern, and no block scores.
    """
    modules = list(modules)
    if any(getattr(module, OBSERVER_ATTR, None) is not None for module in modules):
        raise RuntimeError("a module is already observed; nest no observers")
    with _attached(modules, OBSERVER_ATTR, (observer, dense)):
        yield


@contextlib.contextmanager
def sharding_heads(modules: Iterable[torch.nn.Module], rank: int, size: int) -> Iterator[None]:
    """Within the context, each attention call of these modules holds the ``rank``-th of
    ``size`` equal, consecutive shares of the query heads (DeepSpeed Ulysses sequence
    parallelism: each process attends over the whole sequence with its share of the heads).
    Patterns that differ between heads (``shifted_groups``) then apply the rules of those
    heads; the others need nothing. Nothing is left on the modules afterwards."""
    if not 0 <= rank < size:
        raise ValueError(f"sharding_heads: rank {rank} is not one of {size} shares")
    with _attached(modules, HEAD_SHARD_ATTR, (rank, size)):
        yield


@contextlib.contextmanager
def _attached(modules: Iterable[torch.nn.Module], name: str, value: Any) -> Iterator[None]:
    """``value`` as attribute ``name`` of every module, removed on leaving."""
    modules = list(modules)
    for module in modules:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module in modules:
            delattr(module, name)


def _for_heads(module: nn.Module, pattern: Pattern, heads: int) -> Pattern:
    """``pattern`` for the query heads this call holds (see :func:`sharding_heads`)."""
    if not pattern.head_dependent:
        return pattern
    total = getattr(module.config, "num_attention_heads", heads)
    shard = getattr(module, HEAD_SHARD_ATTR, None)
    if shard is None:
        if heads != total:
            raise ValueError(
                f"layer {module.layer_idx}: {pattern} differs between heads, and this call "
                f"holds {heads} of the model's {total} query heads (head-parallel attention?) "
                "without saying which: run it inside longswap.swap.shard_heads(model, rank, "
                "size), as longswap finetune --sequence-parallel does"
            )
        return pattern
    rank, size = shard
    return HeadSlice(pattern, rank * heads, size * heads)


@dataclass(frozen=True)
class SwapMask:
    """What the mask function hands to the attention function.

    ``key_padding``: ``(B, Lk)`` bool, True for real tokens, or None without padding.
    ``q_offset``: absolute position of the first query (tokens already in the cache).
    """

    key_padding: Tensor | None
    q_offset: int


def longswap_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> SwapMask:
    """Mask interface: keep the 2D padding mask; the pattern itself is applied per layer."""
    padding = None
    if attention_mask is not None and not bool(attention_mask.all()):
        if attention_mask.shape[-1] != kv_offset + kv_length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but the cache holds "
                f"{kv_length}: a bounded cache drops keys, so batches with padding cannot use it; "
                "decode the sequences one at a time, or use the default cache"
            )
        padding = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
    return SwapMask(padding, int(q_offset))


@functools.lru_cache(maxsize=64)
def _spec_from_json(text: str) -> SwapSpec:
    return SwapSpec.from_dict(json.loads(text))


def spec_of(config: Any) -> SwapSpec:
    """The swap recorded in ``config`` (parsed once per distinct record)."""
    record = getattr(config, CONFIG_KEY, None)
    if record is None:
        raise ValueError(
            f"{type(config).__name__} has attn_implementation={ATTN_NAME!r} but no "
            f"'{CONFIG_KEY}' record: swap it with longswap.swap_attention(model, pattern)"
        )
    return _spec_from_json(json.dumps(record, sort_keys=True))


def _shifting_padding(key_padding: Tensor) -> str | None:
    """What moves some row's tokens away from their positions: ``"left"`` padding (before
    the first real token), ``"inner"`` padding (between real tokens), or None."""
    gaps = ~key_padding[:, :-1] & key_padding[:, 1:]  # (B, L - 1): padding, then a token
    if not bool(gaps.any()):
        return None
    return "left" if bool((gaps & ~key_padding.cummax(-1).values[:, :-1]).any()) else "inner"


def _documents(position_ids: Tensor | None, key: Tensor, padding: Tensor | None) -> Tensor | None:
    """Document ids of packed sequences: positions that restart mark a new document.

    As transformers does for dense attention, packing is recognised only without a cache
    (positions cover every key) and without a padding mask.
    """
    if position_ids is None or padding is not None or position_ids.shape[-1] != key.shape[2]:
        return None
    restarts = position_ids[:, 1:] <= position_ids[:, :-1]
    if not bool(restarts.any()):
        return None
    starts = torch.nn.functional.pad(restarts, (1, 0)).long()
    return torch.cumsum(starts, dim=-1).expand(key.shape[0], -1)


def longswap_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: SwapMask | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention interface: q ``(B, Hq, L, D)``, k/v ``(B, Hkv, S, D)`` -> ``(B, L, Hq, D)``."""
    spec = spec_of(module.config)
    layer = module.layer_idx
    pattern = _for_heads(module, spec.pattern(layer), query.shape[1])
    if dropout:
        raise ValueError(
            f"layer {layer}: attention dropout {dropout} is not implemented by the sparse "
            "kernels; swap_attention turns it off, so something turned it back on"
        )
    device = query.device.type
    if torch.is_autocast_enabled(device):  # as SDPA does: one dtype, autocast's
        dtype = torch.get_autocast_dtype(device)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    softcap = softcap or None  # transformers passes 0 or None for "no cap"
    sinks = kwargs.get("s_aux")  # gpt-oss: one learned logit per query head
    padding = attention_mask.key_padding if isinstance(attention_mask, SwapMask) else None
    shift = None if padding is None or pattern.translation_invariant else _shifting_padding(padding)
    if shift == "left":
        raise ValueError(
            f"layer {layer}: {pattern} depends on absolute positions, and left padding shifts "
            "them differently per row; pad on the right (tokenizer.padding_side = 'right') or "
            "run the sequences one at a time"
        )
    if shift == "inner":
        raise ValueError(
            f"layer {layer}: {pattern} depends on absolute positions, and padding between real "
            "tokens shifts the later ones (generate continues a batch padded on the right "
            "after its padding); generate from prompts of one length, or one at a time"
        )
    dropped = 0
    if isinstance(attention_mask, SwapMask) and padding is None:
        dropped = attention_mask.q_offset + query.shape[2] - key.shape[2]
    if dropped > 0 and not pattern.translation_invariant and not isinstance(pattern, SlidingWindow):
        key, value, padding = _at_absolute_positions(key, value, dropped)
    cached = module.__dict__.pop(CACHE_LAYER_ATTR, None)  # a summarising cache layer
    observer, dense = getattr(module, OBSERVER_ATTR, None) or (None, False)
    call = functools.partial(
        _attend, module, spec, pattern, scaling, softcap, sinks, observer, dense
    )
    documents = _documents(kwargs.get("position_ids"), key, padding)
    if documents is None:
        return call(query, key, value, padding, cached).transpose(1, 2), None

    def attend(span: Span, q: Tensor, k: Tensor, v: Tensor, pad: Tensor | None) -> Tensor:
        return call(q, k, v, pad, None, span.start)

    # Packed documents: each one attends as a sequence of its own (``kernels.documents``).
    return per_document(attend, query, key, value, documents).transpose(1, 2), None


def _attend(
    module: nn.Module,
    spec: SwapSpec,
    pattern: Pattern,
    scaling: float | None,
    softcap: float | None,
    sinks: Tensor | None,
    observer: Observer | None,
    dense: bool,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    padding: Tensor | None,
    cached: Any,
    start: int = 0,
) -> Tensor:
    """One sequence's attention through ``pattern`` (dense where it shows every causal
    pair), handed to the observer; ``start``: where the sequence begins in its packed row."""
    # Where the pattern shows every causal pair (a short context), it is dense attention: no
    # selector runs (an observer still sees the scores of a learned selector).
    dense = dense or (observer is None and pattern.covers(key.shape[2]))
    scores = None
    if isinstance(pattern, Selection) and not dense:
        scores = _block_scores(module, pattern, query, key, None if padding is not None else cached)
    out = sparse_attention(
        query,
        key,
        value,
        full() if dense else pattern,
        backend=spec.backend,
        scale=scaling,
        key_padding_mask=padding,
        block_size=spec.block_size,
        block_scores=scores,
        softcap=softcap,
        sinks=sinks,
    )
    if observer is not None:
        observer(
            AttentionCall(
                module.layer_idx,
                pattern,
                query,
                key,
                value,
                out,
                scaling,
                scores,
                softcap,
                sinks,
                start,
            )
        )
    return out


def _at_absolute_positions(key: Tensor, value: Tensor, dropped: int) -> tuple[Tensor, ...]:
    """Keys and values of a cache that dropped its first ``dropped`` entries (transformers'
    own cache for a model's native sliding-window layers), behind as many masked zero
    entries: the pattern then sees every key at its absolute position. A pattern that
    depends on distances alone needs no such thing; longswap's own bounded cache keeps
    ``sliding_window``'s sinks and is read as consecutive by design (``swap.cache``)."""
    batch, heads, length = key.shape[:3]
    key, value = (
        torch.cat([x.new_zeros(batch, heads, dropped, x.shape[3]), x], 2) for x in (key, value)
    )
    padding = torch.ones(batch, dropped + length, dtype=torch.bool, device=key.device)
    padding[:, :dropped] = False
    return key, value, padding


def _block_scores(
    module: nn.Module, pattern: Selection, query: Tensor, key: Tensor, cached: Any
) -> Tensor | None:
    """A selection's block scores: the learned selector's (with their graph), or, with a
    summarising cache layer (``swap.cache.BlockSummaryLayer``), scores against its cached
    block summaries; None lets the pattern score the blocks itself."""
    if pattern.needs_selector:
        selector = getattr(module, SELECTOR_ATTR, None)
        if selector is None:
            raise ValueError(
                f"layer {module.layer_idx}: {pattern} scores blocks with a learned selector that "
                "this model lacks: load checkpoints with learned selection through "
                "longswap.load(path) (transformers' from_pretrained alone drops the selector's "
                "weights)"
            )
        summarize = selector.block_keys
        # The queries sit at the end of the keys: the gate skips blocks they cannot select.
        score = functools.partial(selector.score, offset=key.shape[2] - query.shape[2])
    else:
        summarize, score = pattern.block_keys, pattern.score_blocks
    if cached is not None:
        return score(query, cached.block_keys(key, summarize, pattern.block_size))
    return score(query, summarize(key)) if pattern.needs_selector else None


def register() -> None:
    """Make ``attn_implementation="longswap"`` known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, longswap_attention)
    AttentionMaskInterface.register(ATTN_NAME, longswap_mask)
