"""Where a pattern goes: into a Hugging Face model, per instance, reversibly, saved with it."""

from longswap.swap.attention import AttentionCall, Observer, register
from longswap.swap.cache import sparse_cache
from longswap.swap.model import (
    SwapReport,
    apply_spec,
    extend_positions,
    observe,
    restore,
    shard_heads,
    supported_length,
    swap_attention,
    swap_spec,
)
from longswap.swap.persist import load, save
from longswap.swap.spec import SwapSpec

register()

__all__ = [
    "AttentionCall",
    "Observer",
    "SwapReport",
    "SwapSpec",
    "apply_spec",
    "sparse_cache",
    "extend_positions",
    "load",
    "observe",
    "restore",
    "save",
    "shard_heads",
    "supported_length",
    "swap_attention",
    "swap_spec",
]
