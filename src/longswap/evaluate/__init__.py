"""Measuring what a swap bought: environment stamps and memory probes (more to come)."""

from longswap.evaluate.environment import environment, peak_rss_mb, reset_peak_rss

__all__ = ["environment", "peak_rss_mb", "reset_peak_rss"]
