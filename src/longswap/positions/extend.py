"""Extending a model's positions, and undoing it, from a JSON record of what was done."""

from __future__ import annotations

import copy
from typing import Any

from transformers import PreTrainedModel

from longswap.patterns import Pattern
from longswap.positions.learned import find_position_embedding, tile_positions
from longswap.positions.rope import rope_parameters, rotary_modules

#: The longest extension planned: positions are computed in float32 (rotary angles in
#: transformers), which holds every integer only up to 2**24.
MAX_LENGTH = 2**24


def plan_positions(
    model: PreTrainedModel,
    patterns: list[Pattern],
    max_length: int | None,
    rope: str,
    trained: int,
    trained_rope: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Decide how to reach ``max_length`` (nothing changes here); returns a JSON record.

    ``rope="auto"`` keeps RoPE when every pattern in ``patterns`` reaches back less than
    the trained length, and uses YaRN otherwise; learned tables are tiled.
    ``trained_rope``: the RoPE parameters the model was trained with, when its config
    holds scaled ones (planning a new swap of a swapped model). A ``max_length`` beyond
    :data:`MAX_LENGTH` raises ValueError.
    """
    if max_length is None or max_length <= trained:
        return {
            "kind": "none",
            "trained_length": trained,
            "summary": f"unchanged (trained length {trained})",
        }
    if max_length > MAX_LENGTH:
        raise ValueError(
            f"max_length {max_length:,} is beyond {MAX_LENGTH:,} (2**24) tokens, "
            f"{max_length / trained:,.0f} times the trained {trained:,}: positions are computed "
            "in float32, which cannot tell apart the positions of longer sequences; choose "
            "the longest length the model must serve"
        )
    config = model.config
    if rotary_modules(model):
        if trained_rope is not None:
            config = copy.deepcopy(config)
            config.rope_parameters = dict(trained_rope)
        kind = rope
        if rope == "auto":
            reaches = [p.reach() for p in patterns]
            if all(r is not None and r < trained for r in reaches):
                kind = "none"
                why = f"every layer reaches at most {max(reaches)} back, within {trained}"
            else:
                kind, why = "yarn", "some layer reaches beyond the trained length"
        else:
            why = "requested"
        record: dict[str, Any] = {
            "kind": kind,
            "trained_length": trained,
            "max_length": max_length,
            "original_rope_parameters": dict(config.rope_parameters),
        }
        if kind != "none":
            record["rope_parameters"] = rope_parameters(config, kind, max_length, trained)
            check_rope(config, record["rope_parameters"], max_length, kind)
        record["summary"] = f"RoPE {kind} to {max_length} (trained {trained}): {why}"
        return record
    if find_position_embedding(model, config) is not None:
        if rope not in ("auto", "none"):
            raise ValueError(
                f"{type(model).__name__} has learned position embeddings, not RoPE; "
                f"rope={rope!r} does not apply (use rope='auto')"
            )
        return {
            "kind": "learned",
            "trained_length": trained,
            "max_length": max_length,
            "summary": f"learned positions tiled from {trained} to {max_length} rows",
        }
    return {
        "kind": "none",
        "trained_length": trained,
        "max_length": max_length,
        "summary": "no position table or RoPE found: nothing to extend",
    }


def check_rope(config: Any, params: dict[str, Any], max_length: int, kind: str) -> None:
    """Let transformers validate the new RoPE settings on a copy of the config."""
    trial = copy.deepcopy(config)
    trial.rope_parameters = params
    trial.max_position_embeddings = max_length
    try:
        if hasattr(trial, "validate"):
            trial.validate()
    except Exception as err:  # transformers raises several types here
        raise ValueError(
            f"{config.model_type} does not accept RoPE scaling {kind!r} ({err}); choose "
            "another rope= value, or rope='none' with a pattern whose reach stays within the "
            "trained length"
        ) from None


def set_rope(model: PreTrainedModel, params: dict[str, Any], max_length: int) -> None:
    """Write ``params`` into the config and rebuild the rotary modules from it."""
    model.config.rope_parameters = params
    model.config.max_position_embeddings = max_length
    for name, module in rotary_modules(model):
        fresh = type(module)(config=module.config).to(module.inv_freq.device)
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], fresh)


def _resize_learned(model: PreTrainedModel, length: int) -> int:
    """Give the learned position table ``length`` rows; returns the parameters added."""
    parent, attr = find_position_embedding(model, model.config)
    old = getattr(parent, attr)
    setattr(parent, attr, tile_positions(old, length))
    model.config.max_position_embeddings = length
    return (length - old.num_embeddings) * old.embedding_dim


def apply_positions(model: PreTrainedModel, record: dict[str, Any]) -> int:
    """Apply a position record; returns the number of parameters added."""
    kind = record["kind"]
    if kind in ("linear", "ntk", "yarn"):
        set_rope(model, record["rope_parameters"], record["max_length"])
    elif kind == "learned":
        return _resize_learned(model, record["max_length"])
    elif "original_rope_parameters" in record:  # RoPE kept: the model now serves max_length
        model.config.max_position_embeddings = record["max_length"]
    return 0


def undo_positions(model: PreTrainedModel, record: dict[str, Any]) -> None:
    """Return to the trained positions described by ``record``."""
    kind = record["kind"]
    if kind in ("linear", "ntk", "yarn"):
        set_rope(model, record["original_rope_parameters"], record["trained_length"])
    elif kind == "learned":
        _resize_learned(model, record["trained_length"])
    elif "original_rope_parameters" in record:
        model.config.max_position_embeddings = record["trained_length"]
