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


def overlap_problems(out: Path, inputs: Iterable[tuple[str, str | Path]]) -> list[str]:
    """Problems when ``out`` is, contains or lies inside one of the ``(flag, path)`` inputs.

    Writing there could overwrite or delete what the run reads (a base model, the data).
    """
    found = []
    target = Path(out).resolve()
    for flag, path in inputs:
        source = Path(path).resolve()
        if target == source:
            found.append(f"--out {out} is the same path as {flag} {path}; pick another --out")
        elif source.is_relative_to(target):
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


@contextlib.contextmanager
def staged_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write into; move it into place on success.

    An interrupted or failed write leaves ``out`` as it was.
    """
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with explain_disk_full(out):
            yield staging
        if out.exists():
            trash = out.with_name(f".{out.name}.old")
            out.rename(trash)
            staging.rename(out)
            shutil.rmtree(trash)
        else:
            staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


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


def publish_into(out: Path, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a temporary folder inside ``out``, then move its files into ``out``.

    Used after training, where ``out`` already holds ``checkpoints/`` that must survive:
    the final files appear only once completely written.
    """
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging.", dir=out))
    try:
        with explain_disk_full(out):
            write(staging)
        for item in staging.iterdir():
            target = out / item.name
            if target.is_dir() and not item.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
