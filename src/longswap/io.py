"""Writing files safely: never half-written, never over a user's files by surprise.

Two primitives. Every file longswap writes goes through :func:`write_atomic` (a temporary
file in the same folder, flushed to disk, then renamed over the target: the target holds its
old content or all of the new one). Every folder it writes as a whole goes through
:func:`staged_folder` (written beside the target, renamed into place once complete). A
folder longswap writes carries :data:`MARKER`, and ``--overwrite`` replaces only such a
folder (see :func:`written_by_longswap`) or an empty one.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from transformers import PreTrainedModel

from longswap.checkpoint import gguf_tokenizer, is_gguf

#: Attribute of an attention module that holds its learned selector (a submodule).
SELECTOR_ATTR = "longswap_selector"
#: The file beside a checkpoint's weights that holds its learned selectors' weights.
SELECTOR_FILE = "longswap_selectors.safetensors"

#: Files of a tokenizer that travel with a converted checkpoint.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` all at once: a temporary file beside it is written and
    flushed to disk, then renamed over ``path``. An interruption or a full disk leaves
    ``path`` as it was (and no temporary file)."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    try:
        with open(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as file:
            file.write(raw)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename itself to disk; not every system can
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def write_json(path: str | Path, value: Any) -> None:
    """Write ``value`` as indented JSON to ``path`` with :func:`write_atomic`."""
    write_atomic(path, json.dumps(value, indent=1) + "\n")


#: The file that marks a folder as written by longswap, which ``--overwrite`` may replace.
MARKER = "longswap_output.json"
#: Files that mark a folder written by a longswap from before :data:`MARKER`: a training
#: run's record, an interrupted run's record beside its checkpoints, a demo's results, the
#: swap record beside a LoRA adapter (a ``config.json`` with a swap record counts too).
EARLIER_MARKS = (
    "longswap_train.json",
    "checkpoints/longswap_run.json",
    "demo.json",
    "longswap.json",
)


def mark_written(folder: Path) -> None:
    """Put :data:`MARKER` into ``folder``: longswap wrote it and may replace it."""
    version = importlib.metadata.version("longswap")
    write_json(folder / MARKER, {"written_by": f"longswap {version}"})


def written_by_longswap(folder: Path) -> bool:
    """Whether longswap wrote ``folder``: it holds :data:`MARKER`, one of
    :data:`EARLIER_MARKS`, or a ``config.json`` that records a swap."""
    from longswap.swap.spec import CONFIG_KEY

    if any((folder / name).is_file() for name in (MARKER, *EARLIER_MARKS)):
        return True
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and CONFIG_KEY in config


def is_empty(folder: Path) -> bool:
    """Whether ``folder`` is absent, or holds nothing but longswap's :data:`MARKER` and empty
    folders (what a run that stopped before writing anything leaves; also what the main
    process of a launch has written when the others look)."""
    if not folder.is_dir():
        return True  # absent (a file in its place is refused apart)
    return all(
        item.name == MARKER or (item.is_dir() and not any(item.iterdir()))
        for item in folder.iterdir()
    )


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Raise ValueError unless ``out`` is absent, empty, or may be overwritten."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if not is_empty(out) and not overwrite:
        raise ValueError(
            f"--out {out} is not empty; choose another folder or pass --overwrite to replace it"
        )
    if overwrite and (problem := replace_problem(out)):
        raise ValueError(problem)


def replace_problem(out: Path) -> str | None:
    """Why ``--overwrite`` may not replace ``out``, or None: it may replace an empty folder
    or one longswap wrote (:func:`written_by_longswap`) that does not hold the current
    folder."""
    if is_empty(out):
        return None
    if Path.cwd().is_relative_to(out.resolve()):
        return (
            f"--out {out} holds the current folder, which --overwrite cannot replace; run "
            "the command from outside it, or pick another --out"
        )
    if not written_by_longswap(out):
        shown = sorted(p.name for p in out.iterdir())
        listing = ", ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else "")
        return (
            f"--out {out} holds files that longswap did not write ({listing}); --overwrite "
            f"replaces only an empty folder or one that longswap wrote (it holds {MARKER}): "
            "pick another --out, or empty that folder yourself"
        )
    return None


def output_problem(out: Path) -> str | None:
    """Why ``--out`` cannot be created and written, or None (probes the nearest existing folder)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"--out {out} cannot be created: {existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"--out {out} cannot be written ({existing}: {err.strerror}); pick a writable folder"
    return None


