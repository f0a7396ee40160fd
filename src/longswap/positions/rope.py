"""RoPE scaling as pure functions of a model config: transformers computes the frequencies.

* ``linear``: position interpolation (Chen et al. 2023): positions divided by the factor.
* ``ntk``: NTK-aware scaling: the base grows to ``theta * factor ** (d / (d - 2))`` so high
  frequencies stay put and low ones stretch.
* ``yarn``: YaRN (Peng et al. 2023): per-frequency interpolation plus attention temperature.

``factor = max_length / trained_length``. The result is a new ``rope_parameters`` dict;
the rotary modules are rebuilt from the config by the swap.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from torch import nn

RopeKind = Literal["auto", "none", "linear", "ntk", "yarn"]
ROPE_KINDS: tuple[str, ...] = get_args(RopeKind)


def rotary_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The rotary-embedding modules of ``model`` (those holding an ``inv_freq`` buffer)."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "inv_freq")]


def rotary_dim(config: Any) -> int:
    """Number of rotated channels per head (partial rotary models rotate a share)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = getattr(config, "rope_parameters", None) or {}
    share = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return int(head_dim * share)


def rope_parameters(config: Any, kind: str, max_length: int, trained_length: int) -> dict[str, Any]:
    """New ``rope_parameters`` that stretch ``trained_length`` to ``max_length``."""
    params = dict(config.rope_parameters)
    if params.get("rope_type", "default") != "default":
        raise ValueError(
            f"the model already uses rope_type={params['rope_type']!r}; longswap only scales "
            "plain RoPE. Pass rope='none' to keep its positions as they are"
        )
    factor = max_length / trained_length
    if kind == "linear":
        return {**params, "rope_type": "linear", "factor": factor}
    if kind == "yarn":
        return {
            **params,
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": trained_length,
        }
    if kind == "ntk":
        dim = rotary_dim(config)
        return {**params, "rope_theta": params["rope_theta"] * factor ** (dim / (dim - 2))}
    raise ValueError(f"unknown RoPE scaling {kind!r}; choose one of linear, ntk, yarn")
