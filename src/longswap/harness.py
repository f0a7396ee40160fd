"""lm-evaluation-harness on a longswap model, offline, with longswap's attention registered.

``longswap harness --model M --tasks ...`` loads ``M`` as ``longswap generate`` does (a
swapped folder, a LoRA output of ``finetune``, a ``.gguf`` file, or a dense model for
comparison), hands the model object to lm-eval's ``HFLM`` and runs
``lm_eval.simple_evaluate`` with the Hugging Face hub switched off. lm-eval generates
through the model's plain ``generate()``, so it measures the pattern's quality (a swapped
model attends through its pattern at every step), not longswap's sparse cache.

The preset ``--tasks long-context`` is the offline long-context suite: RULER's synthetic
tasks that build their own text (:data:`RULER_OFFLINE`, lm-eval's ``ruler`` extra: nltk,
wonderwords, scipy) and longswap's own passkey task (``harness_tasks/``), each at every
``--lengths`` value (lm-eval's ``max_seq_lengths``). The record written to ``--out`` holds
lm-eval's results, the model's pattern, longswap's version and the environment.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longswap import __version__
from longswap.checkpoint import model_problem
from longswap.environment import environment
from longswap.io import write_json

#: RULER's synthetic tasks in lm-eval that need no download (their haystacks are generated).
RULER_OFFLINE = (
    "niah_single_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "ruler_vt",
    "ruler_cwe",
    "ruler_fwe",
)
#: longswap's own lm-eval tasks (YAML and Python under ``harness_tasks/``).
TASKS_DIR = Path(__file__).with_name("harness_tasks")
#: The preset names ``--tasks`` accepts, and the tasks each stands for.
PRESETS = {"long-context": (*RULER_OFFLINE, "longswap_passkey")}
#: The key that marks a record this command wrote (``--overwrite`` replaces only those).
RECORD_KEY = "longswap_harness"


@dataclass
class HarnessConfig:
    """What ``longswap harness`` runs (the flags, one field each)."""

    model: Path
    tasks: list[str] = field(default_factory=lambda: ["long-context"])
    lengths: list[int] = field(default_factory=lambda: [4096])
    out: Path = Path("harness.json")
    limit: float | None = None
    batch_size: int = 1
    num_fewshot: int | None = None
    gen_kwargs: str | None = None
    include_path: Path | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    base: Path | None = None
    overwrite: bool = False


def task_names(config: HarnessConfig) -> list[str]:
    """The tasks to run: presets expanded, order kept, each once."""
    found = [t for name in config.tasks for t in PRESETS.get(name, (name,))]
    return list(dict.fromkeys(found))


def harness_problems(config: HarnessConfig) -> list[str]:
    """Everything wrong with ``config``, checked before any model is loaded."""
    found = []
    if importlib.util.find_spec("lm_eval") is None:
        found.append(
            "lm-evaluation-harness is not installed: pip install 'longswap[harness]' "
            "(or pip install lm_eval[ruler])"
        )
    if problem := model_problem(config.model):
        found.append(problem)
    if not config.lengths or any(n < 64 for n in config.lengths):
        found.append(f"--lengths must be token counts of at least 64, got {config.lengths}")
    if config.limit is not None and config.limit <= 0:
        found.append(f"--limit must be positive (a count, or a share below 1), got {config.limit}")
    if config.batch_size < 1:
        found.append(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.include_path is not None and not config.include_path.is_dir():
        found.append(f"--include-path {config.include_path} is not a folder of task YAML files")
    ruler = [t for t in task_names(config) if t in RULER_OFFLINE]
    missing = [m for m in ("nltk", "wonderwords") if importlib.util.find_spec(m) is None]
    if ruler and missing:
        found.append(
            f"the RULER tasks ({', '.join(ruler)}) need {' and '.join(missing)}: "
            "pip install 'lm_eval[ruler]'"
        )
    if problem := _out_problem(config.out, config.overwrite):
        found.append(problem)
    return found


def _out_problem(out: Path, overwrite: bool) -> str | None:
    """Why ``--out`` may not be written, or None."""
    if out.is_dir():
        return f"--out {out} is a folder; give the path of the JSON record to write"
    if not out.exists():
        return None
    if not overwrite:
        return f"--out {out} exists; pass --overwrite to replace it, or choose another path"
    try:
        mine = RECORD_KEY in json.loads(out.read_text())
    except (OSError, ValueError, TypeError):
        mine = False
    if not mine:
        return f"--out {out} was not written by longswap harness; --overwrite leaves it alone"
    return None


def unknown_tasks(names: list[str], include_path: Path | None) -> list[str]:
    """The names lm-eval does not know (with longswap's tasks and ``include_path``)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(p) for p in (TASKS_DIR, include_path) if p])
    return [name for name in names if name not in manager.all_tasks]


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """The Hugging Face hub and datasets switched off for the enclosed code."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_harness(config: HarnessConfig) -> dict[str, Any]:
    """Run lm-eval on ``config.model``; write and return the record. Raises ValueError on a
    bad config, before any work."""
    if found := harness_problems(config):
        raise ValueError("; ".join(found))
    names = task_names(config)
    with offline():
        if unknown := unknown_tasks(names, config.include_path):
            raise ValueError(
                f"lm-eval knows no task {', '.join(unknown)}: name lm-eval tasks, the preset "
                f"{', '.join(PRESETS)}, or tasks under --include-path"
            )
        from longswap.generate import load_for_generation

        model, tokenizer = load_for_generation(
            config.model, config.device, config.dtype, config.base
        )
        with tempfile.TemporaryDirectory(prefix="longswap-harness-") as folder:
            tokenizer.save_pretrained(folder)  # the synthetic tasks load it by its path
            results = _evaluate(model, tokenizer, names, folder, config)
    record = {
        RECORD_KEY: __version__,
        "model": str(config.model),
        "pattern": _pattern(model),
        "tasks": names,
        "lengths": config.lengths,
        "limit": config.limit,
        "results": results["results"],
        "versions": results.get("versions", {}),
        "n_samples": results.get("n-samples", {}),
        "environment": environment(model.device),
    }
    config.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(config.out, record)
    return record


def _evaluate(
    model: Any, tokenizer: Any, names: list[str], folder: str, config: HarnessConfig
) -> dict:
    """``lm_eval.simple_evaluate`` over ``names`` with the model object."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=config.batch_size,
        max_length=max(config.lengths) + 256,  # the prompt and the answer's tokens
    )
    paths = [str(p) for p in (TASKS_DIR, config.include_path) if p]
    metadata = {"max_seq_lengths": config.lengths, "tokenizer": folder}
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=config.num_fewshot,
        limit=config.limit,
        gen_kwargs=config.gen_kwargs,
        # The tasks read metadata from their manager (simple_evaluate's goes only to one it
        # makes itself).
        task_manager=TaskManager(include_path=paths, metadata=metadata),
        random_seed=config.seed,
        numpy_random_seed=config.seed,
        torch_random_seed=config.seed,
        fewshot_random_seed=config.seed,
        log_samples=False,
    )


def _pattern(model: Any) -> str:
    """The model's longswap pattern (its layers' patterns, each once, `` ; ``-joined), or
    ``dense``."""
    from longswap.swap import swap_spec

    spec = swap_spec(model)
    return "dense" if spec is None else " ; ".join(dict.fromkeys(spec.layers))
