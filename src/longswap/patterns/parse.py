"""The pattern syntax shared by the CLI, YAML configs and ``config.json``.

A pattern string is a call of a registered pattern with literal arguments, and patterns
combine with ``|`` (union) and ``&`` (intersection), parentheses as usual::

    full()
    sliding_window(window=4096, sinks=4)
    sliding_window(512) | dilated(window=64, dilation=16)
    local_global(window=256, global_tokens=[0, 1, 2])

``str(pattern)`` writes this syntax and ``parse_pattern(str(p)) == p`` for every pattern.
"""

from __future__ import annotations

import ast
import dataclasses

from longswap.patterns.base import Pattern
from longswap.patterns.compose import MAX_PARTS, Intersection, SelectionUnion, Union, union
from longswap.patterns.registry import REGISTRY

#: Operators that do not combine patterns, as written.
_OPERATORS = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.MatMult: "@",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitXor: "^",
}


def _fail(text: str, why: str) -> ValueError:
    names = ", ".join(f"{n}(...)" for n in sorted(REGISTRY))
    return ValueError(
        f"cannot read pattern {text!r}: {why}. Write a call such as "
        f"'sliding_window(window=4096, sinks=4)', combined with | and &; known patterns: {names}"
    )


def _literal(node: ast.expr, text: str) -> object:
    try:
        value = ast.literal_eval(node)
    except ValueError:
        why = "an expression; write its value" if isinstance(node, ast.BinOp) else "not a literal"
        raise _fail(text, f"argument {ast.unparse(node)!r} is {why}") from None
    return tuple(value) if isinstance(value, list) else value


def _build(node: ast.expr, text: str) -> Pattern:
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitOr, ast.BitAnd)):
        kind = union if isinstance(node.op, ast.BitOr) else Intersection
        return kind((_build(node.left, text), _build(node.right, text)))
    if isinstance(node, ast.BinOp):
        op = _OPERATORS[type(node.op)]
        raise _fail(text, f"{op!r} does not combine patterns; use | (union) or & (intersection)")
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise _fail(text, f"{ast.unparse(node)!r} is not a pattern call")
    name = node.func.id
    if name not in REGISTRY:
        raise _fail(text, f"unknown pattern {name!r}")
    if any(kw.arg is None for kw in node.keywords):
        raise _fail(text, "'**' unpacking is not read; write each argument as name=value")
    names = [kw.arg for kw in node.keywords]
    if repeated := sorted({n for n in names if names.count(n) > 1}):
        raise _fail(text, f"argument {repeated[0]!r} is given twice")
    args = [_literal(a, text) for a in node.args]
    kwargs = {kw.arg: _literal(kw.value, text) for kw in node.keywords}
    try:
        return REGISTRY[name](*args, **kwargs)
    except TypeError as err:
        raise _fail(text, f"bad arguments for {name}: {err}") from None


def parse_pattern(text: str | Pattern) -> Pattern:
    """Build a pattern from its string form (a Pattern passes through unchanged)."""
    if isinstance(text, Pattern):
        return text
    if not isinstance(text, str):
        raise _fail(repr(text), f"expected a string, got {type(text).__name__}")
    count = text.count("|") + text.count("&") + 1
    if count > MAX_PARTS:
        raise _fail(
            text[:200] + " ...",
            f"it combines {count} patterns, more than the {MAX_PARTS} a pattern may hold",
        )
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise _fail(text, f"syntax error ({err.msg})") from None
    return _build(tree.body, text)


def format_pattern(pattern: Pattern) -> str:
    """The string form of ``pattern``, readable by :func:`parse_pattern`."""
    composite = (Union, SelectionUnion, Intersection)
    if isinstance(pattern, composite):
        op = " & " if isinstance(pattern, Intersection) else " | "
        return op.join(
            f"({format_pattern(p)})" if isinstance(p, composite) else format_pattern(p)
            for p in pattern.parts
        )
    fields = dataclasses.fields(pattern)
    args = []
    for f in fields:
        value = getattr(pattern, f.name)
        if value is None and f.default is None:  # an option left unset reads as unset
            continue
        args.append(f"{f.name}={list(value) if isinstance(value, tuple) else value!r}")
    return f"{pattern.name}({', '.join(args)})"
