"""What pre-training and fine-tuning share before training: the checks of a run's fields
(one message listing every problem), what makes a run (so ``--resume`` refuses another),
and the folder a run writes into."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from longswap.io import (
    clear_leftovers,
    explain_disk_full,
    interrupted_write,
    is_empty,
    leftover_problems,
    mark_written,
    output_problem,
    overlap_problems,
    replace_problem,
    staged_folder,
)
from longswap.train.config import TrainingFields
from longswap.train.distributed import main_process, wait_for_everyone


def common_problems(config: TrainingFields) -> list[str]:
    """Problems with the fields every run has."""
    found = []
    if not config.out:
        found.append("--out is required")
    else:
        out = Path(config.out)
        inputs = [("--data", path) for path in config.data]
        if getattr(config, "model", ""):  # fine-tuning's
            inputs.insert(0, ("--model", config.model))
        if overlaps := overlap_problems(out, inputs):  # then the state of --out is beside the point
            found += overlaps
        elif main_process():  # the other processes of a launch follow it (it alone writes)
            found += _out_problems(config, out)
    if config.no_checkpoints and config.save_steps:
        found.append(
            f"--save-steps {config.save_steps} with --no-checkpoints: a run writes checkpoints "
            "or it does not; drop one of the two"
        )
    for path in config.data:
        if not Path(path).exists():
            found.append(f"data path {path} does not exist")
    for name, low in (("seq_len", 8), ("steps", 1), ("batch_size", 1), ("eval_steps", 1)):
        value = getattr(config, name)
        if not isinstance(value, int) or value < low:
            found.append(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0 < config.learning_rate < math.inf:
        found.append(f"learning_rate must be a positive number, got {config.learning_rate!r}")
    if not 0 <= config.weight_decay < math.inf:
        found.append(f"weight_decay must be a number >= 0, got {config.weight_decay!r}")
    for name in ("warmup_steps", "save_steps", "validation_sequences"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 0:
            found.append(f"{name} must be an integer >= 0, got {value!r}")
    if not 0 <= config.synthetic_ratio < 1:
        found.append(f"synthetic_ratio must be in [0, 1), got {config.synthetic_ratio!r}")
    if not 0 < config.validation_share < 1:
        found.append(f"validation_share must be in (0, 1), got {config.validation_share!r}")
    if isinstance(config.validation_sequences, int) and config.validation_sequences > 64:
        found.append(
            f"validation_sequences must be 0 (as many as fill 65,536 tokens) or 1 to 64, got "
            f"{config.validation_sequences}"
        )
    if not isinstance(config.seed, int) or not 0 <= config.seed < 2**32:
        found.append(f"seed must be an integer in [0, 2**32), got {config.seed!r}")
    return found


#: What a run is, written beside its checkpoints: a resumed run must be the same run.
RUN_FILE = "longswap_run.json"
#: The fields that make a run: changing one of them and resuming would mix two runs.
RUN_FIELDS = (
    "model",
    "pattern",
    "method",
    "seq_len",
    "max_length",
    "size",
    "lora_rank",
    "full_layers",
    "dtype",
    "selector_rows",
    "selector_reuse",
    "kl_weight",
)


def run_fields(config: TrainingFields) -> dict[str, Any]:
    """The fields of ``config`` that make the run (:data:`RUN_FIELDS`)."""
    return {f: getattr(config, f) for f in RUN_FIELDS if hasattr(config, f)}


def _resume_problems(config: TrainingFields, record: Path) -> list[str]:
    """Fields of ``config`` that differ from the run being resumed (recorded in ``record``)."""
    if not record.is_file():
        return []  # checkpoints from before this record existed: nothing to compare
    try:
        before = json.loads(record.read_text())
    except (OSError, ValueError) as err:
        return [f"--resume: {record} is unreadable ({err}); remove it to resume anyway"]
    return [
        f"--resume: this run was started with {name}={before[name]!r}, not {value!r}; resume "
        "it with the same settings, or start a new run in another --out"
        for name, value in run_fields(config).items()
        if name in before and before[name] != value
    ]


def _out_problems(config: TrainingFields, out: Path) -> list[str]:
    """What the state of ``out`` (and of an unfinished run beside it) says against the run.

    Checked by the main process alone: it starts writing there while the other processes of
    a launch may still be checking, and they would find its first files."""
    found = []
    unfinished = unfinished_run(out)
    if out.exists() and not out.is_dir():
        found.append(f"--out {out} exists and is not a folder")
    elif problem := output_problem(out):
        found.append(problem)
    elif unfinished and not config.resume:
        found.append(
            f"{unfinished} holds the checkpoints of an unfinished run that replaces --out "
            f"{out} once it finishes: pass --resume to continue it, or delete "
            f"{unfinished.parent} to start again"
        )
    elif not is_empty(out) and not (config.overwrite or config.resume):
        found.append(f"--out {out} is not empty; pass --resume to continue or --overwrite")
    elif config.overwrite and not config.resume and (problem := replace_problem(out)):
        found.append(problem)
    found += leftover_problems(out)
    home = unfinished or out
    if config.resume and not (home / "checkpoints").is_dir():
        found.append(f"--resume: {home}/checkpoints holds no checkpoint to resume from")
    elif config.resume:
        found += _resume_problems(config, home / "checkpoints" / RUN_FILE)
    return found


def refuse(found: list[str], what: str) -> None:
    """Raise one ValueError listing every problem, if there are any."""
    if found:
        raise ValueError(f"invalid {what} configuration:\n- " + "\n- ".join(found))


def unfinished_run(out: Path) -> Path | None:
    """The folder beside ``out`` where an interrupted ``--overwrite`` run left checkpoints
    (it replaces ``out`` once it finishes; ``--resume`` continues it), or None."""
    folder = interrupted_write(out)
    return folder if folder is not None and any(folder.glob("checkpoints/checkpoint-*")) else None


@contextlib.contextmanager
def run_folder(config: TrainingFields) -> Iterator[Path]:
    """The folder a run trains in, and writes its checkpoints and final files into.

    That is ``--out`` itself, unless ``--overwrite`` replaces a non-empty ``--out``: then a
    staging folder beside it, which takes ``--out``'s place once the run has finished (the
    earlier ``--out`` stays as it was until then). A failed or interrupted run keeps its
    folder and checkpoints, and ``--resume`` continues it there. Of a distributed run, only
    the main process creates, clears and moves folders; the others wait for it on the way
    in and out."""
    out, main = Path(config.out), main_process()
    unfinished = unfinished_run(out)
    if config.resume and unfinished:
        if main:
            print(
                f"longswap: continuing the run in {unfinished}; it replaces {out} once it finishes",
                file=sys.stderr,
                flush=True,
            )
        folder = staged_folder(out, overwrite=True, main=main, resume=True)
    elif config.overwrite and not config.resume and not is_empty(out):
        folder = staged_folder(out, overwrite=True, main=main, keep=True)
    else:
        folder = contextlib.nullcontext(out)
        if main:
            out.mkdir(parents=True, exist_ok=True)
            clear_leftovers(out)
            mark_written(out)
    with folder as path:
        wait_for_everyone()
        kept = (
            f" The run's checkpoints are kept in {path / 'checkpoints'}: the same command "
            "with --resume continues it once there is space."
        )
        try:
            with explain_disk_full(path, kept):
                yield path
        except BaseException as err:  # a ValueError says what is left already
            if (
                main
                and not isinstance(err, ValueError)
                and any(path.glob("checkpoints/checkpoint-*"))
            ):
                print(
                    f"longswap: the run stopped; its checkpoints are kept in "
                    f"{path / 'checkpoints'}: the same command with --resume continues it",
                    file=sys.stderr,
                    flush=True,
                )
            raise
    wait_for_everyone()
