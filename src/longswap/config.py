"""Typed configurations on the command line and in YAML: one flag per dataclass field.

Shared by every stage (``train``, ``evaluate``, ``demo``) and the CLI: a field declared with
:func:`help_field` becomes ``--field-name`` with its help text; ``--config file.yaml``
supplies the fields, checked by type, and flags given on the command line win.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml


def help_field(text: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text shows in ``--help``."""
    return field(metadata={"help": text}, **kwargs)


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
