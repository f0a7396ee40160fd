"""Typed training configurations; YAML files are saved instances of them."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Size = Literal["tiny", "small", "base"]


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class PretrainConfig:
    """Pre-train a Llama-architecture, byte-level model with full attention, from scratch."""

    out: str = _help("folder for the trained model (and checkpoints/ while training)", default="")
    data: list[str] = _help(
        "local .txt/.md/.py files or folders; empty: the embedded corpus (the Python "
        "standard library, its tests held out)",
        default_factory=list,
    )
    seq_len: int = _help("tokens (bytes) per training sequence", default=512)
    size: Size = _help(
        "model size: tiny (~0.8M parameters), small (~3M), base (~5M)", default="tiny"
    )
    steps: int = _help("optimizer steps", default=1000)
    batch_size: int = _help("sequences per step", default=16)
    learning_rate: float = _help("peak learning rate (cosine schedule after warm-up)", default=2e-3)
    warmup_steps: int = _help("linear warm-up steps", default=50)
    weight_decay: float = _help("AdamW weight decay", default=0.1)
    validation_share: float = _help("share of documents held out for validation", default=0.02)
    eval_steps: int = _help("evaluate and checkpoint every this many steps", default=200)
    seed: int = _help("random seed (data order and initial weights)", default=0)
    overwrite: bool = _help("replace a non-empty --out", default=False)
    resume: bool = _help("continue from the last checkpoint in --out", default=False)


def _arg_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return str, {"choices": list(typing.get_args(annotation))}
    if origin in (list, types.GenericAlias) or annotation == list[str]:
        return str, {"nargs": "*"}
    return annotation, {}


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per dataclass field, with its help text and default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind, extra = _arg_type(hints[f.name])
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=kind, default=None, help=f.metadata["help"], **extra)
    parser.add_argument("--config", type=Path, help="YAML file with these fields (flags win)")


def from_arguments(cls: type, args: argparse.Namespace) -> Any:
    """A config from ``--config`` YAML (if any), overridden by the flags that were given."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        if not args.config.is_file():
            raise ValueError(f"--config {args.config} does not exist")
        loaded = yaml.safe_load(args.config.read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ValueError(f"{args.config}: unknown fields {unknown}; known: {sorted(known)}")
        values.update(loaded)
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return cls(**values)
