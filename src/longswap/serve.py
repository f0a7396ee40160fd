"""``longswap serve``: transformers' OpenAI-compatible server on a longswap model.

A thin wrapper over ``transformers serve`` (its ``serving`` extra: FastAPI, uvicorn,
openai): the model is loaded as ``longswap generate`` loads it (a swapped folder with its
learned selectors, a LoRA output on its base, a ``.gguf`` file, or a dense model), and the
server is pinned to it, so every request attends through the model's pattern.

The server's loader is pointed at that model object for the duration of the call (its
``_load_model``, ``load_processor`` and ``load_config`` answer for the served path; every
other path loads as transformers would); nothing is changed once it returns. Generation
runs through transformers' own ``generate()`` and cache: the pattern holds at every step,
but longswap's sparse cache (``longswap generate``) is not used, so a long prompt's cache
is dense.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any
from unittest import mock

from longswap.checkpoint import model_problem


def serve_problems(model: Path, port: int) -> list[str]:
    """Everything wrong with the command, checked before the model loads."""
    found = []
    missing = [m for m in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(m) is None]
    if missing:
        found.append(
            f"serving needs {', '.join(missing)}: pip install 'longswap[serve]' "
            "(transformers' serving extra)"
        )
    if problem := model_problem(model):
        found.append(problem)
    if not 0 < port < 65536:
        found.append(f"--port must lie in 1..65535, got {port}")
    return found


def serve(
    model: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    dtype: str = "auto",
    base: Path | None = None,
    log_level: str = "info",
) -> None:
    """Serve ``model`` until the server stops (Ctrl-C). Raises ValueError on bad arguments,
    before any work."""
    if found := serve_problems(model, port):
        raise ValueError("; ".join(found))
    from transformers.cli.serve import Serve
    from transformers.cli.serving import model_manager
    from transformers.cli.serving.utils import canonical_model_id

    from longswap.generate import load_for_generation

    loaded, tokenizer = load_for_generation(model, device, dtype, base)
    served = canonical_model_id(str(model))
    loader = model_manager.ModelLoader

    def answer(name: str, ours: Any) -> Any:
        original = getattr(loader, name)

        def method(self: Any, model_id: str, *args: Any, **kwargs: Any) -> Any:
            if canonical_model_id(model_id) == served:
                return ours
            return original(self, model_id, *args, **kwargs)

        return method

    config = (loaded.config, loaded.generation_config)
    with (
        mock.patch.object(loader, "_load_model", answer("_load_model", loaded)),
        mock.patch.object(loader, "load_processor", answer("load_processor", tokenizer)),
        mock.patch.object(loader, "load_config", answer("load_config", config)),
    ):
        device = str(loaded.device)  # where the loader would put it (it loads nothing here)
        Serve(force_model=str(model), host=host, port=port, log_level=log_level, device=device)
