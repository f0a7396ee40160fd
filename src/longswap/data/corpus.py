"""Documents from local files, and the embedded default corpus: the Python standard library.

The standard library of the running interpreter has long files with long-range references
(definitions used hundreds of lines later), exists on every machine with Python, and needs
no download. Its test suites are kept apart, as held-out text.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

#: File types read as plain text.
TEXT_SUFFIXES = (".txt", ".md", ".py")
#: File types read as tables (one document per row); Parquet through the ``datasets`` library.
TABLE_SUFFIXES = (".jsonl", ".json", ".parquet")


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


def _json_rows(path: Path) -> list[tuple[str, object]]:
    """``(where, row)`` for each row of a JSON Lines file, or of a JSON file holding a list
    (or one object per line, as JSON Lines); raises ValueError naming the file and line."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json" and text.strip():
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # more than one value: one object per line
                raise ValueError(
                    f"{path}, line {err.lineno}: not valid JSON ({err.msg}); a .json data file "
                    'holds a list of rows such as [{"text": "..."}]'
                ) from None
        else:
            if not isinstance(whole, list):
                raise ValueError(
                    f"{path} holds {json.dumps(whole)[:60]}, not a list of rows; write "
                    '[{"text": "..."}, ...], or one object per line in a .jsonl file'
                )
            return [(f"row {i + 1}", row) for i, row in enumerate(whole)]
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}, line {number}: not valid JSON ({err.msg}); each line of a JSON "
                    'Lines file is one object such as {"text": "..."}'
                ) from None
    return rows


def _table_documents(path: Path, text_field: str) -> list[Document]:
    """One document per row of a local JSONL/JSON or Parquet file."""
    if path.suffix == ".parquet":
        from datasets import load_dataset

        table = load_dataset("parquet", data_files=str(path), split="train")
        fields = table.column_names
        values = table[text_field] if text_field in fields else []
    else:
        rows = _json_rows(path)
        if not rows:
            return []
        for where, row in rows:
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}, {where} is {json.dumps(row)[:60]}, not an object; each row is "
                    f'an object such as {{"{text_field}": "..."}}'
                )
        fields = list(dict.fromkeys(key for _, row in rows for key in row))
        values = [row.get(text_field) for _, row in rows]
        for (where, _), value in zip(rows, values, strict=True):
            if value is not None and not isinstance(value, str):
                raise ValueError(
                    f"{path}, {where}: field {text_field!r} holds {json.dumps(value)[:60]}, "
                    "not text"
                )
    if text_field not in fields:
        raise ValueError(
            f"{path} has no field {text_field!r}; its fields are {fields} "
            "(choose one with --text-field)"
        )
    return [
        Document(f"{path.name}#{i}", text)
        for i, text in enumerate(values)
        if isinstance(text, str) and text.strip()
    ]


def local_documents(paths: Sequence[str | Path], text_field: str = "text") -> list[Document]:
    """Documents from local files and folders (searched recursively).

    ``.txt``, ``.md`` and ``.py`` files are one document each; ``.jsonl``, ``.json`` and
    ``.parquet`` files give one document per row, from the column ``text_field``. A missing
    path, an unsupported file type, or a folder without such files raises ValueError
    naming it, before anything is read; so does a JSON row that is not an object with text
    (naming the file and line).
    """
    suffixes = TEXT_SUFFIXES + TABLE_SUFFIXES
    files: list[tuple[Path, Path]] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ValueError(f"data path {path} does not exist")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in suffixes and p.is_file())
            if not found:
                raise ValueError(f"data folder {path} holds no {', '.join(suffixes)} files")
            files += [(p, path) for p in found]
        elif path.suffix in suffixes:
            files.append((path, path.parent))
        else:
            raise ValueError(f"data file {path} has an unsupported type; use {', '.join(suffixes)}")
    docs, undecodable = [], []
    for path, root in files:
        if path.suffix in TABLE_SUFFIXES:
            docs += _table_documents(path, text_field)
            continue
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            undecodable.append(path)
            text = raw.decode("utf-8", errors="replace")
        if "\x00" in text:  # binary data under a text suffix: not text to learn from
            undecodable += [path] if path not in undecodable else []
            continue
        if text.strip():
            docs.append(Document(path.relative_to(root).as_posix(), text))
    if undecodable:
        warnings.warn(
            f"{len(undecodable)} data file(s) are not UTF-8 text (first: {undecodable[0]}); "
            "binary files were skipped and invalid bytes replaced with U+FFFD: convert them "
            "to UTF-8 if they are text",
            stacklevel=2,
        )
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
