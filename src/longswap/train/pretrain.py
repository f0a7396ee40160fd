"""Pre-train a small dense Llama on bytes, with the Hugging Face Trainer.

This is the first step of the method at small scale: the model that the embedded demo
starts from, and a base for controlled studies. The output folder is a normal Hugging
Face checkpoint (model, byte tokenizer) plus ``longswap_train.json`` with the exact
configuration, command and final metrics.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longswap.data import byte_tokenizer
from longswap.train.common import common_problems, refuse, run_folder
from longswap.train.config import PretrainConfig
from longswap.train.data import datasets
from longswap.train.distributed import main_process
from longswap.train.runner import train, write_record

#: Llama shapes by size name: hidden, layers, heads, key/value heads.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (128, 4, 4, 2),
    "small": (256, 4, 8, 4),
    "base": (256, 6, 8, 4),
}


def problems(config: PretrainConfig) -> list[str]:
    """Everything wrong with ``config``, so that one message can list it all."""
    found = common_problems(config)
    if config.size not in SIZES:
        found.append(f"size must be one of {', '.join(SIZES)}, got {config.size!r}")
    return found


def model_config(size: str, seq_len: int, vocab_size: int) -> LlamaConfig:
    """The Llama configuration of a size name."""
    hidden, layers, heads, kv_heads = SIZES[size]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
    )


def pretrain(config: PretrainConfig) -> dict[str, Any]:
    """Train and save; returns the final metrics (also written to ``longswap_train.json``)."""
    refuse(problems(config), "pre-training")
    tokenizer = byte_tokenizer()
    train_set, val_set = datasets(config, tokenizer)
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(model_config(config.size, config.seq_len, len(tokenizer)))
    with run_folder(config) as out:
        trainer, record = train(model, train_set, val_set, config, out)
        record["eval_bits_per_byte"] = record["eval_bits_per_token"]  # one token per byte
        state = trainer.accelerator.get_state_dict(trainer.model)  # every process: gathered
        if main_process():
            model.save_pretrained(out, state_dict=state)
            tokenizer.save_pretrained(out)
            write_record(out, record)
    return record
