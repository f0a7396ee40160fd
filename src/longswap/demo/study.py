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
import shlex
import shutil
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
from longswap.demo.children import _combined, _finetune, _say
from longswap.demo.heldout import HELDOUT_PARTS, heldout_folder, heldout_source
from longswap.demo.report import report
from longswap.demo.verdict import ARMS, learned_counterpart, verdict
from longswap.environment import environment
from longswap.evaluate.report import line_plot
from longswap.evaluate.run import EvalConfig, evaluate
from longswap.io import output_problem, overlap_problems, save_checkpoint, staged_folder
from longswap.patterns import Pattern, format_pattern, parse_pattern
from longswap.swap import extend_positions, load, swap_attention
from longswap.train.finetune import length_problems

#: The dense model shipped with longswap (see assets/base/MODEL.md).
EMBEDDED_MODEL = Path(__file__).parents[1] / "assets" / "base"
#: The pattern the demo swaps in unless told otherwise (README: "Why this pattern").
DEFAULT_PATTERN = "sliding_window(window=512, sinks=4) | block_topk(block_size=64, top_k=16)"
#: Held-out sequences each trained arm's validation scores (their loss is in the report).
VALIDATION_SEQUENCES = 8
#: Peak learning rate of a selector warm-up (the small gates take a large one).
SELECTOR_LEARNING_RATE = 5e-3


@dataclass
class DemoConfig:
    """Swap a dense model (the embedded one unless --model) to a sparse pattern, fine-tune,
    compare five or six arms."""

    out: str = help_field("folder for the arms, results and report", default="longswap-demo")
    pattern: str = help_field("sparse pattern of arms 2-4", default=DEFAULT_PATTERN)
    model: str = help_field(
        "dense base checkpoint (a model folder or a .gguf file), evaluated on longswap's own "
        "source; empty: the embedded model, evaluated on the standard library's tests",
        default="",
    )
    quick: bool = help_field(
        "a smoke run (about 2 minutes on the embedded model): 4 steps, two lengths, one "
        "passkey depth",
        default=False,
    )
    steps: int = help_field("fine-tuning steps of arms 3-6 (0: 100, or 4 with --quick)", default=0)
    factor: int = help_field(
        "fine-tuning length = factor x the base's trained length, unless --seq-len", default=8
    )
    seq_len: int = help_field(
        "fine-tuning length of arms 3-6 in tokens (0: --factor x the base's trained length)",
        default=0,
    )
    lengths: list[int] = help_field(
        "perplexity lengths (empty: the trained length, its doublings and the fine-tuning "
        "length); every arm's positions are extended to the longest",
        default_factory=list,
    )
    passkey_lengths: list[int] = help_field(
        "passkey lengths (empty: the trained length and the fine-tuning length)",
        default_factory=list,
    )
    depths: list[float] = help_field(
        "passkey depths in [0, 1] (empty: 0, 0.5 and 1, or 0.5 with --quick)",
        default_factory=list,
    )
    trials: int = help_field(
        "passkey prompts per length and depth (0: 3, or 1 with --quick)", default=0
    )
    targets: int = help_field(
        "held-out tokens that perplexity scores at every length (0: 16384, or 1024 with --quick)",
        default=0,
    )
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
    restart: bool = help_field(
        "discard an interrupted run of this demo instead of continuing it (a rerun with the "
        "same settings continues one, keeping its finished arms)",
        default=False,
    )

    def plan(self, trained: int) -> Plan:
        """The lengths, budget and evaluation grid of this demo for a base trained at
        ``trained`` tokens."""
        tuned = self.seq_len or self.factor * trained
        lengths = sorted(set(self.lengths)) or sorted({trained, tuned})
        doubling = not (self.quick or self.lengths) and len(lengths) > 1
        while doubling and lengths[-2] * 2 < lengths[-1]:  # the doublings in between
            lengths.insert(-1, lengths[-2] * 2)
        return Plan(
            trained=trained,
            tuned=tuned,
            lengths=lengths,
            passkey_lengths=sorted(set(self.passkey_lengths)) or sorted({trained, tuned}),
            longest=max(tuned, *lengths, *self.passkey_lengths),
            steps=self.steps or (4 if self.quick else 100),
            depths=self.depths or ([0.5] if self.quick else [0.0, 0.5, 1.0]),
            trials=self.trials or (1 if self.quick else 3),
            targets=self.targets or (1024 if self.quick else 16384),
        )


