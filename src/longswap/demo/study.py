"""``longswap demo``: does swap-then-fine-tune work, and why start from pre-trained weights?

Up to six arms share one data stream and one budget (steps, tokens, sequence length),
starting from the embedded dense model (pre-trained at ``T`` tokens):

1. the dense base, evaluated at ``T`` and at ``factor * T``;
2. the base swapped to the sparse pattern, not trained;
3. the swapped model fine-tuned at ``factor * T``, initialised from the base (the method);
4. the same sparse model initialised at random, fine-tuned with the identical budget;
5. the base fine-tuned with dense attention at ``factor * T`` (the dense baseline);
6. with ``--learned``, when the pattern selects blocks by MoBA's mean keys (``block_topk``):
   arm 3 with a learned selector in their place, same block size and budget
   (``learned_topk``), what distilling the selector from dense attention adds.

A pattern with learned selection (``learned_topk``) gets its selectors warmed up first
(``--method selector``: distilled from that arm's own dense attention, model frozen, as
many steps as the fine-tuning), and the warm-up's cost counts in the arm's.

Every arm is evaluated by ``longswap eval`` (perplexity vs length, passkey, speed; the
share of dense attention each selection keeps, for arms 3 and 6). The report states the
expectations and, for each, whether the measurements agree.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from longswap.checkpoint import is_gguf, model_problem
from longswap.config import help_field
from longswap.data.tokenizer import tokenizer_for
from longswap.demo.report import report
from longswap.demo.verdict import ARMS, learned_counterpart, verdict
from longswap.environment import environment
from longswap.evaluate.run import EvalConfig, evaluate
from longswap.io import output_problem, overlap_problems, save_checkpoint, staged_folder
from longswap.patterns import format_pattern, parse_pattern
from longswap.swap import load, save, swap_attention
from longswap.train.finetune import length_problems

#: The dense model shipped with longswap (see assets/base/MODEL.md).
EMBEDDED_MODEL = Path(__file__).parents[1] / "assets" / "base"
#: The pattern the demo swaps in unless told otherwise (README: "Why this pattern").
DEFAULT_PATTERN = "block_topk(block_size=128, top_k=4)"
#: A Trainer progress bar in a fine-tuning log: ``n/total [``.
_BAR = re.compile(r"(\d+)/(\d+) \[")
#: Seconds between two progress lines of a fine-tuning arm on the console.
PROGRESS_EVERY = 15.0
#: Peak learning rate of a selector warm-up (the small gates take a large one).
SELECTOR_LEARNING_RATE = 5e-3


@dataclass
class DemoConfig:
    """Swap the embedded dense model to a sparse pattern, fine-tune, compare five or six arms."""

    out: str = help_field("folder for the arms, results and report", default="longswap-demo")
    pattern: str = help_field("sparse pattern of arms 2-4", default=DEFAULT_PATTERN)
    model: str = help_field("dense base checkpoint; empty: the embedded model", default="")
    quick: bool = help_field(
        "a smoke run (about 2 minutes): 4 steps, two lengths, one passkey depth", default=False
    )
    steps: int = help_field("fine-tuning steps of arms 3-6 (0: 100, or 4 with --quick)", default=0)
    factor: int = help_field("long length = factor x the base's trained length", default=8)
    learning_rate: float = help_field("peak learning rate of arms 3-6", default=5e-4)
    synthetic_ratio: float = help_field(
        "share of fine-tuning sequences that are synthetic passkey / recall tasks", default=0.25
    )
    learned: bool = help_field(
        "add arm 6: arm 3 with a selector distilled from dense attention in place of "
        "block_topk's mean keys (learned_topk, same budget; about 3 minutes more on 2 cores)",
        default=False,
    )
    seed: int = help_field("seed of data order, random init and evaluation", default=0)
    overwrite: bool = help_field("replace an earlier demo's --out", default=False)


def _problems(config: DemoConfig) -> list[str]:
    found, pattern = [], None
    try:
        pattern = parse_pattern(config.pattern)
    except ValueError as err:
        found.append(f"--pattern: {err}")
    else:
        if config.learned and learned_counterpart(pattern) is None:
            found.append(
                f"--learned compares a learned selector with block_topk's mean keys, and "
                f"{config.pattern} has no block_topk to compare with (a pattern without "
                "selection, or one whose selection is learned already): leave out --learned, "
                "or use a pattern with block_topk"
            )
    model = Path(config.model) if config.model else EMBEDDED_MODEL
    if problem := model_problem(model):
        found.append(problem)
    if not isinstance(config.steps, int) or config.steps < 0:
        found.append(f"steps must be an integer >= 0, got {config.steps!r}")
    if not isinstance(config.factor, int) or config.factor < 2:
        found.append(f"factor must be an integer >= 2, got {config.factor!r}")
    elif pattern is not None and not found:  # the arms fine-tune at the long length
        found += length_problems(pattern, config.factor * _trained_length(model), "--factor")
    out = Path(config.out)
    found += overlap_problems(out, [("--model", model)])
    if problem := output_problem(out):
        found.append(problem)
    elif out.is_dir() and any(out.iterdir()):
        if not config.overwrite:
            found.append(f"--out {out} is not empty; pass --overwrite or pick another folder")
        elif not (out / "demo.json").is_file() and not (out / "arms").is_dir():
            found.append(
                f"--out {out} holds files that are not an earlier demo's; --overwrite only "
                "replaces a demo folder, pick another --out"
            )
    return found


def _trained_length(model: Path) -> int:
    """The trained length of a base (a model folder or a .gguf file), from its config."""
    if is_gguf(model):
        config = AutoConfig.from_pretrained(model.parent, gguf_file=model.name)
    else:
        config = AutoConfig.from_pretrained(model)
    return config.max_position_embeddings


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def finetune_command(
    config: DemoConfig,
    start: Path,
    out: Path,
    pattern: str,
    length: int,
    steps: int,
    method: str = "full",
) -> list[str]:
    """The ``longswap finetune`` command of one trained arm at ``length`` tokens (printed
    in the report); ``method="selector"``: the warm-up of its learned selectors."""
    command = ["longswap", "finetune", "--model", str(start), "--out", str(out)]
    command += ["--pattern", pattern] if pattern else []
    rate = SELECTOR_LEARNING_RATE if method == "selector" else config.learning_rate
    for flag, value in (
        ("--method", method),
        ("--seq-len", length),
        ("--steps", steps),
        ("--batch-size", 1),
        ("--learning-rate", rate),
        ("--warmup-steps", max(1, steps // 10)),
        ("--eval-steps", steps),
        ("--synthetic-ratio", config.synthetic_ratio),
        ("--seed", config.seed),
    ):
        command += [flag, str(value)]
    return command


def _steps_done(log: Path, steps: int) -> int:
    """Steps done according to the last Trainer progress bar (``n/steps [``) in ``log``."""
    done = [
        int(n) for n, total in _BAR.findall(log.read_text(errors="replace")) if int(total) == steps
    ]
    return done[-1] if done else 0


def _progress(arm: str, done: int, steps: int, rate: float | None, log: Path) -> str:
    """A console line: steps done of ``steps``, time left at ``rate`` seconds a step, the log."""
    if done == steps:
        state = "validating and saving"
    elif rate is None:
        state = "starting" if done == 0 else "estimating the time left"
    else:
        state = f"about {rate * (steps - done):.0f} s left"
    return f"{arm}: step {done}/{steps}, {state} (log: {log})"


def _run_child(command: list[str], log: Path, arm: str, steps: int) -> tuple[int, Any, float]:
    """Run one arm's fine-tuning, printing its progress; returns status, rusage, wall seconds."""
    began = time.perf_counter()
    with log.open("w") as sink:
        child = subprocess.Popen(
            [sys.executable, "-m", "longswap", *command[1:]], stdout=sink, stderr=subprocess.STDOUT
        )
        shown, said, first = -1, began, None  # first: (time, steps) when a step was first seen
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                return status, usage, time.perf_counter() - began
            time.sleep(0.5)
            done, now = _steps_done(log, steps), time.perf_counter()
            if done and first is None:
                first = (now, done)
            if done != shown and (now - said >= PROGRESS_EVERY or done in (0, steps)):
                rate = (now - first[0]) / (done - first[1]) if first and done > first[1] else None
                _say(_progress(arm, done, steps, rate, log))
                shown, said = done, now


def _finetune(
    command: list[str], shown: list[str], log: Path, steps: int, failed_log: Path
) -> dict[str, Any]:
    """Run one arm's fine-tuning in its own process; its wall and CPU time and peak memory.

    ``shown`` is the command as the report prints it (with the final output folder); a
    failure copies the log to ``failed_log``, since the staging folder goes away.
    """
    status, usage, wall = _run_child(command, log, log.stem, steps)
    if os.waitstatus_to_exitcode(status) != 0:
        shutil.copy2(log, failed_log)
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"fine-tuning failed: {shlex.join(shown)}\n{tail}\n(log: {failed_log})")
    record = json.loads(
        (Path(command[command.index("--out") + 1]) / "longswap_train.json").read_text()
    )
    return {
        "command": shlex.join(shown),
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "wall_seconds": wall,
        "train_seconds": record["train_seconds"],
        "tokens_per_second": record["train_tokens_per_second"],
        "tokens": record["config"]["steps"] * record["config"]["seq_len"],
        "peak_memory_mb": usage.ru_maxrss / 1024,  # kilobytes on Linux
        "validation_loss": record["eval_loss"],
        "notes": record["notes"],
    }


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Build, train and evaluate the arms; write ``report.md`` and ``demo.json``.

    Everything is built in a staging folder beside ``--out``, which replaces ``--out`` only
    once the demo is complete: a failure or an interruption leaves an earlier demo as it was.
    """
    found = _problems(config)
    if found:
        raise ValueError("cannot run the demo:\n- " + "\n- ".join(found))
    began = time.perf_counter()
    hf_logging.disable_progress_bar()
    out = Path(config.out)
    with staged_folder(out, overwrite=config.overwrite) as staging:
        _say(f"building the demo in {staging}; it replaces {out} once complete")
        results, records = _study(config, staging, out)
        results["wall_seconds"] = time.perf_counter() - began
        (staging / "demo.json").write_text(json.dumps(results, indent=1))
        (staging / "report.md").write_text(report(results, records))
    _say(f"done in {results['wall_seconds']:.0f} s: {out / 'report.md'}")
    return results


def _study(config: DemoConfig, staging: Path, out: Path) -> tuple[dict[str, Any], list[dict]]:
    """The arms built in ``staging``; results and records name ``out``, their final home."""
    arms = staging / "arms"
    arms.mkdir()
    base = Path(config.model) if config.model else EMBEDDED_MODEL
    if is_gguf(base):  # arm 1 is the GGUF model as a float checkpoint; the arms start from it
        save_checkpoint(load(base), arms / ARMS[0], source=base)
        base = arms / ARMS[0]
    else:
        shutil.copytree(base, arms / ARMS[0], ignore=shutil.ignore_patterns("*.md"))
    parsed = parse_pattern(config.pattern)
    pattern = format_pattern(parsed)
    trained = _trained_length(base)
    long = config.factor * trained
    steps = config.steps or (4 if config.quick else 100)
    _say(f"base {base} (trained at {trained} tokens); pattern {pattern}; long length {long}")

    swapped = load(base)
    swap_report = swap_attention(swapped, pattern, max_length=long)
    save(swapped, arms / ARMS[1])
    tokenizer_for(base).save_pretrained(arms / ARMS[1])
    _say(f"arm 2: {swap_report}")

    torch.manual_seed(config.seed)
    random_init = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    random_init.save_pretrained(staging / "random-init")
    tokenizer_for(base).save_pretrained(staging / "random-init")
    cost = {}
    trained_arms = [
        (ARMS[2], base, pattern),
        (ARMS[3], staging / "random-init", pattern),
        (ARMS[4], base, ""),
    ]
    learned = learned_counterpart(parsed) if config.learned else None
    if learned is not None:
        trained_arms.append((ARMS[5], base, format_pattern(learned)))
    for arm, start, arm_pattern in trained_arms:
        stages = [(arm, arms / arm, "full")]
        if arm_pattern and parse_pattern(arm_pattern).needs_selector:  # warm-up first
            stages.insert(0, (f"{arm}-selectors", staging / f"{arm}-selectors", "selector"))
        spent = []
        for name, folder, method in stages:
            run = finetune_command(config, start, folder, arm_pattern, long, steps, method)
            shown = [_moved(part, staging, out) for part in run]
            _say(f"{name}: {shlex.join(shown)}")
            failed_log = out.with_name(f"{out.name}-{name}-failed.log")
            spent.append(_finetune(run, shown, staging / f"{name}.log", steps, failed_log))
            start = folder
        shutil.rmtree(arms / arm / "checkpoints", ignore_errors=True)  # resume state only
        shutil.rmtree(staging / f"{arm}-selectors", ignore_errors=True)  # the arm holds them
        c = cost[arm] = _combined(spent)
        _say(
            f"{arm}: {c['wall_seconds']:.1f} s wall, {c['cpu_seconds']:.1f} s CPU, "
            f"{c['tokens_per_second']:.0f} tok/s"
        )
    shutil.rmtree(staging / "random-init")

    lengths = [trained, long]
    while not config.quick and lengths[-2] * 2 < long:  # the doublings in between
        lengths.insert(-1, lengths[-2] * 2)
    built = [a for a in ARMS if (arms / a).is_dir()]
    common = dict(model=[str(arms / a) for a in built], out=str(staging / "eval"), trials=3)
    if config.quick:
        common.update(trials=1, depths=[0.5], targets=1024, spread=4)
    _say(
        f"evaluating {len(built)} arms: perplexity and speed at {lengths}, passkey at "
        f"{[trained, long]}"
    )
    evaluate(EvalConfig(**common, tasks=["ppl", "speed"], lengths=lengths))
    records = evaluate(
        EvalConfig(**common, tasks=["passkey"], lengths=[trained, long], resume=True)
    )
    if parsed.data_dependent:  # how much of dense attention each selection keeps
        common["model"] = [str(arms / a) for a in (ARMS[2], ARMS[5]) if a in built]
        records = evaluate(EvalConfig(**common, tasks=["selection"], lengths=[long], resume=True))
    records = _relocated(records, staging, out)
    (staging / "eval" / "results.json").write_text(json.dumps({"records": records}, indent=1))
    results = {
        "config": asdict(config),
        "pattern": pattern,
        "learned_pattern": format_pattern(learned) if learned is not None else None,
        "trained_length": trained,
        "long_length": long,
        "steps": steps,
        "cost": cost,
        "verdict": verdict(records, cost, parsed, trained, long),
        "environment": environment(),
    }
    return results, records


def _combined(stages: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm's cost from its stages' (a selector warm-up, then the fine-tuning): times
    added, the largest peak memory, the last stage's speed and validation loss."""
    last = stages[-1]
    return last | {
        "command": "\n".join(s["command"] for s in stages),
        "cpu_seconds": sum(s["cpu_seconds"] for s in stages),
        "wall_seconds": sum(s["wall_seconds"] for s in stages),
        "train_seconds": sum(s["train_seconds"] for s in stages),
        "peak_memory_mb": max(s["peak_memory_mb"] for s in stages),
        "notes": [n for s in stages for n in s["notes"]],
    }


def _moved(text: str, staging: Path, out: Path) -> str:
    """``text`` with the staging folder's path replaced by ``out``'s, its final home."""
    return text.replace(str(staging), str(out), 1)


def _relocated(records: list[dict], staging: Path, out: Path) -> list[dict]:
    """The records with their model paths moved from ``staging`` to ``out``."""
    return [
        r | {"model": _moved(r["model"], staging, out), "key": _moved(r["key"], staging, out)}
        for r in records
    ]
