"""Fine-tune a swapped (or dense) model on long sequences, with the Hugging Face Trainer.

The third step of the method: the swapped model starts from the dense model's parameters
and continues training at the long length. ``--pattern`` swaps first; a model that is
already swapped keeps its pattern; a dense model stays dense (the baseline), with its
positions extended when the length needs it.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from longswap.checkpoint import model_problem
from longswap.data.tokenizer import tokenizer_for
from longswap.environment import bfloat16_warning
from longswap.io import TOKENIZER_FILES, write_checkpoint
from longswap.kernels import BACKENDS
from longswap.patterns import Pattern, parse_pattern
from longswap.positions import ROPE_KINDS, find_position_embedding, rotary_modules
from longswap.selectors import SELECTOR_ATTR
from longswap.swap import extend_positions, load, shard_heads, swap_attention
from longswap.swap.model import attention_modules
from longswap.swap.persist import write_adapter
from longswap.swap.spec import ATTN_NAME, CONFIG_KEY, SwapSpec
from longswap.train.common import common_problems, refuse, run_folder
from longswap.train.config import FinetuneConfig
from longswap.train.data import datasets
from longswap.train.distributed import (
    deepspeed_arguments,
    deepspeed_problems,
    gathered,
    head_share,
    heads_problems,
    main_process,
    zero_stage,
)
from longswap.train.recovery import DenseParent, recovery_problems
from longswap.train.runner import Joint, SelectorStage, WarmUp, train, write_record
from longswap.train.trainable import apply_method, projection_names

METHODS = ("lora-plus", "full", "attention", "selector")


def problems(config: FinetuneConfig) -> list[str]:
    """Everything wrong with ``config`` that can be told without training."""
    found = common_problems(config)
    if not config.model:
        found.append("--model is required")
    elif problem := model_problem(config.model):
        found.append(problem)
    if config.method not in METHODS:
        found.append(f"method must be one of {', '.join(METHODS)}, got {config.method!r}")
    if config.backend not in BACKENDS:
        found.append(f"backend must be one of {', '.join(BACKENDS)}, got {config.backend!r}")
    if config.dtype not in ("float32", "bfloat16"):
        found.append(f"dtype must be float32 or bfloat16, got {config.dtype!r}")
    if config.rope not in ROPE_KINDS:
        found.append(f"rope must be one of {', '.join(ROPE_KINDS)}, got {config.rope!r}")
    if not 0 <= config.dense_fraction < 1:
        found.append(f"dense_fraction must be in [0, 1), got {config.dense_fraction!r}")
    if not isinstance(config.transfer_steps, int) or config.transfer_steps < 0:
        found.append(f"transfer_steps must be an integer >= 0, got {config.transfer_steps!r}")
    elif (
        config.transfer_steps
        and isinstance(config.steps, int)
        and config.transfer_steps >= config.steps
    ):
        found.append(
            f"transfer_steps ({config.transfer_steps}) must be fewer than steps ({config.steps})"
        )
    if config.dense_fraction and config.transfer_steps:
        found.append(
            "--dense-fraction and --transfer-steps both claim the first steps (full attention; "
            "sparse layers taught dense attention's outputs): pass one of the two"
        )
    found += deepspeed_problems(config.deepspeed, config.sequence_parallel)
    found += recovery_problems(config)
    if config.transfer_steps and zero_stage(config.deepspeed, config.sequence_parallel) == 3:
        found.append(
            "--transfer-steps on ZeRO stage 3 (which --sequence-parallel runs on too): attention "
            "transfer's loss comes from the attention outputs alone, and ZeRO-3 fails when a "
            "forward's later layers get no backward ('active_backward_submodules is empty'); "
            "warm up without it, then fine-tune from the warmed-up model"
        )
    if isinstance(config.sequence_parallel, int) and config.sequence_parallel > 1:
        found += _sequence_parallel_problems(config)
    if config.merge and config.method != "lora-plus":
        found.append(
            f"--merge merges a LoRA adapter into the weights, and --method {config.method} "
            "trains none: leave out --merge"
        )
    if not isinstance(config.max_length, int) or config.max_length < 0:
        found.append(f"max_length must be an integer >= 0, got {config.max_length!r}")
    elif isinstance(config.seq_len, int) and 0 < config.max_length < config.seq_len:
        found.append(
            f"--max-length {config.max_length} is shorter than --seq-len {config.seq_len}: "
            "the positions must cover the training sequences; raise it, or leave it out"
        )
    for name in ("lora_rank", "lora_alpha", "selector_rows", "selector_reuse"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            found.append(f"{name} must be a positive integer, got {value!r}")
    if config.pattern:
        try:
            pattern = parse_pattern(config.pattern)
        except ValueError as err:
            found.append(str(err))
        else:
            if isinstance(config.seq_len, int) and config.seq_len > 0:
                found += length_problems(pattern, config.seq_len, "--seq-len")
    return found


def length_problems(pattern: Pattern, length: int, flag: str) -> list[str]:
    """Why ``pattern`` is pointless at ``length`` tokens (set by ``flag``): it shows every
    query every earlier token (dense attention at a sparse pattern's cost; a learned
    selector would have no block to select and train on nothing)."""
    if not pattern.covers(length):
        return []
    reach = pattern.reach()
    how = f" (it reaches {reach} tokens back)" if reach is not None else ""
    idle = "; its learned selector would train on nothing" if pattern.needs_selector else ""
    return [
        f"{pattern} shows every query every earlier token at {length} tokens ({flag}){how}: "
        f"it skips nothing there (dense attention at a sparse pattern's cost{idle}); shorten "
        f"the window, select fewer blocks, or raise {flag}"
    ]


def _sequence_parallel_problems(config: FinetuneConfig) -> list[str]:
    """What cannot run with the sequence split over processes."""
    found = []
    if isinstance(config.seq_len, int) and config.seq_len % config.sequence_parallel:
        found.append(
            f"seq_len {config.seq_len} must be a multiple of --sequence-parallel "
            f"{config.sequence_parallel}: each process holds an equal share of every sequence"
        )
    if config.method == "selector":
        found.append(
            "the selector warm-up (--method selector) reads whole sequences without gradients "
            "through the frozen model; run it without --sequence-parallel"
        )
    if config.dense_fraction:
        found.append(
            "--dense-fraction switches to the model's own attention, which sequence "
            "parallelism does not wrap (it wraps longswap's): drop one of the two"
        )
    return found


def _model_problems(model: Any, config: FinetuneConfig) -> list[str]:
    found = []
    trained = model.config.max_position_embeddings
    extendable = rotary_modules(model) or find_position_embedding(model, model.config)
    longest, flag = config.positions_length, "max_length" if config.max_length else "seq_len"
    if longest > trained and config.rope == "none" and not rotary_modules(model):
        found.append(
            f"{flag} {longest} is beyond the {trained} learned positions and "
            "rope='none' forbids extending them"
        )
    if longest > trained and not extendable:
        found.append(f"{flag} {longest} is beyond the model's {trained} positions")
    record = getattr(model.config, CONFIG_KEY, None)
    layers = (
        [config.pattern] if config.pattern else SwapSpec.from_dict(record).layers if record else []
    )
    if config.method == "selector" and not any(parse_pattern(p).needs_selector for p in layers):
        found.append(
            "method 'selector' trains learned selectors, which this run has none of: pass "
            '--pattern "learned_topk(block_size=64, top_k=16)" or a model swapped to it'
        )
    learned = any(hasattr(m, SELECTOR_ATTR) for m in attention_modules(model).values())
    learned = learned or any(parse_pattern(p).needs_selector for p in layers)
    if not config.pattern:  # a swapped model's own pattern (--pattern is checked first)
        for text in dict.fromkeys(layers):
            found += length_problems(parse_pattern(text), config.seq_len, "--seq-len")
    found += heads_problems(model.config.get_text_config(), config.sequence_parallel, learned)
    if config.method not in ("full", "selector") and not projection_names(model):
        found.append(f"{type(model).__name__} has no attention projections for {config.method}")
    swapped = getattr(model.config, CONFIG_KEY, None) is not None or bool(config.pattern)
    if config.full_layers and not swapped:
        found.append(
            "--full-layers keeps layers dense when a pattern is swapped in, and this model is "
            "dense and no --pattern is given: pass --pattern, or leave out --full-layers"
        )
    for flag, what in (("dense_fraction", "switches to"), ("transfer_steps", "trains")):
        if getattr(config, flag) and not swapped:
            found.append(
                f"--{flag.replace('_', '-')} {what} sparse attention, and this model is dense: "
                "pass --pattern, or a model swapped with `longswap swap`"
            )
        if getattr(config, flag) and config.method == "selector":
            found.append(
                f"--{flag.replace('_', '-')} shapes the model's first steps, and the selector "
                "warm-up (--method selector) trains only the selectors, base frozen: warm up "
                "without it, then fine-tune the warmed-up model with it"
            )
    if config.sequence_parallel > 1 and config.separate_documents and not swapped:
        found.append(
            "--separate-documents with --sequence-parallel needs a swapped model: the dense "
            "attention that sequence parallelism wraps ignores where documents start"
        )
    # RoPE kept as trained (--rope none) changes no position: the adapter carries the run.
    kept = config.rope == "none" and bool(rotary_modules(model))
    if (
        config.method == "lora-plus"
        and not config.merge
        and not swapped
        and not kept
        and (config.positions_length > trained)
    ):
        found.append(
            "a dense model fine-tuned beyond its trained length changes its positions, "
            "which a LoRA adapter alone cannot carry: pass --merge"
        )
    return found


class DenseFirst(TrainerCallback):
    """MoBA's hybrid schedule: full attention for the first ``switch`` steps.

    Switches through transformers' public ``set_attn_implementation`` (the swap record in
    the config stays, so the saved model carries the pattern).
    """

    def __init__(self, model: Any, switch: int) -> None:
        self.model = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.switch = switch
        self.dense = SwapSpec.from_dict(
            getattr(self.model.config, CONFIG_KEY)
        ).original_attn_implementation

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Pick the attention of this step."""
        self.model.set_attn_implementation(
            self.dense if state.global_step < self.switch else ATTN_NAME
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The saved model always carries the sparse pattern."""
        self.model.set_attn_implementation(ATTN_NAME)


def finetune(config: FinetuneConfig, **extra: Any) -> dict[str, Any]:
    """Swap if asked, set the trainable parameters, train, save; returns the run record.

    ``extra`` overrides TrainingArguments fields (e.g. ``disable_tqdm=True``).
    """
    refuse(problems(config), "fine-tuning")
    if hint := bfloat16_warning(config.dtype, "cuda" if torch.cuda.is_available() else "cpu"):
        warnings.warn(hint, stacklevel=2)
    model_dir = Path(config.model)
    model = load(model_dir, dtype=getattr(torch, config.dtype))
    refuse(_model_problems(model, config), "fine-tuning")
    tokenizer = tokenizer_for(model_dir)
    train_set, val_set = datasets(config, tokenizer)
    if config.sequence_parallel > 1:  # Ulysses needs every batch's positions
        train_set = train_set.with_positions()
    # New parameters (learned selectors, LoRA adapters) start from --seed, so that a run
    # is repeatable and every process of a distributed run starts from the same ones.
    torch.manual_seed(config.seed)
    notes = []
    record = getattr(model.config, CONFIG_KEY, None)
    if config.pattern or record is not None:
        layers = config.pattern or list(SwapSpec.from_dict(record).layers)
        report = swap_attention(
            model,
            layers,
            backend=config.backend,
            full_layers=config.full_layers,
            max_length=config.positions_length,
            rope=config.rope,
        )
        notes.append(str(report))
    elif config.positions_length > model.config.max_position_embeddings:
        notes.append(extend_positions(model, config.positions_length, config.rope)["summary"])
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable()
        model.enable_input_require_grads()
    learned = any(hasattr(m, SELECTOR_ATTR) for m in attention_modules(model).values())
    selector_stage: SelectorStage = Joint(config.selector_rows) if learned else "none"
    if config.method == "selector":
        selector_stage = WarmUp(config.selector_rows, config.selector_reuse)
    model = apply_method(model, config.method, config.lora_rank, config.lora_alpha)
    parent = DenseParent(model) if config.kl_weight else None
    if parent is not None:
        how = "its adapters disabled" if parent.adapters else "a frozen copy"
        notes.append(
            f"loss: {1 - config.kl_weight:g} x LM + {config.kl_weight:g} x KL from the dense "
            f"parent ({how}, full attention)"
        )
    callbacks = []
    switch = round(config.dense_fraction * config.steps)
    if config.dense_fraction:
        callbacks.append(DenseFirst(model, switch))
        notes.append(f"steps 0-{switch - 1} use full attention, then the pattern")
    if config.transfer_steps:
        notes.append(f"steps 0-{config.transfer_steps - 1} train attention transfer")
    if config.deepspeed or config.sequence_parallel > 1:
        attention = model.config._attn_implementation  # what Ulysses wraps
        extra = deepspeed_arguments(config.deepspeed, config.sequence_parallel, attention) | extra
    heads = contextlib.nullcontext()
    if config.sequence_parallel > 1:
        heads = shard_heads(model, *head_share(config.sequence_parallel))
    with run_folder(config) as out:
        with heads:
            _, run = train(
                model,
                train_set,
                val_set,
                config,
                out,
                callbacks=callbacks,
                transfer_steps=config.transfer_steps,
                dense_steps=switch,
                selectors=selector_stage,
                parent=parent,
                kl_weight=config.kl_weight,
                **extra,
            )
        run["notes"] = notes + [n for n in [run["parallelism"].get("note")] if n]
        with gathered(model):  # ZeRO-3: whole parameters to save
            _publish(model, config, out, tokenizer, run)
    return run


def _publish(model: Any, config: FinetuneConfig, out: Path, tokenizer: Any, run: dict) -> None:
    """Write the trained model, its tokenizer and, last, the run record into ``out`` (the
    run's folder: it takes ``--out``'s place only once complete, see ``run_folder``)."""
    if config.method == "lora-plus" and config.merge:
        model = model.merge_and_unload()
    if not main_process():
        return
    if hasattr(model, "peft_config"):
        write_adapter(model, out)
    else:
        write_checkpoint(model, out)
    if not any((out / name).exists() for name in TOKENIZER_FILES[:2]):
        tokenizer.save_pretrained(out)
    write_record(out, run)
