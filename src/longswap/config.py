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


def help_field(text: str, *, required: bool = False, **kwargs: Any) -> Any:
    """A dataclass field whose help text shows in ``--help``; ``required``: its flag must be
    given, on the command line or in ``--config``."""
    return field(metadata={"help": text, "required": required}, **kwargs)


def comma_list(kind: type, choices: tuple[Any, ...] = ()) -> Any:
    """Parse ``"a,b"`` into ``[kind(a), kind(b)]`` (so ``--lengths 1024,2048`` works);
    with ``choices``, each value must be one of them."""

    def parse(text: str) -> list[Any]:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            msg = f"expected {kind.__name__} values, got {text!r}"
            raise argparse.ArgumentTypeError(msg) from None
        wrong = [v for v in values if choices and v not in choices]
        if wrong:
            msg = f"invalid choice {wrong[0]!r} (choose from {', '.join(map(str, choices))})"
            raise argparse.ArgumentTypeError(msg)
        return values

    parse.__name__ = f"{kind.__name__} list"
    return parse


def _arg_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return str, {"choices": list(typing.get_args(annotation))}
    if origin is list:
        # Space- or comma-separated, and the flag may repeat: --model a --model b.
        (item,) = typing.get_args(annotation)
        if typing.get_origin(item) is Literal:  # the help text names the choices
            return comma_list(str, typing.get_args(item)), {"nargs": "+", "action": "extend"}
        return comma_list(item), {"nargs": "+", "action": "extend"}
    return annotation, {}


class _ConfigFile(argparse.Action):
    """``--config FILE``: the file may hold the required fields, so no flag stays required
    (the stage names a field that neither gives)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        """Keep the file's path; no flag of ``parser`` is required any more."""
        setattr(namespace, self.dest, values)
        for action in parser._actions:
            action.required = False


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per dataclass field, with its help text and default; the required
    fields first."""
    hints = typing.get_type_hints(cls)
    fields = sorted(dataclasses.fields(cls), key=lambda f: not f.metadata.get("required"))
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        kind, extra = _arg_type(hints[f.name])
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=f.metadata["help"])
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        text = f.metadata["help"]
        if f.metadata.get("required"):
            extra["required"] = True
            text += " (required, here or in --config)"
        elif shown not in ("", None):
            text += f" (default: {shown})"
        parser.add_argument(flag, type=kind, default=None, help=text.replace("%", "%%"), **extra)
    parser.add_argument(
        "--config",
        type=Path,
        action=_ConfigFile,
        help="YAML file with these fields (flags given as well win)",
    )


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
