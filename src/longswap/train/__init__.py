"""Training: pre-train the small dense base; fine-tune swapped models for long contexts."""

from longswap.train.config import FinetuneConfig, PretrainConfig
from longswap.train.finetune import finetune
from longswap.train.pretrain import pretrain

__all__ = ["FinetuneConfig", "PretrainConfig", "finetune", "pretrain"]
