"""Swap the attention of a Hugging Face causal LM, per instance and reversibly.

``swap_attention`` validates everything first, then changes the model in place: the
config records the swap (``config.longswap`` and ``attn_implementation="longswap"``),
positions are extended when asked, and attention dropout is turned off (the sparse
kernels have none). Every parameter of the model is kept as the new model's initial
value. ``restore`` undoes all of it from the record alone, so it also works on a model
loaded from a swapped checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from longswap.kernels import BACKENDS
from longswap.patterns import Intersection, Pattern, full, parse_pattern, sliding_window
from longswap.positions import ROPE_KINDS, apply_positions, plan_positions, undo_positions
from longswap.selectors import SELECTOR_ATTR, BlockGate
from longswap.swap.attention import Observer, observing, sharding_heads
from longswap.swap.spec import ATTN_NAME, CONFIG_KEY, SwapSpec

PatternSpec = Pattern | str | Sequence[Pattern | str] | Mapping[int, Pattern | str]
_DROPOUT_FIELDS = ("attention_dropout", "attn_pdrop")


@dataclass
class SwapReport:
    """What a swap changed."""

    model_type: str
    layers: list[str]
    backend: str
    positions: dict[str, Any]
    reused_parameters: int
    added_parameters: int
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"longswap: {self.model_type}, {len(self.layers)} layers, backend {self.backend}"]
        runs: list[tuple[int, int, str]] = []
        for i, text in enumerate(self.layers):
            if runs and runs[-1][2] == text:
                runs[-1] = (runs[-1][0], i, text)
            else:
                runs.append((i, i, text))
        for first, last, text in runs:
            span = f"layer {first}" if first == last else f"layers {first}-{last}"
            lines.append(f"  {span:14s} {text}")
        pos = self.positions
        lines.append(f"  positions      {pos.get('summary', pos.get('kind'))}")
        lines.append(
            f"  parameters     {self.reused_parameters:,} reused, {self.added_parameters:,} added"
        )
        lines += [f"  note           {n}" for n in self.notes]
        return "\n".join(lines)


def _base_model(model: Any) -> PreTrainedModel:
    """The transformers model inside ``model`` (unwrapping PEFT), or a clear error."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    supported = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if not isinstance(inner, PreTrainedModel):
        raise ValueError(
            f"expected a Hugging Face causal LM (a transformers PreTrainedModel), got "
            f"{type(model).__name__}"
        )
    if type(inner).__name__ not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        raise ValueError(
            f"{type(inner).__name__} is not a causal language model; longswap swaps the "
            f"attention of AutoModelForCausalLM classes (model types such as "
            f"{', '.join(supported[:12])}, ...)"
        )
    if not inner._can_set_attn_implementation():
        raise ValueError(
            f"{type(inner).__name__} ({inner.config.model_type}) computes attention in its own "
            "code instead of through transformers' AttentionInterface, so its attention "
            "cannot be swapped; supported are models whose attention goes through that "
            "interface (Llama, Mistral, Qwen2, Qwen3, GPT-2, GPT-NeoX, Phi-3 and most recent ones)"
        )
    return inner


def attention_modules(model: PreTrainedModel) -> dict[int, nn.Module]:
    """Self-attention modules by layer index."""
    found = {
        m.layer_idx: m
        for m in model.modules()
        if "Attention" in type(m).__name__ and isinstance(getattr(m, "layer_idx", None), int)
    }
    n = model.config.num_hidden_layers
    if sorted(found) != list(range(n)):
        raise ValueError(
            f"{type(model).__name__}: found attention modules for layers {sorted(found)}, "
            f"expected 0..{n - 1}; this architecture is not supported"
        )
    return found


def _layer_index(i: object, n: int, what: str) -> int:
    if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
        raise ValueError(f"{what}: layer index {i!r} is out of range for a model with {n} layers")
    return i % n