def overlap_problems(
    out: Path, inputs: Iterable[tuple[str, str | Path]], adds_only: bool = False
) -> list[str]:
    """Problems when ``out`` is, contains or lies inside one of the ``(flag, path)`` inputs.

    Writing there could overwrite or delete what the run reads (a base model, the data).
    ``adds_only``: the command only adds its own files to ``out``, so inputs inside it
    are safe.
    """
    found = []
    target = Path(out).resolve()
    for flag, path in inputs:
        source = Path(path).resolve()
        if target == source:
            found.append(f"--out {out} is the same path as {flag} {path}; pick another --out")
        elif source.is_relative_to(target) and not adds_only:
            found.append(f"--out {out} contains {flag} {path}; pick a folder outside it")
        elif target.is_relative_to(source):
            found.append(f"--out {out} lies inside {flag} {path}; pick a folder outside it")
    return found


def disk_is_full(err: BaseException) -> bool:
    """Whether ``err`` says that a write found no space left on its device (``OSError``
    ENOSPC, or the message torch's and safetensors' writers wrap it in)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "file write failed" in text


@contextlib.contextmanager
def explain_disk_full(
    out: Path, after: str = " The half-written files were removed."
) -> Iterator[None]:
    """Turn a full disk while writing under ``out`` into one ValueError that says so and
    what to do; ``after`` says what is left of the write."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if not disk_is_full(err):
            raise
        where = next(p for p in (out, *out.parents) if p.exists())
        free = shutil.disk_usage(where).free / 2**30
        raise ValueError(
            f"the disk holding {out} is full ({free:.2f} GiB free) ({err}).{after} Free some "
            "space, or write to another disk with --out"
        ) from None


#: The file that marks a staging folder as longswap's own (safe for longswap to clear).
STAGING_MARKER = "longswap-staging"
#: The file a staging folder gets once its result is completely written.
STAGING_COMPLETE = "complete"


def staging_root(out: Path) -> Path:
    """The staging folder of a write to ``out``, beside it (see :func:`staged_folder`). It
    holds ``new/`` (the result being written) and, while the result replaces ``out``,
    ``old/`` (the previous ``out``)."""
    out = Path(os.path.abspath(out))
    return out.with_name(f".{out.name}.longswap")


def leftover_problems(out: Path) -> list[str]:
    """What an earlier write to ``out`` left that longswap may not clear by itself: a
    folder in the way that longswap did not make, or a finished result that was never
    moved into place (see :func:`clear_leftovers`)."""
    root = staging_root(out)
    if not root.exists():
        return []
    if not (root / STAGING_MARKER).is_file():
        return [
            f"{root} is in the way of writing --out {out} and was not made by longswap; "
            "move or delete it"
        ]
    if (root / STAGING_COMPLETE).is_file() and (root / "new").exists():
        old = root / "old"
        kept = f" (the previous {out} is in {old})" if old.exists() else ""
        return [
            f"{root / 'new'} holds a finished result that an earlier run could not move "
            f"to {out}{kept}; move it where it belongs, or delete {root}, then rerun"
        ]
    return []


def clear_leftovers(out: Path) -> None:
    """Remove the staging folder an interrupted write to ``out`` left (longswap's own,
    holding no finished result); raise ValueError on :func:`leftover_problems`."""
    if found := leftover_problems(out):
        raise ValueError("; ".join(found))
    shutil.rmtree(staging_root(out), ignore_errors=True)


def interrupted_write(out: Path) -> Path | None:
    """The unfinished result of an interrupted write to ``out`` (kept by
    ``staged_folder(..., keep=True)`` to be continued), or None when there is none."""
    root = staging_root(out)
    ours = (root / STAGING_MARKER).is_file() and not (root / STAGING_COMPLETE).exists()
    return root / "new" if ours and (root / "new").is_dir() else None


