"""What a swap records in ``config.json``: one pattern per layer, the backend, the positions.

The record lives under the ``longswap`` key of the model's config, as plain JSON, next
to ``"attn_implementation": "longswap"``. Patterns are written in the pattern syntax of
:mod:`longswap.patterns.parse`, so the file can be read and edited by hand.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

from longswap.patterns import Pattern, parse_pattern

#: Version of the record; bump when its meaning changes.
SPEC_VERSION = 1
#: Key of the record in the model config.
CONFIG_KEY = "longswap"
#: Name under which longswap registers its attention with transformers.
ATTN_NAME = "longswap"


@dataclass(frozen=True)
class SwapSpec:
    """A swap, as saved in the model config.

    ``layers[i]`` is layer ``i``'s pattern string; ``full()`` for a layer kept dense.
    ``positions`` records the position extension (``{"kind": "none"}`` when there is none).
    ``attention_dropout`` holds the dropout the swap turned off, by config field.
    ``original_attn_implementation`` is what ``restore`` goes back to.
    """

    layers: tuple[str, ...]
    backend: str = "auto"
    block_size: int = 128
    positions: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    attention_dropout: dict[str, float] = field(default_factory=dict)
    original_attn_implementation: str = "sdpa"
    version: int = SPEC_VERSION

    def pattern(self, layer: int) -> Pattern:
        """The parsed pattern of ``layer``."""
        return _parsed(self.layers[layer])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = dataclasses.asdict(self)
        out["layers"] = list(self.layers)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SwapSpec:
        """Read a record; a newer or malformed one raises ValueError saying what is wrong."""
        if not isinstance(data, dict) or "layers" not in data:
            raise ValueError(f"config.{CONFIG_KEY} is not a longswap record: {data!r}")
        if data.get("version", SPEC_VERSION) > SPEC_VERSION:
            raise ValueError(
                f"config.{CONFIG_KEY} was written by a newer longswap (record version "
                f"{data['version']}, this one reads {SPEC_VERSION}); upgrade longswap"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        spec = cls(**{k: v for k, v in data.items() if k in known})
        spec = dataclasses.replace(spec, layers=tuple(spec.layers))
        for text in spec.layers:
            parse_pattern(text)  # fail now, with the parser's message, not mid-forward
        return spec


@functools.lru_cache(maxsize=256)
def _parsed(text: str) -> Pattern:
    return parse_pattern(text)
