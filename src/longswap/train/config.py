"""Typed training configurations; YAML files are saved instances of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from longswap.config import help_field
from longswap.kernels.api import Backend
from longswap.positions.rope import RopeKind

Size = Literal["tiny", "small", "base"]


@dataclass
class TrainingFields:
    """Fields every training run has."""

    out: str = help_field(
        "folder for the trained model (and checkpoints/ while training)", required=True, default=""
    )
    data: list[str] = help_field(
        "local .txt/.md/.py/.jsonl/.json/.parquet files or folders (see --text-field); "
        "empty: the embedded corpus (the Python standard library, its tests held out)",
        default_factory=list,
    )
    text_field: str = help_field(
        "column holding the text in .jsonl/.json/.parquet data", default="text"
    )
    seq_len: int = help_field("tokens per training sequence", default=512)
    separate_documents: bool = help_field(
        "keep attention inside each document of a packed sequence (positions restart at "
        "every document; dense and swapped models both honour it)",
        default=False,
    )
    steps: int = help_field("optimizer steps", default=1000)
    batch_size: int = help_field("sequences per step", default=16)
    learning_rate: float = help_field(
        "peak learning rate (cosine schedule after warm-up)", default=2e-3
    )
    warmup_steps: int = help_field("linear warm-up steps", default=50)
    weight_decay: float = help_field("AdamW weight decay", default=0.1)
    synthetic_ratio: float = help_field(
        "share of training sequences that are synthetic passkey and associative-recall "
        "tasks (training keys only; held-out keys stay for evaluation)",
        default=0.0,
    )
    validation_share: float = help_field("share of documents held out for validation", default=0.02)
    validation_sequences: int = help_field(
        "held-out sequences each evaluation scores (0: as many as fill 65,536 tokens, 1-64)",
        default=0,
    )
    eval_steps: int = help_field(
        "evaluate on the held-out share every this many steps", default=200
    )
    save_steps: int = help_field(
        "write a checkpoint (what --resume continues from) every this many steps; 0: at every "
        "evaluation (--eval-steps)",
        default=0,
    )
    no_checkpoints: bool = help_field(
        "write no checkpoint while training (a run that stops cannot --resume); the trained "
        "model is written at the end either way",
        default=False,
    )
    seed: int = help_field("random seed (data order and initial weights)", default=0)
    overwrite: bool = help_field("replace a non-empty --out", default=False)
    skip_budget_check: bool = help_field(
        "train without first estimating a step's memory and time (probe steps at the run's "
        "length; a step estimated not to fit is refused): a warning says so, and a step that "
        "does not fit fails with out-of-memory during training",
        default=False,
    )
    resume: bool = help_field("continue from the last checkpoint in --out", default=False)


@dataclass
class PretrainConfig(TrainingFields):
    """Pre-train a Llama-architecture, byte-level model with full attention, from scratch."""

    size: Size = help_field(
        "model size: tiny (~0.8M parameters), small (~3M), base (~5M)", default="tiny"
    )


Method = Literal["lora-plus", "full", "attention", "selector"]


@dataclass
class FinetuneConfig(TrainingFields):
    """Fine-tune a (swapped) model on long sequences."""

    @property
    def positions_length(self) -> int:
        """The length the model's positions are set up for: ``max_length``, at least
        ``seq_len``."""
        return max(self.seq_len, self.max_length)

    model: str = help_field(
        "checkpoint to start from: a model folder, a longswap LoRA output or a .gguf file",
        required=True,
        default="",
    )
    pattern: str = help_field(
        "swap to this pattern first (e.g. 'sliding_window(window=512)'); empty: keep the "
        "model's attention (a swapped model keeps its pattern)",
        default="",
    )
    full_layers: list[int] = help_field(
        "layers kept dense when --pattern swaps (e.g. -1)", default_factory=list
    )
    backend: Backend = help_field("attention backend", default="auto")
    rope: RopeKind = help_field("position extension beyond the trained length", default="auto")
    max_length: int = help_field(
        "extend positions to this length while training at --seq-len (e.g. fine-tune at 4096 "
        "a model to be used at 16384); 0: --seq-len",
        default=0,
    )
    # A pre-trained model is fine-tuned, not trained from scratch: a smaller step and one
    # long sequence per step (pre-training's defaults are for the small model from scratch).
    batch_size: int = help_field(
        "sequences per step (one long sequence at a time: long sequences fill memory)", default=1
    )
    learning_rate: float = help_field(
        "peak learning rate (cosine schedule after warm-up); 2e-4 suits LoRA+ (the adapters' "
        "usual rate, which moves a pre-trained model without undoing it); take about 2e-5 "
        "with --method full and about 5e-3 with --method selector (small gates trained alone)",
        default=2e-4,
    )
    method: Method = help_field(
        "trainable parameters: lora-plus (LoRA on attention + embeddings and norms), full, "
        "attention (attention projections only), or selector (only the learned selectors of "
        "a learned_topk swap, distilled from dense attention, base frozen: the warm-up); "
        "learned selectors also train under the other methods, on their selected blocks",
        default="lora-plus",
    )
    selector_rows: int = help_field(
        "query rows per sequence whose dense targets train the learned selectors in a step: "
        "drawn from targets computed once per sequence in the warm-up (--method selector), "
        "computed for those rows alone when the selectors train along with the model",
        default=1024,
    )
    selector_reuse: int = help_field(
        "selector warm-up: steps taken from each sequence's dense targets before the next "
        "sequence is read (its forward and dense attention, computed once, are most of the "
        "cost; a step from them costs little)",
        default=20,
    )
    lora_rank: int = help_field("LoRA rank", default=8)
    lora_alpha: int = help_field("LoRA alpha", default=16)
    merge: bool = help_field("merge LoRA into the weights when saving", default=False)
    gradient_checkpointing: bool = help_field(
        "recompute activations in the backward pass", default=False
    )
    dtype: Literal["float32", "bfloat16"] = help_field(
        "weights of the model as loaded: bfloat16 halves its memory and, on CPUs with AMX or "
        "on GPUs, much of its time; learned selectors always stay float32 (the selector "
        "warm-up trains only them). The saved model keeps this dtype",
        default="float32",
    )
    transfer_steps: int = help_field(
        "attention-transfer warm-up steps before the language-model loss: each sparse layer "
        "learns to reproduce dense attention's output (LoLCATs-style); needs a swap",
        default=0,
    )
    kl_weight: float = help_field(
        "share w of the loss that learns from the dense parent (the same weights with full "
        "attention; with LoRA+ the model with its adapters disabled, otherwise a frozen "
        "copy): (1 - w) * LM loss + w * KL(parent || model) of the next-token "
        "distributions at every position; 0: the LM loss alone",
        default=0.0,
    )
    dense_fraction: float = help_field(
        "share of the first steps trained with full attention before the sparse pattern "
        "takes over (MoBA's hybrid schedule)",
        default=0.0,
    )
    deepspeed: str = help_field(
        "run on DeepSpeed: zero1 (optimizer state sharded over the processes), zero2 (and "
        "gradients), zero3 (and parameters), zero0, or a DeepSpeed JSON config file; launch "
        "with torchrun or accelerate launch. Empty: no DeepSpeed",
        default="",
    )
    sequence_parallel: int = help_field(
        "split every sequence over this many processes (DeepSpeed Ulysses: each holds "
        "seq_len/N tokens, and attends over the whole sequence with 1/N of the heads); runs "
        "on DeepSpeed ZeRO stage 3",
        default=1,
    )
