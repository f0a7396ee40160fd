"""Training: pre-train the small dense base (fine-tuning the swapped model comes next)."""

from longswap.train.config import PretrainConfig
from longswap.train.pretrain import pretrain

__all__ = ["PretrainConfig", "pretrain"]
