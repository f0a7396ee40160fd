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

Arms 3, 5 and 6 start from the base; a GGUF base is converted to a float checkpoint once
(``base-float`` beside the arms, removed at the end) rather than read by every fine-tuning.
A pattern with learned selection (``learned_topk``) gets its selectors warmed up first
(``--method selector``: distilled from that arm's own dense attention, model frozen, as
many steps as the fine-tuning), and the warm-up's cost counts in the arm's.

Every arm is evaluated by ``longswap eval`` (perplexity vs length, passkey, speed; the
share of dense attention each selection keeps, for arms 3 and 6). The report states the
expectations and, for each, whether the measurements agree.
"""

from __future__ import annotations

import copy
import json
import shlex
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from longswap.checkpoint import is_gguf
from longswap.data.tokenizer import tokenizer_for
from longswap.demo.children import _combined, _say, run_arm
from longswap.demo.config import (
    EMBEDDED_MODEL,
    DemoConfig,
    Plan,
    base_config,
    finetune_command,
    plan_for,
    problems,
)
from longswap.demo.heldout import heldout_folder, heldout_source, heldout_spread
from longswap.demo.report import report
from longswap.demo.verdict import ARMS, learned_counterpart, verdict
from longswap.environment import environment
from longswap.evaluate.report import line_plot
from longswap.evaluate.run import EvalConfig, Loaded, evaluate
from longswap.io import save_checkpoint, staged_folder, write_atomic, write_json
from longswap.patterns import Pattern, format_pattern, parse_pattern
from longswap.swap import extend_positions, load, swap_attention


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Build, train and evaluate the arms; write ``report.md`` and ``demo.json``.

    Everything is built in a staging folder beside ``--out``, which replaces ``--out`` only
    once the demo is complete: a failure or an interruption leaves an earlier demo as it was,
    and the staging folder with the arms finished so far, which a rerun with the same
    settings continues (``--restart`` discards it).
    """
    found = problems(config)
    if found:
        raise ValueError("cannot run the demo:\n- " + "\n- ".join(found))
    began = time.perf_counter()
    hf_logging.disable_progress_bar()
    out = Path(config.out)
    with staged_folder(out, overwrite=config.overwrite, resume=not config.restart) as staging:
        _continue(config, staging)
        spent = staging / SPENT_FILE
        earlier = json.loads(spent.read_text()) if spent.is_file() else []
        try:
            results, records = _study(config, staging, out)
        finally:  # an interrupted or failed attempt's time counts in the demo's
            attempts = [*earlier, time.perf_counter() - began]
            write_json(spent, attempts)
        results["wall_seconds"], results["attempts"] = sum(attempts), len(attempts)
        write_json(staging / "demo.json", results)
        write_atomic(staging / "report.md", report(results, records))
    _say(f"done in {results['wall_seconds']:.0f} s: {out / 'report.md'}")
    return results


#: The settings an interrupted demo was started with, in its staging folder.
SETTINGS_FILE = "demo-settings.json"
#: The wall seconds of each attempt at the demo so far (a continued one has several).
SPENT_FILE = "wall-seconds.json"


def _continue(config: DemoConfig, staging: Path) -> None:
    """Record the settings in a new staging folder, or check that an interrupted demo's
    match them (its finished arms are kept and the rest is done)."""
    settings = {k: v for k, v in asdict(config).items() if k not in ("overwrite", "restart")}
    file = staging / SETTINGS_FILE
    if not file.is_file():
        _say(f"building the demo in {staging}; it replaces {config.out} once complete")
        write_json(file, settings)
        return
    before = json.loads(file.read_text())
    differ = [
        f"--{k.replace('_', '-')} {before.get(k)!r} then, {v!r} now"
        for k, v in settings.items()
        if before.get(k) != v
    ]
    if differ:
        raise ValueError(
            f"an interrupted demo with other settings is in {staging} ({'; '.join(differ)}): "
            "rerun with its settings to continue it, or pass --restart to discard it"
        )
    done = sorted(p.stem for p in (staging / "cost").glob("*.json"))
    _say(
        f"continuing the interrupted demo in {staging} (arms finished: {', '.join(done) or 'none'})"
    )