def _per_layer(
    pattern: PatternSpec, n: int, layers: Iterable[int] | None, full_layers: Iterable[int]
) -> list[Pattern]:
    """One pattern per layer from the user's forms, validated."""
    if isinstance(pattern, Mapping):
        chosen = [full()] * n
        for i, p in pattern.items():
            chosen[_layer_index(i, n, "pattern dict")] = parse_pattern(p)
    elif isinstance(pattern, (list, tuple)):
        if len(pattern) != n:
            raise ValueError(f"a list of patterns needs one per layer: {n}, got {len(pattern)}")
        chosen = [parse_pattern(p) for p in pattern]
    else:
        one = parse_pattern(pattern)
        chosen = [one] * n
    asked = any(p != full() for p in chosen)
    if layers is not None:
        layers = list(layers)
        keep = {_layer_index(i, n, "layers") for i in layers}
        chosen = [p if i in keep else full() for i, p in enumerate(chosen)]
    full_layers = list(full_layers)
    for i in full_layers:
        chosen[_layer_index(i, n, "full_layers")] = full()
    if asked and all(p == full() for p in chosen):
        raise ValueError(
            f"layers={layers} and full_layers={full_layers} leave every layer dense: nothing "
            "would be swapped; choose layers that take the pattern"
        )
    return chosen


