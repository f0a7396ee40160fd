"""Position extension: RoPE scaling through the model's rope config, and learned positions."""

from longswap.positions.extend import apply_positions, plan_positions, undo_positions
from longswap.positions.learned import find_position_embedding, tile_positions
from longswap.positions.rope import ROPE_KINDS, RopeKind, rope_parameters, rotary_modules

__all__ = [
    "ROPE_KINDS",
    "RopeKind",
    "apply_positions",
    "find_position_embedding",
    "plan_positions",
    "rope_parameters",
    "rotary_modules",
    "tile_positions",
    "undo_positions",
]
