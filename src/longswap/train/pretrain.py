"""Pre-train a small dense Llama on bytes, with the Hugging Face Trainer.

This is the first step of the method at small scale: the model that the embedded demo
starts from, and a base for controlled studies. The output folder is a normal Hugging
Face checkpoint (model, byte tokenizer) plus ``longswap_train.json`` with the exact
configuration, command and final metrics.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from longswap.data import (
    byte_tokenizer,
    local_documents,
    pack_documents,
    split_documents,
    stdlib_documents,
)
from longswap.data.corpus import Document
from longswap.evaluate import environment
from longswap.train.config import PretrainConfig

#: Llama shapes by size name: hidden, layers, heads, key/value heads.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (128, 4, 4, 2),
    "small": (256, 4, 8, 4),
    "base": (256, 6, 8, 4),
}


class PackedDataset(Dataset):
    """Fixed-length byte sequences for causal language modelling."""

    def __init__(self, input_ids: torch.Tensor) -> None:
        self.input_ids = input_ids

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        return {"input_ids": ids, "labels": ids}


def problems(config: PretrainConfig) -> list[str]:
    """Everything wrong with ``config``, so that one message can list it all."""
    found = []
    if not config.out:
        found.append("--out is required")
    else:
        out = Path(config.out)
        if out.exists() and not out.is_dir():
            found.append(f"--out {out} exists and is not a folder")
        elif out.is_dir() and any(out.iterdir()) and not (config.overwrite or config.resume):
            found.append(f"--out {out} is not empty; pass --resume to continue or --overwrite")
        if config.resume and not (out / "checkpoints").is_dir():
            found.append(f"--resume: {out}/checkpoints holds no checkpoint to resume from")
    for path in config.data:
        if not Path(path).exists():
            found.append(f"data path {path} does not exist")
    for name, low in (("seq_len", 8), ("steps", 1), ("batch_size", 1), ("eval_steps", 1)):
        value = getattr(config, name)
        if not isinstance(value, int) or value < low:
            found.append(f"{name} must be an integer >= {low}, got {value!r}")
    if config.size not in SIZES:
        found.append(f"size must be one of {', '.join(SIZES)}, got {config.size!r}")
    if not config.learning_rate > 0:
        found.append(f"learning_rate must be positive, got {config.learning_rate!r}")
    if not 0 < config.validation_share < 1:
        found.append(f"validation_share must be in (0, 1), got {config.validation_share!r}")
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


def _packed(docs: list[Document], seq_len: int, eos: int) -> torch.Tensor:
    # Exactly what the byte tokenizer produces, without its per-call overhead.
    ids = [np.frombuffer(d.text.encode("utf-8"), dtype=np.uint8) for d in docs]
    return pack_documents(ids, seq_len, eos).input_ids


def pretrain(config: PretrainConfig) -> dict[str, Any]:
    """Train and save; returns the final metrics (also written to ``longswap_train.json``)."""
    found = problems(config)
    if found:
        raise ValueError("invalid pre-training configuration:\n- " + "\n- ".join(found))
    out = Path(config.out)
    if config.overwrite and out.is_dir() and not config.resume:
        shutil.rmtree(out)
    tokenizer = byte_tokenizer()
    docs = local_documents(config.data) if config.data else stdlib_documents("train")
    train_docs, val_docs = split_documents(docs, config.validation_share)
    if not val_docs:
        val_docs, train_docs = train_docs[-1:], train_docs[:-1]
    train = PackedDataset(_packed(train_docs, config.seq_len, tokenizer.eos_token_id))
    val = PackedDataset(_packed(val_docs, config.seq_len, tokenizer.eos_token_id)[:64])
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(model_config(config.size, config.seq_len, len(tokenizer)))
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=max(1, min(50, config.steps // 20)),
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.eval_steps,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    trainer.train(resume_from_checkpoint=True if config.resume else None)
    metrics = trainer.evaluate()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    record = {
        "config": config.__dict__,
        "command": "longswap " + " ".join(sys.argv[1:]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_sequences": len(train),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "eval_loss": metrics["eval_loss"],
        "eval_bits_per_byte": metrics["eval_loss"] / math.log(2),
        "environment": environment(),
    }
    trainer.save_model(str(out))
    tokenizer.save_pretrained(out)
    (out / "longswap_train.json").write_text(json.dumps(record, indent=1))
    return record