def _native_windows(config: Any, n: int) -> list[int | None]:
    """Per layer, the sliding window the model itself applies (None for full attention)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window:
        return [None] * n
    if types is None:
        return [window] * n
    return [window if t == "sliding_attention" else None for t in types]


def _with_window(pattern: Pattern, window: int) -> Pattern:
    """``pattern`` restricted to a native sliding window (once, however often it is applied).

    A selection cannot be intersected with it: such a layer keeps the native window alone
    (it is already local, so there is nothing far away to select).
    """
    own = sliding_window(window)
    if pattern == full() or pattern.data_dependent:
        return own
    if pattern == own or (isinstance(pattern, Intersection) and own in pattern.parts):
        return pattern
    return pattern & own


def _zero_dropout(model: PreTrainedModel, modules: dict[int, nn.Module]) -> dict[str, float]:
    """Turn attention dropout off; return the original values by config field."""
    original = {
        name: float(getattr(model.config, name))
        for name in _DROPOUT_FIELDS
        if getattr(model.config, name, 0)
    }
    _put_dropout(model, modules, dict.fromkeys(original, 0.0))
    return original


def _put_dropout(
    model: PreTrainedModel, modules: dict[int, nn.Module], values: dict[str, float]
) -> None:
    """Set attention dropout in the config fields named in ``values`` and in the modules."""
    for name, p in values.items():
        setattr(model.config, name, p)
        for m in modules.values():
            if isinstance(getattr(m, "attention_dropout", None), float):
                m.attention_dropout = p
            if isinstance(getattr(m, "attn_dropout", None), nn.Dropout):
                m.attn_dropout.p = p


def swap_attention(
    model: Any,
    pattern: PatternSpec,
    *,
    backend: str = "auto",
    layers: Iterable[int] | None = None,
    full_layers: Iterable[int] = (),
    max_length: int | None = None,
    rope: str = "auto",
    block_size: int = 128,
) -> SwapReport:
    """Give ``model`` sparse attention, in place; every parameter carries over.

    ``pattern``: one pattern (object or string) for every layer, a list with one per layer,
    or a ``{layer: pattern}`` dict (other layers stay dense). ``layers`` limits the swap to
    some layers; ``full_layers`` keeps those dense (MoBA keeps its last layers dense).
    ``max_length``: the longest sequence the swapped model must handle; beyond the trained
    length, RoPE is scaled (``rope``: auto, none, linear, ntk, yarn) or learned positions
    are extended. Swapping a swapped model replaces its swap. Nothing changes when an
    argument is invalid.
    """
    inner = _base_model(model)
    config = inner.config
    n = config.num_hidden_layers
    modules = attention_modules(inner)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if rope not in ROPE_KINDS:
        raise ValueError(f"unknown rope {rope!r}; choose one of {', '.join(ROPE_KINDS)}")
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
    ):
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    chosen = _per_layer(pattern, n, layers, full_layers)
    notes = []
    for i, (p, window) in enumerate(zip(chosen, _native_windows(config, n), strict=True)):
        if window is not None:
            chosen[i] = _with_window(p, window)
            notes.append(f"layer {i} keeps the model's own sliding window of {window}")
            if p.data_dependent:
                notes[-1] += f" alone ({p} selects from the data: it cannot be intersected)"
    heads = config.num_attention_heads
    for i, p in enumerate(chosen):
        try:
            p.check_heads(heads)
        except ValueError as err:
            raise ValueError(f"layer {i}: {err} (the model has {heads} heads)") from None
    previous = getattr(config, CONFIG_KEY, None)
    old_spec = SwapSpec.from_dict(previous) if previous is not None else None
    trained = old_spec.positions["trained_length"] if old_spec else config.max_position_embeddings
    # A swapped model is planned from its trained positions, before anything is undone.
    trained_rope = old_spec.positions.get("original_rope_parameters") if old_spec else None
    positions = plan_positions(inner, chosen, max_length, rope, trained, trained_rope)

    # Validated: from here on the model changes.
    # Trained selectors survive a re-swap (restore removes them): matching ones are reused.
    kept = {i: getattr(m, SELECTOR_ATTR) for i, m in modules.items() if hasattr(m, SELECTOR_ATTR)}
    if old_spec is not None:
        restore(inner)
    added = apply_positions(inner, positions)
    added += attach_selectors(inner, modules, chosen, kept)
    dropout = _zero_dropout(inner, modules)
    if dropout:
        notes.append(f"attention dropout {dropout} turned off: the sparse kernels have none")
    spec = SwapSpec(
        layers=tuple(str(p) for p in chosen),
        backend=backend,
        block_size=block_size,
        positions=positions,
        attention_dropout=dropout,
        original_attn_implementation=config._attn_implementation or "sdpa",
    )
    setattr(config, CONFIG_KEY, spec.to_dict())
    config.attn_implementation = ATTN_NAME  # written to config.json, read back on load
    inner.set_attn_implementation(ATTN_NAME)
    total = sum(p.numel() for p in inner.parameters())
    return SwapReport(
        model_type=config.model_type,
        layers=list(spec.layers),
        backend=backend,
        positions=positions,
        reused_parameters=total - added,
        added_parameters=added,
        notes=notes,
    )


def _selector_shape(config: Any) -> tuple[int, int]:
    """``(head_dim, query heads per KV head)`` of a model's attention."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return head_dim, heads // (getattr(config, "num_key_value_heads", None) or heads)


def attach_selectors(
    model: PreTrainedModel,
    modules: dict[int, nn.Module],
    patterns: Sequence[Pattern],
    kept: Mapping[int, nn.Module] | None = None,
) -> int:
    """Give every layer whose pattern needs a selector a :class:`BlockGate` (reusing a
    matching one from ``kept``, so re-swapping keeps trained selectors); returns the number
    of parameters added."""
    head_dim, group = _selector_shape(model.config)
    added = 0
    for i, pattern in enumerate(patterns):
        if not pattern.needs_selector:
            continue
        gate = (kept or {}).get(i)
        shape = BlockGate.shape_for(pattern, head_dim, group)
        if not (isinstance(gate, BlockGate) and gate.shape == shape):
            device = next(modules[i].parameters()).device  # float32 whatever the model's dtype
            gate = BlockGate(*shape).to(device)
        modules[i].add_module(SELECTOR_ATTR, gate)
        added += sum(p.numel() for p in gate.parameters())
    return added


