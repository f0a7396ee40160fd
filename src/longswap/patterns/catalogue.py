"""One example of each pattern, with a line on where it comes from (README and plots)."""

from __future__ import annotations

from longswap.patterns.base import Pattern
from longswap.patterns.bigbird import BigBird
from longswap.patterns.block_topk import BlockTopK
from longswap.patterns.dilated import Dilated
from longswap.patterns.full import Full
from longswap.patterns.learned_topk import LearnedTopK
from longswap.patterns.local_global import LocalGlobal
from longswap.patterns.shifted_groups import ShiftedGroups
from longswap.patterns.sliding_window import SlidingWindow

CATALOGUE: dict[str, tuple[Pattern, str]] = {
    "full": (Full(), "causal dense attention: the baseline and the identity swap"),
    "sliding_window": (
        SlidingWindow(window=256, sinks=16),
        "Mistral's sliding window; with sinks, StreamingLLM's attention sinks",
    ),
    "dilated": (Dilated(window=64, dilation=8), "every dilation-th earlier key (LongNet-style)"),
    "local_global": (
        LocalGlobal(window=128, global_tokens=(0, 1, 2, 3, 1024, 1025)),
        "Longformer: a window plus global positions seen by, and seeing, everything causal",
    ),
    "bigbird": (
        BigBird(block_size=128, window_blocks=1, global_blocks=1, random_blocks=2, seed=0),
        "BigBird block-sparse: neighbour, global and seeded random blocks, made causal",
    ),
    "shifted_groups": (
        ShiftedGroups(group_size=512),
        "LongLoRA's S2-Attn: groups, shifted by half a group in the second half of the heads",
    ),
    "block_topk": (
        BlockTopK(block_size=128, top_k=3),
        "MoBA: own block plus the top-k earlier blocks by mean-pooled key score, per token",
    ),
    "learned_topk": (
        LearnedTopK(block_size=64, top_k=16),
        "DSA / SeerAttention-R: own block plus the top-k blocks a learned gate scores, per "
        "KV group (a selector per layer, distilled from dense attention); usually united with a "
        "window: sliding_window(window=512, sinks=4) | learned_topk(block_size=64, top_k=16)",
    ),
}
