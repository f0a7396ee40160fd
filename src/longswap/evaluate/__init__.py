"""Measuring what a swap bought: environment stamps and memory probes (more to come)."""

from longswap.evaluate.environment import environment, peak_rss_mb, reset_peak_rss
from longswap.evaluate.perplexity import perplexity

__all__ = ["environment", "peak_rss_mb", "perplexity", "reset_peak_rss"]