@dataclass
class Plan:
    """What a demo measures: the base's trained length, the fine-tuning length (``tuned``),
    the evaluation lengths, the length every arm's positions are extended to (``longest``),
    the fine-tuning steps and the evaluation's budget."""

    trained: int
    tuned: int
    lengths: list[int]
    passkey_lengths: list[int]
    longest: int
    steps: int
    depths: list[float]
    trials: int
    targets: int


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
    for name in ("seq_len", "trials", "targets"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 0:
            found.append(f"{name} must be an integer >= 0, got {value!r}")
    for name in ("lengths", "passkey_lengths"):
        if any(not isinstance(n, int) or n < 64 for n in getattr(config, name)):
            flag = name.replace("_", "-")
            found.append(f"--{flag} must be token counts >= 64, got {getattr(config, name)}")
    if any(not 0 <= d <= 1 for d in config.depths):
        found.append(
            f"--depths must lie within [0, 1] (a share of the context), got {config.depths}"
        )
    if pattern is not None and not found:  # the arms fine-tune at the fine-tuning length
        flag = "--seq-len" if config.seq_len else "--factor"
        found += length_problems(pattern, config.plan(_trained_length(model)).tuned, flag)
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


def _base_config(model: Path) -> Any:
    """The config of a base (a model folder or a .gguf file)."""
    if is_gguf(model):
        return AutoConfig.from_pretrained(model.parent, gguf_file=model.name)
    return AutoConfig.from_pretrained(model)


def _trained_length(model: Path) -> int:
    """The trained length of a base (a model folder or a .gguf file), from its config."""
    return _base_config(model).max_position_embeddings


def finetune_command(
    config: DemoConfig, plan: Plan, start: Path, out: Path, pattern: str, method: str = "full"
) -> list[str]:
    """The ``longswap finetune`` command of one trained arm (printed in the report), at the
    plan's fine-tuning length with positions extended to its longest length;
    ``method="selector"``: the warm-up of its learned selectors."""
    command = ["longswap", "finetune", "--model", str(start), "--out", str(out)]
    command += ["--pattern", pattern] if pattern else []
    extend = plan.longest > max(plan.tuned, plan.trained)
    command += ["--max-length", str(plan.longest)] if extend else []
    # Validation on a few sequences (a smoke run's on two, without the budget's probe steps).
    command += ["--skip-budget-check"] if config.quick else []
    command += ["--validation-sequences", "2" if config.quick else str(VALIDATION_SEQUENCES)]
    rate = SELECTOR_LEARNING_RATE if method == "selector" else config.learning_rate
    steps = plan.steps
    for flag, value in (
        ("--method", method),
        ("--seq-len", plan.tuned),
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


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Build, train and evaluate the arms; write ``report.md`` and ``demo.json``.

    Everything is built in a staging folder beside ``--out``, which replaces ``--out`` only
    once the demo is complete: a failure or an interruption leaves an earlier demo as it was,
    and the staging folder with the arms finished so far, which a rerun with the same
    settings continues (``--restart`` discards it).
    """
    found = _problems(config)
    if found:
        raise ValueError("cannot run the demo:\n- " + "\n- ".join(found))
    began = time.perf_counter()
    hf_logging.disable_progress_bar()
    out = Path(config.out)
    with staged_folder(out, overwrite=config.overwrite, resume=not config.restart) as staging:
        _continue(config, staging)
        results, records = _study(config, staging, out)
        results["wall_seconds"] = time.perf_counter() - began
        (staging / "demo.json").write_text(json.dumps(results, indent=1))
        (staging / "report.md").write_text(report(results, records))
    _say(f"done in {results['wall_seconds']:.0f} s: {out / 'report.md'}")
    return results


#: The settings an interrupted demo was started with, in its staging folder.
SETTINGS_FILE = "demo-settings.json"


def _continue(config: DemoConfig, staging: Path) -> None:
    """Record the settings in a new staging folder, or check that an interrupted demo's
    match them (its finished arms are kept and the rest is done)."""
    settings = {k: v for k, v in asdict(config).items() if k not in ("overwrite", "restart")}
    file = staging / SETTINGS_FILE
    if not file.is_file():
        _say(f"building the demo in {staging}; it replaces {config.out} once complete")
        file.write_text(json.dumps(settings, indent=1))
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
    arms = staging / "arms"
    arms.mkdir(exist_ok=True)
    source = Path(config.model) if config.model else EMBEDDED_MODEL
    base = arms / ARMS[0]
    plan = config.plan(_trained_length(source))
    parsed = parse_pattern(config.pattern)
    pattern = format_pattern(parsed)
    _say(
        f"base {source} (trained at {plan.trained} tokens); pattern {pattern}; fine-tuning at "
        f"{plan.tuned} tokens, {plan.steps} steps; positions extended to {plan.longest}"
    )
    if not base.is_dir():  # arm 1: the base as a float checkpoint, positions extended
        dense = load(source)
        if plan.longest > plan.trained:
            extend_positions(dense, plan.longest)
        save_checkpoint(dense, base, source=source)
    if not (arms / ARMS[1]).is_dir():
        swapped = load(source)
        _say(f"arm 2: {swap_attention(swapped, pattern, max_length=plan.longest)}")
        save_checkpoint(swapped, arms / ARMS[1], source=source)
    cost = {}
    trained_arms = [
        (ARMS[2], source, pattern),
        (ARMS[3], staging / "random-init", pattern),
        (ARMS[4], source, ""),
    ]
    learned = learned_counterpart(parsed) if config.learned else None
    if learned is not None:
        trained_arms.append((ARMS[5], source, format_pattern(learned)))
    (staging / "cost").mkdir(exist_ok=True)
    for arm, start, arm_pattern in trained_arms:
        record = staging / "cost" / f"{arm}.json"
        if not record.is_file():
            if start == staging / "random-init":
                _random_init(source, config.seed, start)
            _train_arm(config, plan, staging, out, arm, start, arm_pattern, record)
        c = cost[arm] = json.loads(record.read_text())
        _say(
            f"{arm}: {c['wall_seconds']:.1f} s wall, {c['cpu_seconds']:.1f} s CPU, "
            f"{c['tokens_per_second']:.0f} tok/s"
        )
    shutil.rmtree(staging / "random-init", ignore_errors=True)
    records = _evaluate(config, plan, parsed, staging)
    records = _relocated(records, staging, out)
    (staging / "eval" / "results.json").write_text(json.dumps({"records": records}, indent=1))
    pretrained_plot(records, staging / "eval")
    results = {
        "config": asdict(config),
        "base": str(source),
        "heldout": heldout_source(config.model),
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


def _random_init(source: Path, seed: int, folder: Path) -> None:
    """Arm 4's starting point: the base's architecture with fresh weights from ``seed``."""
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(_base_config(source)).save_pretrained(folder)
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
        spent.append(_finetune(run, shown, staging / f"{name}.log", plan.steps, failed_log))
        start = folder
    shutil.rmtree(arms / arm / "checkpoints", ignore_errors=True)  # resume state only
    shutil.rmtree(staging / f"{arm}-selectors", ignore_errors=True)  # the arm holds them
    record.write_text(json.dumps(_combined(spent), indent=1))


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
        data=[str(heldout_folder(staging))] if config.model else [],
    )
    common["spread"] = HELDOUT_PARTS if config.model else 4 if config.quick else 8
    _say(
        f"evaluating {len(built)} arms: perplexity at {plan.lengths}, speed at {plan.tuned}, "
        f"passkey at {plan.passkey_lengths}"
    )
    evaluate(EvalConfig(**common, tasks=["ppl"], lengths=plan.lengths))
    evaluate(EvalConfig(**common, tasks=["speed"], lengths=[plan.tuned]))
    records = evaluate(EvalConfig(**common, tasks=["passkey"], lengths=plan.passkey_lengths))
    if parsed.data_dependent:  # how much of dense attention each selection keeps
        common["model"] = [str(arms / a) for a in (ARMS[2], ARMS[5]) if a in built]
        records = evaluate(EvalConfig(**common, tasks=["selection"], lengths=[plan.tuned]))
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
