"""``longswap eval``: every model x task x length, one record each, resumable, with a report.

Records go to ``results.json`` as they finish (an interrupted run keeps them, and
``--resume`` continues from them); ``report.md`` and PNG plots are written at the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from longswap.checkpoint import model_problem
from longswap.cli_flags import BASE_HELP
from longswap.config import help_field
from longswap.data import local_documents, stdlib_documents
from longswap.data.tokenizer import fingerprint, tokenizer_for
from longswap.environment import environment
from longswap.evaluate.perplexity import perplexity, select_targets
from longswap.evaluate.selection import selection
from longswap.evaluate.speed import decode_speed
from longswap.evaluate.tasks import needles, passkey, recall
from longswap.io import explain_disk_full, output_problem, overlap_problems, write_json
from longswap.kernels.cpp import build_all
from longswap.positions import find_position_embedding
from longswap.swap import load, supported_length, swap_spec

Task = Literal["ppl", "passkey", "needles", "recall", "speed", "selection"]
TASKS = ("ppl", "passkey", "needles", "recall", "speed", "selection")


#: Where models are evaluated: the GPU when there is one (float32 either way).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class EvalConfig:
    """Evaluate models: perplexity vs length, passkey, associative recall, speed."""

    model: list[str] = help_field(
        "models to compare (base, swapped, fine-tuned, yours): model folders, longswap LoRA "
        "outputs or .gguf files",
        required=True,
        default_factory=list,
    )
    out: str = help_field("folder for results.json, report.md and plots", required=True, default="")
    base: str = help_field(BASE_HELP + "; for every LoRA output among them", default="")
    tasks: list[Task] = help_field(
        "any of ppl, passkey, needles, recall, speed, selection (the share of dense "
        "attention a block selection keeps; block_topk / learned_topk models)",
        default_factory=lambda: list(TASKS[:5]),
    )
    lengths: list[int] = help_field(
        "context lengths in tokens", default_factory=lambda: [1024, 2048]
    )
    depths: list[float] = help_field(
        "passkey depths in [0, 1]", default_factory=lambda: [0.0, 0.5, 1.0]
    )
    trials: int = help_field("passkey / recall prompts per cell", default=3)
    targets: int = help_field(
        "held-out tokens scored by perplexity, the same ones at every length", default=16384
    )
    spread: int = help_field(
        "perplexity targets come from at least this many held-out documents", default=8
    )
    data: list[str] = help_field(
        "text for perplexity (.txt/.md/.py/.jsonl/.json/.parquet files or folders); empty: "
        "the embedded corpus's held-out tests",
        default_factory=list,
    )
    resume: bool = help_field(
        "keep the records already in --out and compute the rest", default=False
    )


def _setting_problems(config: EvalConfig) -> list[str]:
    """Every out-of-range setting, each named with what is allowed."""
    found = [
        f"unknown task {t!r}; choose from {', '.join(TASKS)}"
        for t in config.tasks
        if t not in TASKS
    ]
    if not config.tasks:
        found.append("--tasks is empty; choose from " + ", ".join(TASKS))
    if not config.lengths or any(n < 1 for n in config.lengths):
        found.append(f"--lengths must be positive token counts, got {config.lengths}")
    if any(not 0 <= d <= 1 for d in config.depths) or not config.depths:
        found.append(
            f"--depths must lie within [0, 1] (a share of the context), got {config.depths}"
        )
    for flag, value in (("--trials", config.trials), ("--targets", config.targets)):
        if value < 1:
            found.append(f"{flag} must be at least 1, got {value}")
    if config.spread < 1:
        found.append(f"--spread must be at least 1, got {config.spread}")
    return found


def _earlier_records(config: EvalConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of ``--out``'s results.json when resuming; problems with that file."""
    results_file = Path(config.out) / "results.json"
    if not results_file.exists():
        return [], []
    if not config.resume:
        return [], [f"{results_file} exists; pass --resume to continue it or pick a new --out"]
    try:
        records = json.loads(results_file.read_text())["records"]
        if not all(isinstance(r, dict) and "key" in r for r in records):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        return [], [
            f"--resume: {results_file} is not a longswap results file (a JSON object whose "
            "'records' list holds records with a 'key'); move it away or pick a new --out"
        ]
    return records, []


#: Models already loaded, by path: each with its tokenizer.
Loaded = dict[Path, tuple[Any, PreTrainedTokenizerBase]]


def _check(
    config: EvalConfig, models: Loaded | None = None
) -> tuple[list[tuple[Path, Any, PreTrainedTokenizerBase]], list[dict[str, Any]]]:
    """Check settings and load every model before any work; one message lists all problems.

    Returns the models with their tokenizers, and the records to resume from. ``models``:
    models loaded by an earlier call, taken from it, and given those this call loads.
    """
    found, loaded = _setting_problems(config), []
    if not config.out:
        found.append("--out is required")
    elif problem := output_problem(Path(config.out)):
        found.append(problem)
    else:
        inputs = [("--model", m) for m in config.model] + [("--data", d) for d in config.data]
        found += overlap_problems(Path(config.out), inputs, adds_only=True)
    if not config.model:
        found.append("at least one --model is required")
    records, problems = _earlier_records(config) if config.out else ([], [])
    found += problems
    adapters = {Path(m) for m in config.model if (Path(m) / "adapter_config.json").is_file()}
    if config.base and not adapters:
        found.append(f"--base {config.base} is for LoRA outputs, and no --model is one")
    for path in map(Path, config.model):
        if problem := model_problem(path, flag="model"):
            found.append(problem)
            continue
        if models is not None and path in models:
            loaded.append((path, *models[path]))
            continue
        try:
            base = config.base if config.base and path in adapters else None
            model = load(path, base=base).eval().to(DEVICE)
            tok = tokenizer_for(path)
        except Exception as err:  # a broken folder can fail in many ways
            found.append(f"model {path} could not be loaded: {err}")
            continue
        vocab = model.get_input_embeddings().num_embeddings
        if len(tok) > vocab:
            found.append(
                f"the tokenizer of {path} has {len(tok)} tokens but the model embeds only "
                f"{vocab}: they do not belong together"
            )
        loaded.append((path, model, tok))
        if models is not None:
            models[path] = (model, tok)
    if found:
        raise ValueError("cannot evaluate:\n- " + "\n- ".join(found))
    return loaded, records


