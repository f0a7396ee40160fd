"""longswap: swap dense attention for sparse attention in pre-trained language models.

The names below (and the subpackages) load on first use, so that the command line answers
``--help`` without importing torch. ``attn_implementation="longswap"`` is known to
transformers once ``longswap.swap`` is imported, which ``load`` and ``swap_attention`` do.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from longswap.kernels import sparse_attention
    from longswap.patterns import parse_pattern
    from longswap.swap import SwapReport, load, restore, save, swap_attention

__version__ = "0.1.0"
#: Public name -> the module that defines it.
_EXPORTS = {
    "SwapReport": "longswap.swap",
    "load": "longswap.swap",
    "parse_pattern": "longswap.patterns",
    "restore": "longswap.swap",
    "save": "longswap.swap",
    "sparse_attention": "longswap.kernels",
    "swap_attention": "longswap.swap",
}
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


def __getattr__(name: str) -> Any:
    """A public name or a subpackage, imported on first use."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names, loaded or not."""
    return sorted({*globals(), *_EXPORTS})
