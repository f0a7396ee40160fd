"""Measuring what a swap bought: perplexity, retrieval, speed; environment and memory."""

from longswap.evaluate.environment import environment, peak_memory, peak_rss_mb, reset_peak_rss
from longswap.evaluate.perplexity import perplexity, select_targets

__all__ = [
    "environment",
    "peak_memory",
    "peak_rss_mb",
    "perplexity",
    "reset_peak_rss",
    "select_targets",
]