def _study(config: DemoConfig, staging: Path, out: Path) -> tuple[dict[str, Any], list[dict]]:
    """The arms built in ``staging``; results and records name ``out``, their final home.

    Each finished step leaves a mark in ``staging`` (an arm's folder, its cost record, the
    evaluation's records) and is skipped when an interrupted demo is continued."""
    (staging / "arms").mkdir(exist_ok=True)
    source = Path(config.model) if config.model else EMBEDDED_MODEL
    plan = plan_for(config, base_config(source))
    parsed = parse_pattern(config.pattern)
    pattern = format_pattern(parsed)
    _say(
        f"base {source} (trained at {plan.trained} tokens); pattern {pattern}; fine-tuning at "
        f"{plan.tuned} tokens, {plan.steps} steps; positions extended to {plan.longest}"
    )
    learned = learned_counterpart(parsed) if config.learned else None
    trained_arms = [  # (arm, where it starts: None for the base, its pattern)
        (ARMS[2], None, pattern),
        (ARMS[3], staging / "random-init", pattern),
        (ARMS[4], None, ""),
        *([(ARMS[5], None, format_pattern(learned))] if learned is not None else []),
    ]
    (staging / "cost").mkdir(exist_ok=True)
    marks = {arm: staging / "cost" / f"{arm}.json" for arm, _, _ in trained_arms}
    todo = any(not marks[arm].is_file() for arm, begin, _ in trained_arms if begin is None)
    from_base = _base_arms(source, plan, pattern, staging, todo)
    cost = {}
    for arm, start, arm_pattern in trained_arms:
        if not marks[arm].is_file():
            if start is not None:
                _random_init(source, config.seed, start)
            start = from_base if start is None else start
            _train_arm(config, plan, staging, out, arm, start, arm_pattern, marks[arm])
        c = cost[arm] = json.loads(marks[arm].read_text())
        _say(
            f"{arm}: {c['wall_seconds']:.1f} s wall, {c['cpu_seconds']:.1f} s CPU, "
            f"{c['tokens_per_second']:.0f} tok/s"
        )
    shutil.rmtree(staging / FLOAT_BASE, ignore_errors=True)
    shutil.rmtree(staging / "random-init", ignore_errors=True)
    records = _evaluate(config, plan, parsed, staging)
    records = _relocated(records, staging, out)
    write_json(staging / "eval" / "results.json", {"records": records})
    pretrained_plot(records, staging / "eval")
    results = {
        "config": asdict(config),
        "base": str(source),
        "heldout": heldout_source(config.model, config.quick),
        "pattern": pattern,
        "learned_pattern": format_pattern(learned) if learned is not None else None,
        "trained_length": plan.trained,
        "long_length": plan.tuned,
        "plan": asdict(plan),
        "steps": plan.steps,
        "cost": cost,
        "verdict": verdict(records, cost, parsed, plan),
        "environment": environment(),
    }
    return results, records


#: A GGUF base converted once to a float checkpoint, where the arms trained from the base
#: start (each fine-tuning would read and dequantise the file again); removed at the end.
FLOAT_BASE = "base-float"


def _base_arms(source: Path, plan: Plan, pattern: str, staging: Path, training: bool) -> Path:
    """Arms 1 and 2 from one load of the base (reading a GGUF file takes seconds); returns
    where the arms trained from the base start: the base, or a GGUF file's float copy
    (written when ``training`` is left to do)."""
    arms = staging / "arms"
    dense, swapped = arms / ARMS[0], arms / ARMS[1]
    start = staging / FLOAT_BASE if is_gguf(source) else source
    convert = training and start != source and not start.is_dir()
    if dense.is_dir() and swapped.is_dir() and not convert:
        return start
    pretrained = load(source)
    written: list[Path] = []  # the first save converts the tokenizer, later ones copy it

    def save(model: Any, folder: Path) -> None:
        save_checkpoint(model, folder, source=written[-1] if written else source)
        written.append(folder)

    if convert:
        save(pretrained, start)
    if not dense.is_dir():  # arm 1: the base as a float checkpoint, positions extended
        model = copy.deepcopy(pretrained)
        if plan.longest > plan.trained:
            extend_positions(model, plan.longest)
        save(model, dense)
    if not swapped.is_dir():
        _say(f"arm 2: {swap_attention(pretrained, pattern, max_length=plan.longest)}")
        save(pretrained, swapped)
    return start


