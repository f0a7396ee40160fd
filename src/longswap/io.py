"""Writing checkpoints safely: never half-written, never over a user's files by surprise."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

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


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Raise ValueError unless ``out`` is absent, empty, or may be overwritten."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"--out {out} is not empty; choose another folder or pass --overwrite to replace it"
        )
    if overwrite and (problem := replace_problem(out)):
        raise ValueError(problem)


def replace_problem(out: Path) -> str | None:
    """Why ``--overwrite`` cannot replace ``out`` (it holds the current folder), or None."""
    if out.is_dir() and any(out.iterdir()) and Path.cwd().is_relative_to(out.resolve()):
        return (
            f"--out {out} holds the current folder, which --overwrite cannot replace; run "
            "the command from outside it, or pick another --out"
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
def explain_disk_full(out: Path, after: str = "") -> Iterator[None]:
    """Turn a full disk while writing under ``out`` into one ValueError that says so and
    what to do; ``after`` adds what is left of the run."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if not disk_is_full(err):
            raise
        where = next(p for p in (out, *out.parents) if p.exists())
        free = shutil.disk_usage(where).free / 2**30
        raise ValueError(
            f"the disk holding {out} is full ({free:.2f} GiB free) ({err}); the half-written "
            f"files were removed.{after} Free some space, or write to another disk with --out"
        ) from None


#: The file that marks a staging folder as longswap's own (safe for longswap to clear).
STAGING_MARKER = "longswap-staging"
#: The file a staging folder gets once its result is completely written.
STAGING_COMPLETE = "complete"
#: The staging folder :func:`publish_into` makes inside the folder it publishes into.
INNER_STAGING = ".longswap-publish"


def staging_roots(out: Path) -> tuple[Path, Path]:
    """The staging folders of a write to ``out``: beside it (:func:`staged_folder`) and
    inside it (:func:`publish_into`). Each holds ``new/`` (the result being written) and,
    while the result replaces ``out``, ``old/`` (the previous ``out``)."""
    out = Path(os.path.abspath(out))
    return out.with_name(f".{out.name}.longswap"), out / INNER_STAGING


def leftover_problems(out: Path) -> list[str]:
    """What an earlier write to ``out`` left that longswap may not clear by itself: a
    folder in the way that longswap did not make, or a finished result that was never
    moved into place (see :func:`clear_leftovers`)."""
    found = []
    for root in staging_roots(out):
        if not root.exists():
            continue
        if not (root / STAGING_MARKER).is_file():
            found.append(
                f"{root} is in the way of writing --out {out} and was not made by longswap; "
                "move or delete it"
            )
        elif (root / STAGING_COMPLETE).is_file() and (root / "new").exists():
            old = root / "old"
            kept = f" (the previous {out} is in {old})" if old.exists() else ""
            found.append(
                f"{root / 'new'} holds a finished result that an earlier run could not move "
                f"to {out}{kept}; move it where it belongs, or delete {root}, then rerun"
            )
    return found


def clear_leftovers(out: Path) -> None:
    """Remove the staging folders an interrupted write to ``out`` left (longswap's own,
    holding no finished result); raise ValueError on :func:`leftover_problems`."""
    if found := leftover_problems(out):
        raise ValueError("; ".join(found))
    for root in staging_roots(out):
        if root.exists():
            shutil.rmtree(root)


def interrupted_write(out: Path) -> Path | None:
    """The unfinished result of an interrupted write to ``out`` (``staged_folder(...,
    resume=True)`` keeps it to continue), or None when there is none."""
    root, _ = staging_roots(out)
    ours = (root / STAGING_MARKER).is_file() and not (root / STAGING_COMPLETE).exists()
    return root / "new" if ours and (root / "new").is_dir() else None


@contextlib.contextmanager
def _written(root: Path, out: Path, keep: bool = False) -> Iterator[Path]:
    """Yield ``root/new`` to write into, ``root`` marked as longswap's; a failed write
    removes ``root`` (``keep``: leaves it, to be continued), a finished one is marked
    complete."""
    (root / "new").mkdir(parents=True, exist_ok=keep)
    (root / STAGING_MARKER).write_text(f"longswap writes {out} here first\n")
    try:
        with explain_disk_full(out):
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
    out: Path, overwrite: bool = False, main: bool = True, resume: bool = False
) -> Iterator[Path]:
    """Yield a staging folder beside ``out`` to write into; move it into place on success.

    Leftovers of an interrupted earlier write are cleared first (or refused, see
    :func:`clear_leftovers`); with ``resume``, an interrupted write's folder is yielded
    again, as it was left, and a failure leaves it to be continued. An interrupted or failed
    write leaves ``out`` as it was; a finished result that cannot be moved into place stays
    in the staging folder, and the error names it. Of a distributed run, only the ``main``
    process touches the folders (the others get the same path).
    """
    root, _ = staging_roots(out)
    if not main:
        yield root / "new"
        return
    if problem := output_problem(out):
        raise ValueError(problem)
    check_output_dir(out, overwrite)
    if not (resume and interrupted_write(out)):
        clear_leftovers(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _written(root, out, keep=resume) as staging:
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
    """Save ``model`` (and the tokenizer of ``source``, a folder or .gguf file) atomically."""
    with staged_folder(out, overwrite) as staging:
        save_weights(model, staging)
        if source is not None and is_gguf(source):
            gguf_tokenizer(source).save_pretrained(staging)
        for name in TOKENIZER_FILES if source is not None and source.is_dir() else ():
            if (source / name).is_file() and not (staging / name).exists():
                shutil.copy2(source / name, staging / name)


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


def publish_into(out: Path, write: Callable[[Path], None], main: bool = True) -> None:
    """Let ``write`` fill a staging folder inside ``out``, then move its files into ``out``.

    Used after training, where ``out`` already holds ``checkpoints/`` that must survive:
    the final files appear only once completely written. Of a distributed run, only the
    ``main`` process writes.
    """
    if not main:
        return
    out.mkdir(parents=True, exist_ok=True)
    _, root = staging_roots(out)
    clear_leftovers(out)
    with _written(root, out) as staging:
        write(staging)
    with _moving(root, out):
        for item in staging.iterdir():
            target = out / item.name
            if target.is_dir() and not item.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
