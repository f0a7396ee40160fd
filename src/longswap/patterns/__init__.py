"""Attention patterns: what attends to what. Pure definitions, torch only, one per file.

Lower-case names are the constructors used in code and in pattern strings::

    from longswap.patterns import sliding_window
    p = sliding_window(window=512, sinks=4)
"""

from longswap.patterns.base import BlockStructure, Pattern, TileGrid
from longswap.patterns.bigbird import BigBird
from longswap.patterns.block_topk import BlockTopK, Selection
from longswap.patterns.compose import Intersection, SelectionUnion, Union
from longswap.patterns.dilated import Dilated
from longswap.patterns.full import Full
from longswap.patterns.learned_topk import LearnedTopK
from longswap.patterns.local_global import LocalGlobal
from longswap.patterns.parse import format_pattern, parse_pattern
from longswap.patterns.registry import REGISTRY
from longswap.patterns.shifted_groups import ShiftedGroups
from longswap.patterns.sliding_window import SlidingWindow

full = Full
sliding_window = SlidingWindow
dilated = Dilated
local_global = LocalGlobal
bigbird = BigBird
shifted_groups = ShiftedGroups
block_topk = BlockTopK
learned_topk = LearnedTopK

__all__ = [
    "REGISTRY",
    "BigBird",
    "BlockStructure",
    "BlockTopK",
    "Dilated",
    "Full",
    "Intersection",
    "LearnedTopK",
    "LocalGlobal",
    "Pattern",
    "Selection",
    "SelectionUnion",
    "ShiftedGroups",
    "SlidingWindow",
    "TileGrid",
    "Union",
    "bigbird",
    "block_topk",
    "dilated",
    "format_pattern",
    "full",
    "learned_topk",
    "local_global",
    "parse_pattern",
    "shifted_groups",
    "sliding_window",
]
