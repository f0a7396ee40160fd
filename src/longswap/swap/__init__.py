"""Where a pattern goes: into a Hugging Face model, per instance, reversibly, saved with it."""

from longswap.swap.attention import register
from longswap.swap.model import SwapReport, load, restore, swap_attention
from longswap.swap.spec import SwapSpec

register()

__all__ = ["SwapReport", "SwapSpec", "load", "restore", "swap_attention"]