@contextlib.contextmanager
def _written(root: Path, out: Path, keep: bool) -> Iterator[Path]:
    """Yield ``root/new`` to write into, ``root`` marked as longswap's and ``root/new`` as
    longswap's output; a failed write removes ``root`` (``keep``: leaves it, to be
    continued), a finished one is marked complete."""
    (root / "new").mkdir(parents=True, exist_ok=keep)
    write_atomic(root / STAGING_MARKER, f"longswap writes {out} here first\n")
    mark_written(root / "new")
    after = (
        f" What was written so far is kept in {root / 'new'}, to be continued."
        if keep
        else " The half-written files were removed."
    )
    try:
        with explain_disk_full(out, after):
            yield root / "new"
    except BaseException:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
        raise
    (root / STAGING_COMPLETE).touch()


@contextlib.contextmanager
def _moving(root: Path, out: Path) -> Iterator[None]:
    """Around moving a finished result from ``root/new`` into ``out``: on success ``root``
    goes; on failure the result stays where it is, and the error says so."""
    try:
        yield
    except OSError as err:
        raise ValueError(
            f"the finished result is in {root / 'new'}, but moving it to {out} failed "
            f"({err}); nothing was deleted: move it there yourself"
        ) from None
    shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(
    out: Path,
    overwrite: bool = False,
    main: bool = True,
    resume: bool = False,
    keep: bool = False,
) -> Iterator[Path]:
    """Yield a staging folder beside ``out`` to write into; move it into place on success.

    Leftovers of an interrupted earlier write are cleared first (or refused, see
    :func:`clear_leftovers`). A failed write removes the staging folder, unless ``keep`` or
    ``resume``: then it stays, and with ``resume`` an interrupted write's folder is yielded
    again, as it was left. An interrupted or failed write leaves ``out`` as it was; a
    finished result that cannot be moved into place stays in the staging folder, and the
    error names it. Of a distributed run, only the ``main`` process touches the folders
    (the others get the same path).
    """
    root = staging_root(out)
    if not main:
        yield root / "new"
        return
    if problem := output_problem(out):
        raise ValueError(problem)
    check_output_dir(out, overwrite)
    if not (resume and interrupted_write(out)):
        clear_leftovers(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _written(root, out, keep=keep or resume) as staging:
        yield staging
    with _moving(root, out):
        if out.exists():
            out.rename(root / "old")
        try:
            staging.rename(out)
        except OSError:
            (root / "old").rename(out)  # the previous out back in its place
            raise


def save_checkpoint(
    model: PreTrainedModel, out: Path, source: Path | None = None, overwrite: bool = False
) -> None:
    """Save ``model`` (and the tokenizer of ``source``, a folder or .gguf file) atomically:
    :func:`write_checkpoint` into a :func:`staged_folder`."""
    with staged_folder(out, overwrite) as staging:
        write_checkpoint(model, staging, source)


def write_checkpoint(model: PreTrainedModel, folder: Path, source: Path | None = None) -> None:
    """Write ``model``'s weights and config into ``folder`` (with the tokenizer of
    ``source``, a folder or .gguf file), as they are; :func:`save_checkpoint` stages it."""
    save_weights(model, folder)
    if source is not None and is_gguf(source):
        gguf_tokenizer(source).save_pretrained(folder)
    for name in TOKENIZER_FILES if source is not None and source.is_dir() else ():
        if (source / name).is_file() and not (folder / name).exists():
            shutil.copy2(source / name, folder / name)


def save_weights(model: PreTrainedModel, folder: Path) -> None:
    """``save_pretrained``, with learned selectors' weights in a file of their own.

    transformers' loader does not know the selector modules a swap adds, so it would report
    their weights as unexpected; ``longswap.load`` reads them from ``SELECTOR_FILE``.
    """
    state = model.state_dict()
    selectors = {k: v.contiguous() for k, v in state.items() if f".{SELECTOR_ATTR}." in k}
    if not selectors:
        model.save_pretrained(folder)
        return
    model.save_pretrained(folder, state_dict={k: v for k, v in state.items() if k not in selectors})
    save_file(selectors, str(folder / SELECTOR_FILE))
