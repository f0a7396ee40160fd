"""longswap: swap dense attention for sparse attention in pre-trained language models."""

from longswap.kernels import sparse_attention
from longswap.patterns import parse_pattern

__version__ = "0.1.0"
__all__ = ["__version__", "parse_pattern", "sparse_attention"]