def _random_init(source: Path, seed: int, folder: Path) -> None:
    """Arm 4's starting point: the base's architecture with fresh weights from ``seed``."""
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(base_config(source)).save_pretrained(folder)
    tokenizer_for(folder.parent / "arms" / ARMS[0]).save_pretrained(folder)


def _train_arm(
    config: DemoConfig,
    plan: Plan,
    staging: Path,
    out: Path,
    arm: str,
    start: Path,
    pattern: str,
    record: Path,
) -> None:
    """Fine-tune one arm (its selectors' warm-up first, for a learned selection) and write
    its cost to ``record``; an unfinished earlier try of it is discarded first."""
    arms = staging / "arms"
    stages = [(arm, arms / arm, "full")]
    if pattern and parse_pattern(pattern).needs_selector:  # warm-up first
        stages.insert(0, (f"{arm}-selectors", staging / f"{arm}-selectors", "selector"))
    spent = []
    for name, folder, method in stages:
        shutil.rmtree(folder, ignore_errors=True)
        run = finetune_command(config, plan, start, folder, pattern, method)
        shown = [_moved(part, staging, out) for part in run]
        _say(f"{name}: {shlex.join(shown)}")
        failed_log = out.with_name(f"{out.name}-{name}-failed.log")
        argv = [sys.executable, "-m", "longswap", *run[1:]]
        spent.append(run_arm(argv, shown, staging / f"{name}.log", plan.steps, failed_log))
        start = folder
    shutil.rmtree(arms / arm / "checkpoints", ignore_errors=True)  # resume state only
    shutil.rmtree(staging / f"{arm}-selectors", ignore_errors=True)  # the arm holds them
    write_json(record, _combined(spent))


def _evaluate(config: DemoConfig, plan: Plan, parsed: Pattern, staging: Path) -> list[dict]:
    """Every arm evaluated by ``longswap eval`` (resuming the records already there):
    perplexity at every length, speed at the fine-tuning length, passkey, and the selection
    task for the selecting arms."""
    arms = staging / "arms"
    built = [a for a in ARMS if (arms / a).is_dir()]
    common = dict(
        model=[str(arms / a) for a in built],
        out=str(staging / "eval"),
        trials=plan.trials,
        depths=plan.depths,
        targets=plan.targets,
        resume=True,
        data=[str(heldout_folder(staging, config.quick))] if config.model else [],
    )
    common["spread"] = heldout_spread(config.model, config.quick)
    _say(
        f"evaluating {len(built)} arms: perplexity at {plan.lengths}, speed at {plan.tuned}, "
        f"passkey at {plan.passkey_lengths}"
    )
    loaded: Loaded = {}  # each arm loaded once for the four calls
    evaluate(EvalConfig(**common, tasks=["ppl"], lengths=plan.lengths), loaded)
    evaluate(EvalConfig(**common, tasks=["speed"], lengths=[plan.tuned]), loaded)
    passkeys = EvalConfig(**common, tasks=["passkey"], lengths=plan.passkey_lengths)
    records = evaluate(passkeys, loaded)
    if parsed.data_dependent:  # how much of dense attention each selection keeps
        common["model"] = [str(arms / a) for a in (ARMS[2], ARMS[5]) if a in built]
        selections = EvalConfig(**common, tasks=["selection"], lengths=[plan.tuned])
        records = evaluate(selections, loaded)
    return records


def pretrained_plot(records: list[dict], folder: Path) -> None:
    """``perplexity-pretrained.png`` in ``folder``: perplexity against length of the arms
    that start from the pre-trained weights (arm 4's, far above, would flatten them)."""
    rows = [r for r in records if r["task"] == "ppl" and Path(r["model"]).name != ARMS[3]]
    line_plot(rows, "perplexity", "perplexity (arm 4 left out)", folder / PRETRAINED_PLOT)


#: The plot of the arms that start from the pre-trained weights (the README's headline).
PRETRAINED_PLOT = "perplexity-pretrained.png"


def _moved(text: str, staging: Path, out: Path) -> str:
    """``text`` with the staging folder's path replaced by ``out``'s, its final home."""
    return text.replace(str(staging), str(out), 1)


def _relocated(records: list[dict], staging: Path, out: Path) -> list[dict]:
    """The records with their model paths moved from ``staging`` to ``out``."""
    return [
        r | {"model": _moved(r["model"], staging, out), "key": _moved(r["key"], staging, out)}
        for r in records
    ]
