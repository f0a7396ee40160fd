"""Position extension: RoPE scaling through the model's rope config, and learned positions."""

from longswap.positions.learned import find_position_embedding, tile_positions
from longswap.positions.rope import ROPE_KINDS, RopeKind, rope_parameters, rotary_modules

__all__ = [
    "ROPE_KINDS",
    "RopeKind",
    "find_position_embedding",
    "rope_parameters",
    "rotary_modules",
    "tile_positions",
]
