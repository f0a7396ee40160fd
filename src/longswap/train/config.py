"""Typed training configurations; YAML files are saved instances of them."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Size = Literal["tiny", "small", "base"]


def help_field(text: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text shows in ``--help``."""
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainingFields:
    """Fields every training run has."""

    out: str = help_field(
        "folder for the trained model (and checkpoints/ while training)", default=""
    )
    data: list[str] = help_field(
        "local .txt/.md/.py files or folders; empty: the embedded corpus (the Python "
        "standard library, its tests held out)",
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
    eval_steps: int = help_field("evaluate and checkpoint every this many steps", default=200)
    seed: int = help_field("random seed (data order and initial weights)", default=0)
    overwrite: bool = help_field("replace a non-empty --out", default=False)
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

    model: str = help_field("local checkpoint folder to start from", default="")
    pattern: str = help_field(
        "swap to this pattern first (e.g. 'sliding_window(window=512)'); empty: keep the "
        "model's attention (a swapped model keeps its pattern)",
        default="",
    )
    full_layers: list[int] = help_field(
        "layers kept dense when --pattern swaps (e.g. -1)", default_factory=list
    )
    backend: str = help_field("attention backend: auto, reference, blocks or flex", default="auto")
    rope: str = help_field(
        "position extension beyond the trained length: auto, none, linear, ntk, yarn",
        default="auto",
    )
    method: Method = help_field(
        "trainable parameters: lora-plus (LoRA on attention + embeddings and norms), full, "
        "attention (attention projections only), or selector (only the learned selectors of "
        "a learned_topk swap, distilled from dense attention, base frozen: the warm-up); "
        "learned selectors also train under the other methods, on their selected blocks",
        default="lora-plus",
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
    dense_fraction: float = help_field(
        "share of the first steps trained with full attention before the sparse pattern "
        "takes over (MoBA's hybrid schedule)",
        default=0.0,
    )


def comma_list(kind: type) -> Any:
    """Parse ``"a,b"`` into ``[kind(a), kind(b)]`` (so ``--lengths 1024,2048`` works)."""

    def parse(text: str) -> list[Any]:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            msg = f"expected {kind.__name__} values, got {text!r}"
            raise argparse.ArgumentTypeError(msg) from None

    parse.__name__ = f"{kind.__name__} list"
    return parse


def _arg_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return str, {"choices": list(typing.get_args(annotation))}
    if origin is list:
        # Space- or comma-separated, and the flag may repeat: --model a --model b.
        kind = comma_list(typing.get_args(annotation)[0])
        return kind, {"nargs": "+", "action": "extend"}
    return annotation, {}


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per dataclass field, with its help text and default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind, extra = _arg_type(hints[f.name])
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=f.metadata["help"])
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        text = f.metadata["help"] + (f" (default: {shown})" if shown not in ("", None) else "")
        parser.add_argument(flag, type=kind, default=None, help=text.replace("%", "%%"), **extra)
    parser.add_argument("--config", type=Path, help="YAML file with these fields (flags win)")


def _type_problem(name: str, value: Any, annotation: Any) -> str | None:
    """What is wrong with a YAML ``value`` for a field of type ``annotation``, if anything."""
    origin = typing.get_origin(annotation)
    if origin is list:
        kind = typing.get_args(annotation)[0]
        if not isinstance(value, list) or not all(_fits(v, kind) for v in value):
            return f"{name} must be a list of {kind.__name__} values, got {value!r}"
        return None
    if origin is Literal:
        choices = typing.get_args(annotation)
        return None if value in choices else f"{name} must be one of {list(choices)}, got {value!r}"
    return (
        None
        if _fits(value, annotation)
        else (f"{name} must be {getattr(annotation, '__name__', annotation)}, got {value!r}")
    )


def _fits(value: Any, kind: Any) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind) if isinstance(kind, type) else True


def from_arguments(cls: type, args: argparse.Namespace) -> Any:
    """A config from ``--config`` YAML (if any), overridden by the flags that were given."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        if not args.config.is_file():
            raise ValueError(f"--config {args.config} does not exist")
        try:
            loaded = yaml.safe_load(args.config.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(
                f"--config {args.config} is not valid YAML{where}: {problem}"
            ) from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {args.config} must hold field: value pairs")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ValueError(f"{args.config}: unknown fields {unknown}; known: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        for name, value in loaded.items():  # YAML 1.1 reads 2e-3 (no dot) as a string
            if hints[name] is float and isinstance(value, str):
                with contextlib.suppress(ValueError):
                    loaded[name] = float(value)
        wrong = [_type_problem(name, value, hints[name]) for name, value in loaded.items()]
        if any(wrong):
            raise ValueError(f"{args.config}:\n- " + "\n- ".join(w for w in wrong if w))
        values.update(loaded)
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if isinstance(given, list):  # each flag occurrence / word parsed to a list: flatten
            given = [x for item in given for x in (item if isinstance(item, list) else [item])]
        if given is not None:
            values[f.name] = given
    return cls(**values)
