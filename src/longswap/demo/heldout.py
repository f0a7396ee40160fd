"""The demo's held-out text for a base other than the embedded model: longswap's own source,
which no public model written before it can have memorised."""

from __future__ import annotations

from pathlib import Path

from longswap import __version__


def heldout_source(model: str) -> str:
    """Where the perplexity and selection text of a demo of ``model`` (empty: the embedded
    one) comes from, in words."""
    if not model:
        return "the test suites of this interpreter's standard library (never trained on)"
    return (
        f"longswap {__version__}'s own source files, in path order, cut into {HELDOUT_PARTS} "
        "documents (written in 2026: no public model before then can have memorised them)"
    )


#: How many documents the held-out text of a real model is cut into.
HELDOUT_PARTS = 2


def heldout_folder(staging: Path) -> Path:
    """longswap's own source as :data:`HELDOUT_PARTS` text files of about equal size in
    ``staging/heldout`` (the held-out text of a base other than the embedded model)."""
    folder = staging / "heldout"
    if not folder.is_dir():
        package = Path(__file__).parents[1]
        files = sorted(
            p
            for p in package.rglob("*")
            if p.suffix in (".py", ".md", ".cpp", ".h") and "assets" not in p.parts
        )
        texts = [f"# file: {p.relative_to(package)}\n{p.read_text()}" for p in files]
        share, parts, current = sum(map(len, texts)) / HELDOUT_PARTS, [], []
        for text in texts:
            current.append(text)
            if sum(map(len, current)) >= share and len(parts) < HELDOUT_PARTS - 1:
                parts.append(current)
                current = []
        parts.append(current)
        (staging / "heldout.partial").mkdir(exist_ok=True)
        for i, part in enumerate(parts, 1):
            (staging / "heldout.partial" / f"part-{i}.txt").write_text("\n".join(part))
        (staging / "heldout.partial").rename(folder)
    return folder