def _targets_context(config: EvalConfig) -> int:
    """Context before every perplexity target: the longest length's, so targets never change."""
    longest = max(config.lengths)
    return longest - longest // 2


def _heldout(config: EvalConfig, tok: PreTrainedTokenizerBase) -> list[torch.Tensor]:
    """The held-out documents (token ids) that hold the perplexity targets for ``tok``."""
    docs = local_documents(config.data) if config.data else stdlib_documents("heldout")
    # Documents run longer than the model's window on purpose (perplexity slides windows
    # over them): ``verbose=False`` drops only the tokenizer's too-long-sequence warning.
    ids = (
        torch.tensor(tok(d.text, add_special_tokens=False, verbose=False)["input_ids"])
        for d in docs
    )
    chosen = select_targets(ids, config.targets, _targets_context(config), config.spread)
    return [doc for doc, _ in chosen]


def _grid(
    config: EvalConfig, loaded: list[tuple[Path, Any, PreTrainedTokenizerBase]]
) -> list[tuple[str, int, tuple[float, ...], Path]]:
    """Every (task, length, cell, model) of the run, in order."""
    return [
        (task, length, cell, path)
        for path, _, _ in loaded
        for task in config.tasks
        for length in config.lengths
        for cell in ([(d,) for d in config.depths] if task == "passkey" else [()])
    ]


def _key(path: Path, task: str, length: int, cell: tuple[float, ...]) -> str:
    return f"{path}|{task}|{length}" + (f"|{cell[0]}" if cell else "")


def evaluate(config: EvalConfig, models: Loaded | None = None) -> list[dict[str, Any]]:
    """Run the grid, writing each record as it finishes; returns all records.

    ``models``: a dict that keeps the loaded models between calls (several calls over the
    same models load each once); None: loaded for this call only.
    """
    loaded, records = _check(config, models)
    heldout = {}
    if {"ppl", "selection"} & set(config.tasks):
        by_tokenizer: dict[str, list[torch.Tensor]] = {}  # arms that share a tokenizer
        for path, _, tok in loaded:
            key = fingerprint(tok) or str(path)
            if key not in by_tokenizer:
                by_tokenizer[key] = _heldout(config, tok)
            heldout[path] = by_tokenizer[key]
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    done = {r["key"] for r in records}
    todo = [c for c in _grid(config, loaded) if _key(c[3], *c[:3]) not in done]
    stamp = environment()
    models = {path: (model, tok) for path, model, tok in loaded}
    on_cpu = [m for m, _ in models.values() if next(m.parameters()).device.type == "cpu"]
    if any(swap_spec(m) is not None for m in on_cpu):
        build_all()  # a kernel's build (about a minute, once per machine) is timed nowhere
    kept = f" {results_file} keeps the records before this one: --resume continues from them."
    for task, length, cell, path in tqdm(todo, desc="longswap eval", unit="record"):
        model, tok = models[path]
        record = {
            "key": _key(path, task, length, cell),
            "model": str(path),
            "task": task,
            "length": length,
            "config": {"trials": config.trials, "targets": config.targets, "spread": config.spread},
            "environment": stamp,
        }
        supported = supported_length(model)
        # Rotary positions are defined at any length: measure beyond the trained length
        # (that degradation is the point of a length study). A learned table ends there.
        if find_position_embedding(model, model.config) and length > supported:
            record["skipped"] = (
                f"length {length} is beyond the {supported} learned positions of "
                "this model (swap or fine-tune it with a larger max_length)"
            )
        else:
            if length > supported:
                record["beyond_trained"] = supported
            try:
                record.update(_run(task, model, tok, heldout.get(path), length, cell, config))
            except ValueError as err:
                record["skipped"] = str(err)
        records.append(record)
        with explain_disk_full(out, kept):
            write_json(results_file, {"records": records})
    from longswap.evaluate.report import write_report

    write_report(records, out)
    return records


def _run(
    task: str,
    model: Any,
    tok: PreTrainedTokenizerBase,
    documents: list[torch.Tensor] | None,
    length: int,
    cell: tuple,
    config: EvalConfig,
) -> dict[str, Any]:
    if task == "ppl":
        context = _targets_context(config)
        result = perplexity(
            model, documents, length, config.targets, context=context, spread=config.spread
        )
        if len(tok) == 257:  # the byte tokenizer: one token per byte
            result["bits_per_byte"] = result["bits_per_token"]
        return result
    if task == "passkey":
        return passkey(model, tok, length, cell[0], config.trials)
    if task == "recall":
        return recall(model, tok, length, config.trials)
    if task == "needles":
        return needles(model, tok, length, trials=config.trials)
    if task == "selection":
        return selection(model, max(documents, key=len), length)
    return decode_speed(model, length)
