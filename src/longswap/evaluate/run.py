"""``longswap eval``: every model x task x length, one record each, resumable, with a report.

Records go to ``results.json`` as they finish (an interrupted run keeps them, and
``--resume`` continues from them); ``report.md`` and PNG plots are written at the end.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from longswap.data import local_documents, stdlib_documents
from longswap.data.tokenizer import tokenizer_for
from longswap.evaluate.environment import environment, peak_rss_mb, reset_peak_rss
from longswap.evaluate.perplexity import perplexity
from longswap.evaluate.tasks import needles, passkey, recall
from longswap.positions import find_position_embedding
from longswap.swap import load, supported_length
from longswap.train.config import help_field

Task = Literal["ppl", "passkey", "needles", "recall", "speed"]
TASKS = ("ppl", "passkey", "needles", "recall", "speed")


@dataclass
class EvalConfig:
    """Evaluate models: perplexity vs length, passkey, associative recall, speed."""

    model: list[str] = help_field(
        "model folders to compare (base, swapped, fine-tuned, yours)", default_factory=list
    )
    out: str = help_field("folder for results.json, report.md and plots", default="")
    tasks: list[str] = help_field(
        "any of ppl, passkey, needles, recall, speed", default_factory=lambda: list(TASKS)
    )
    lengths: list[int] = help_field(
        "context lengths in tokens", default_factory=lambda: [1024, 2048]
    )
    depths: list[float] = help_field(
        "passkey depths in [0, 1]", default_factory=lambda: [0.0, 0.5, 1.0]
    )
    trials: int = help_field("passkey / recall prompts per cell", default=3)
    targets: int = help_field("tokens scored by perplexity at every length", default=512)
    data: list[str] = help_field(
        "text for perplexity; empty: the embedded corpus's held-out tests", default_factory=list
    )
    resume: bool = help_field(
        "keep the records already in --out and compute the rest", default=False
    )


def _check(config: EvalConfig) -> list[tuple[Path, Any, PreTrainedTokenizerBase]]:
    """Load every model and tokenizer before any work; one message lists all problems."""
    found, loaded = [], []
    if not config.out:
        found.append("--out is required")
    if not config.model:
        found.append("at least one --model is required")
    for task in config.tasks:
        if task not in TASKS:
            found.append(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    for path in map(Path, config.model):
        if not (path / "config.json").is_file():
            found.append(f"model {path} is unreadable: no config.json there")
            continue
        try:
            model = load(path).eval()
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
    out = Path(config.out) if config.out else None
    if out and (out / "results.json").exists() and not config.resume:
        found.append(f"{out}/results.json exists; pass --resume to continue it or pick a new --out")
    if found:
        raise ValueError("cannot evaluate:\n- " + "\n- ".join(found))
    return loaded


def _text(config: EvalConfig) -> str:
    docs = local_documents(config.data) if config.data else stdlib_documents("heldout")
    return "\n".join(d.text for d in docs[:200])


def _speed(model: Any, length: int) -> dict[str, Any]:
    ids = torch.randint(0, 200, (1, length), generator=torch.Generator().manual_seed(0))
    reset_peak_rss()
    base = peak_rss_mb("VmRSS")
    with torch.no_grad():
        start = time.perf_counter()
        model(ids)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),  # a token equal to the pad id is no padding
            use_cache=True,  # decoding speed is measured with the KV cache
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
            pad_token_id=0,
        )
        decode = time.perf_counter() - start - prefill
    return {
        "prefill_tokens_per_s": length / prefill,
        "decode_tokens_per_s": 16 / max(decode, 1e-9),
        "peak_rss_growth_mb": max(peak_rss_mb() - base, 0.0),
    }


def evaluate(config: EvalConfig) -> list[dict[str, Any]]:
    """Run the grid, writing each record as it finishes; returns all records."""
    loaded = _check(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    records: list[dict[str, Any]] = (
        json.loads(results_file.read_text())["records"] if results_file.exists() else []
    )
    done = {r["key"] for r in records}
    stamp = environment()
    text = _text(config) if "ppl" in config.tasks else ""
    total = (
        len(loaded)
        * len(config.lengths)
        * sum(len(config.depths) if t == "passkey" else 1 for t in config.tasks)
    )
    progress = tqdm(total=total, desc="longswap eval", unit="record", initial=len(done))
    for path, model, tok in loaded:
        supported = supported_length(model)
        # Rotary positions are defined at any length: measure beyond the trained length
        # (that degradation is the point of a length study). A learned table ends there.
        hard_limit = supported if find_position_embedding(model, model.config) else None
        tokens = torch.tensor(tok(text, add_special_tokens=False)["input_ids"]) if text else None
        for task in config.tasks:
            for length in config.lengths:
                cells = [(d,) for d in config.depths] if task == "passkey" else [()]
                for cell in cells:
                    key = f"{path}|{task}|{length}" + (f"|{cell[0]}" if cell else "")
                    if key in done:
                        continue
                    record = {
                        "key": key,
                        "model": str(path),
                        "task": task,
                        "length": length,
                        "config": {"trials": config.trials, "targets": config.targets},
                        "environment": stamp,
                    }
                    if hard_limit is not None and length > hard_limit:
                        record["skipped"] = (
                            f"length {length} is beyond the {supported} learned positions of "
                            "this model (swap or fine-tune it with a larger max_length)"
                        )
                    else:
                        if length > supported:
                            record["beyond_trained"] = supported
                        try:
                            record.update(_run(task, model, tok, tokens, length, cell, config))
                        except ValueError as err:
                            record["skipped"] = str(err)
                    records.append(record)
                    results_file.write_text(json.dumps({"records": records}, indent=1))
                    progress.update()
    progress.close()
    from longswap.evaluate.report import write_report

    write_report(records, out)
    return records


def _run(
    task: str,
    model: Any,
    tok: PreTrainedTokenizerBase,
    tokens: torch.Tensor | None,
    length: int,
    cell: tuple,
    config: EvalConfig,
) -> dict[str, Any]:
    if task == "ppl":
        result = perplexity(model, tokens, length, config.targets)
        if len(tok) == 257:  # the byte tokenizer: one token per byte
            result["bits_per_byte"] = result["bits_per_token"]
        return result
    if task == "passkey":
        return passkey(model, tok, length, cell[0], config.trials)
    if task == "recall":
        return recall(model, tok, length, config.trials)
    if task == "needles":
        return needles(model, tok, length, trials=config.trials)
    return _speed(model, length)
