"""Documents from local files, and the embedded default corpus: the Python standard library.

The standard library of the running interpreter has long files with long-range references
(definitions used hundreds of lines later), exists on every machine with Python, and needs
no download. Its test suites are kept apart, as held-out text.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

#: File types read as plain text.
TEXT_SUFFIXES = (".txt", ".md", ".py")


@dataclass(frozen=True)
class Document:
    """One text with a stable name (its path relative to where it was found)."""

    name: str
    text: str


def _is_test(rel: Path) -> bool:
    parts = rel.parts
    return any(p in ("test", "tests", "idle_test") for p in parts[:-1]) or rel.name.startswith(
        "test_"
    )


def stdlib_documents(part: Literal["train", "heldout"] = "train") -> list[Document]:
    """The ``.py`` files of this interpreter's standard library, sorted by name.

    ``train``: everything but test code; ``heldout``: the test suites (``test/``,
    ``tests/``, ``test_*.py``), never used for training.
    """
    if part not in ("train", "heldout"):
        raise ValueError(f"part must be 'train' or 'heldout', got {part!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "site-packages" in rel.parts or "dist-packages" in rel.parts:
            continue
        if _is_test(rel) != (part == "heldout"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few files are deliberately not UTF-8 (encoding tests)
        if text.strip():
            docs.append(Document(f"stdlib/{rel.as_posix()}", text))
    return docs


def local_documents(paths: Sequence[str | Path]) -> list[Document]:
    """Documents from ``.txt``, ``.md`` and ``.py`` files and folders (searched recursively).

    A missing path, an unsupported file type, or a folder without such files raises
    ValueError naming it, before anything is read.
    """
    files: list[tuple[Path, Path]] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ValueError(f"data path {path} does not exist")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            if not found:
                raise ValueError(f"data folder {path} holds no {', '.join(TEXT_SUFFIXES)} files")
            files += [(p, path) for p in found]
        elif path.suffix in TEXT_SUFFIXES:
            files.append((path, path.parent))
        else:
            raise ValueError(
                f"data file {path} has an unsupported type; use {', '.join(TEXT_SUFFIXES)}"
            )
    docs = []
    for path, root in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(Document(path.relative_to(root).as_posix(), text))
    return docs


def split_documents(
    docs: Iterable[Document], validation_share: float = 0.05
) -> tuple[list[Document], list[Document]]:
    """A stable train/validation split: a document's side depends only on its name."""
    if not 0 <= validation_share < 1:
        raise ValueError(f"validation_share must be in [0, 1), got {validation_share!r}")
    train, val = [], []
    for doc in docs:
        digest = int.from_bytes(hashlib.sha256(doc.name.encode()).digest()[:8], "big")
        (val if digest / 2**64 < validation_share else train).append(doc)
    return train, val