def observe(
    model: Any, observer: Observer, dense: bool = False
) -> contextlib.AbstractContextManager[None]:
    """A context in which every swapped attention call of ``model`` (PEFT-wrapped or not) is
    handed to ``observer`` as an :class:`AttentionCall`; ``dense``: the layers compute full
    attention meanwhile (see ``swap.attention.observing``)."""
    inner = _base_model(model)
    if getattr(inner.config, CONFIG_KEY, None) is None:
        raise ValueError(
            f"{type(inner).__name__} is not swapped: only swapped attention calls can be "
            "observed; swap it with longswap.swap_attention first"
        )
    return observing(attention_modules(inner).values(), observer, dense)


def shard_heads(model: Any, rank: int, size: int) -> contextlib.AbstractContextManager[None]:
    """A context in which ``model``'s attention calls (PEFT-wrapped or not) each hold the
    ``rank``-th of ``size`` shares of the query heads, as under DeepSpeed Ulysses sequence
    parallelism (see ``swap.attention.sharding_heads``)."""
    return sharding_heads(attention_modules(_base_model(model)).values(), rank, size)


def restore(model: Any) -> None:
    """Undo a swap: original attention, positions and dropout (logits as before the swap)."""
    inner = _base_model(model)
    config = inner.config
    record = getattr(config, CONFIG_KEY, None)
    if record is None:
        raise ValueError(f"{type(inner).__name__} is not swapped: nothing to restore")
    spec = SwapSpec.from_dict(record)
    undo_positions(inner, spec.positions)
    modules = attention_modules(inner)
    _put_dropout(inner, modules, dict(spec.attention_dropout))
    for module in modules.values():
        if hasattr(module, SELECTOR_ATTR):
            delattr(module, SELECTOR_ATTR)
    delattr(config, CONFIG_KEY)
    if "attn_implementation" in config.__dict__:
        del config.__dict__["attn_implementation"]
    inner.set_attn_implementation(spec.original_attn_implementation)


def apply_spec(model: Any, spec: SwapSpec) -> SwapReport:
    """Swap ``model`` as ``spec`` records (used to rebuild a swap saved beside an adapter)."""
    positions = spec.positions
    kind = positions.get("kind", "none")
    return swap_attention(
        model,
        list(spec.layers),
        backend=spec.backend,
        block_size=spec.block_size,
        max_length=positions.get("max_length") if kind != "none" else None,
        rope="auto" if kind == "learned" else kind,
    )


def extend_positions(model: Any, max_length: int, rope: str = "auto") -> dict[str, Any]:
    """Extend a dense model's positions to ``max_length`` without swapping its attention.

    The same rules as :func:`swap_attention` (``rope="auto"`` means YaRN here, since dense
    attention reaches every distance). Returns the record of what was done.
    """
    inner = _base_model(model)
    if getattr(inner.config, CONFIG_KEY, None) is not None:
        raise ValueError("the model is swapped: pass max_length to swap_attention instead")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    if rope not in ROPE_KINDS:
        raise ValueError(f"unknown rope {rope!r}; choose one of {', '.join(ROPE_KINDS)}")
    n = inner.config.num_hidden_layers
    record = plan_positions(
        inner, [full()] * n, max_length, rope, inner.config.max_position_embeddings
    )
    apply_positions(inner, record)
    return record


def supported_length(model: Any) -> int:
    """The longest sequence the model is set up for: its positions, or the swap's max_length."""
    inner = _base_model(model)
    record = getattr(inner.config, CONFIG_KEY, None)
    swapped = SwapSpec.from_dict(record).positions.get("max_length") if record else None
    return max(inner.config.max_position_embeddings, swapped or 0)


def swap_spec(model: Any) -> SwapSpec | None:
    """The swap of ``model`` (PEFT-wrapped or not), or None when it is not swapped."""
    record = getattr(_base_model(model).config, CONFIG_KEY, None)
    return None if record is None else SwapSpec.from_dict(record)
