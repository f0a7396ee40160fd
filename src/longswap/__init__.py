"""longswap: swap dense attention for sparse attention in pre-trained language models."""

from longswap.kernels import sparse_attention
from longswap.patterns import parse_pattern
from longswap.swap import SwapReport, load, restore, save, swap_attention

__version__ = "0.1.0"
__all__ = [
    "SwapReport",
    "__version__",
    "load",
    "parse_pattern",
    "restore",
    "save",
    "sparse_attention",
    "swap_attention",
]
