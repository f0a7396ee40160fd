"""Measuring what a swap bought: perplexity, retrieval, selection, speed."""

from longswap.evaluate.perplexity import perplexity, select_targets

__all__ = ["perplexity", "select_targets"]
