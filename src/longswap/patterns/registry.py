"""Patterns register themselves once, by name, so strings and configs can name them."""

from __future__ import annotations

from longswap.patterns.base import Pattern

REGISTRY: dict[str, type[Pattern]] = {}


def register(cls: type[Pattern]) -> type[Pattern]:
    """Class decorator: make ``cls`` reachable by its ``name`` in pattern strings."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"pattern name {cls.name!r} is empty or already registered")
    REGISTRY[cls.name] = cls
    return cls
