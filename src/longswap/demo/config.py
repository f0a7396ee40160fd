"""The demo's settings (``DemoConfig``), what they plan for a base (``Plan``), the problems
found in them before any work, and the ``longswap finetune`` command of a trained arm."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from longswap.checkpoint import is_gguf, model_problem
from longswap.config import help_field
from longswap.demo.verdict import learned_counterpart
from longswap.io import output_problem, overlap_problems
from longswap.patterns import parse_pattern
from longswap.train.budget import available_gb, config_forward_gb, config_step_gb, machine_gb
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
        "passkey depth, and a fine-tuning length halved from --factor's until it fits the "
        "machine's memory",
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

    def plan(self, trained: int, fits: Callable[[int], bool] = lambda tokens: True) -> Plan:
        """The lengths, budget and evaluation grid of this demo for a base trained at
        ``trained`` tokens; a quick run halves its fine-tuning length (from ``--factor``)
        until a step of it ``fits`` the machine, while the pattern stays sparse there."""
        tuned = self.seq_len or self.factor * trained
        if self.quick and not self.seq_len:
            pattern = parse_pattern(self.pattern)
            while not fits(tuned) and tuned // 2 >= 64 and not pattern.covers(tuned // 2):
                tuned //= 2
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
    #: A fine-tuning step's estimated memory (GB) at ``tuned`` (see :func:`plan_for`).
    step_gb: float | None = None


def training_device() -> torch.device:
    """Where the arms train and are evaluated: CUDA when there is one (``--device auto``)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def plan_for(config: DemoConfig, base: Any, machine: float | None = None) -> Plan:
    """:meth:`DemoConfig.plan` for a base with config ``base``, a quick run fitted into
    ``machine`` GB (default: all the memory of the device the arms train on), with the
    estimated memory of a fine-tuning step (:func:`config_step_gb`)."""
    if machine is None:
        machine = machine_gb(training_device())

    def fits(tokens: int) -> bool:
        return machine is None or config_step_gb(base, tokens) <= machine

    plan = config.plan(base.max_position_embeddings, fits)
    plan.step_gb = config_step_gb(base, plan.tuned)
    return plan


def budget_problems(config: DemoConfig, base: Any, plan: Plan) -> list[str]:
    """Why ``plan`` does not fit the memory available now (a fine-tuning step at its
    fine-tuning length, a forward at its longest length), each with the flags that fit."""
    available = available_gb(training_device())
    if available is None:
        return []
    found, pattern = [], parse_pattern(config.pattern)
    here = f"{available:.1f} GB are available"
    if plan.step_gb is not None and plan.step_gb > available:
        flag = "--seq-len" if config.seq_len else "--quick" if config.quick else "--factor"
        fits = _halving(
            plan.tuned,
            lambda n: not pattern.covers(n) and config_step_gb(base, n) <= available,
        )
        advice = (
            f"--seq-len {fits} fits (about {config_step_gb(base, fits):.1f} GB)"
            if fits
            else "no shorter length at which the pattern still skips keys fits either; free "
            "memory, or use a machine with more or a smaller base"
        )
        found.append(
            f"a fine-tuning step of one {plan.tuned}-token sequence ({flag}) needs about "
            f"{plan.step_gb:.1f} GB (estimated from the base's config: weights, gradients, "
            f"optimizer moments and the activations a full fine-tuning keeps), but {here}: "
            f"{advice}"
        )
    forward = config_forward_gb(base, plan.longest)
    if forward > available:
        fits = _halving(plan.longest, lambda n: config_forward_gb(base, n) <= available)
        found.append(
            f"evaluating at {plan.longest} tokens (the longest of --lengths, --passkey-lengths "
            f"and the fine-tuning length) needs about {forward:.1f} GB, but {here}: "
            + (f"lengths up to {fits} fit" if fits else "no length fits")
        )
    return found


def _halving(tokens: int, fits: Callable[[int], bool]) -> int | None:
    """The longest of ``tokens / 2, tokens / 4, ...`` (64 or more) that ``fits``."""
    while tokens // 2 >= 64:
        tokens //= 2
        if fits(tokens):
            return tokens
    return None


def problems(config: DemoConfig) -> list[str]:
    """Every problem of ``config`` (flags, model, lengths, --out), before any work."""
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
    if not 0 < config.learning_rate < math.inf:
        found.append(f"learning_rate must be a positive number, got {config.learning_rate!r}")
    if not 0 <= config.synthetic_ratio < 1:
        found.append(f"synthetic_ratio must be in [0, 1), got {config.synthetic_ratio!r}")
    if not isinstance(config.seed, int) or not 0 <= config.seed < 2**32:
        found.append(f"seed must be an integer in [0, 2**32) (numpy's seeds), got {config.seed!r}")
    for name in ("lengths", "passkey_lengths"):
        if any(not isinstance(n, int) or n < 64 for n in getattr(config, name)):
            flag = name.replace("_", "-")
            found.append(f"--{flag} must be token counts >= 64, got {getattr(config, name)}")
    if any(not 0 <= d <= 1 for d in config.depths):
        found.append(
            f"--depths must lie within [0, 1] (a share of the context), got {config.depths}"
        )
    if pattern is not None and not found:  # the arms fine-tune at the fine-tuning length
        try:
            base = base_config(model)
        except Exception as err:  # noqa: BLE001 (any unreadable config: one clear message)
            found.append(
                f"--model {model}: its config could not be read ({type(err).__name__}: "
                f"{err}); is it a complete Hugging Face model folder or .gguf file?"
            )
        else:
            plan = plan_for(config, base)
            flag = "--seq-len" if config.seq_len else "--factor"
            found += length_problems(pattern, plan.tuned, flag)
            found += budget_problems(config, base, plan) if not found else []
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


def base_config(model: Path) -> Any:
    """The config of a base (a model folder or a .gguf file); a GGUF file is read once per
    process (its whole metadata, vocabulary included, is parsed for it: seconds)."""
    if is_gguf(model):
        stat = model.stat()
        return copy.deepcopy(_gguf_config(str(model.resolve()), stat.st_mtime_ns, stat.st_size))
    return AutoConfig.from_pretrained(model)


@functools.lru_cache(maxsize=4)
def _gguf_config(path: str, mtime_ns: int, size: int) -> Any:
    """The config in the GGUF file ``path`` (its modification time and size in the key, so
    that a file replaced since is read again)."""
    file = Path(path)
    return AutoConfig.from_pretrained(file.parent, gguf_file=file.name)


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
    # Validation on a few sequences (a smoke run's on two).
    command += ["--validation-sequences", "2" if config.quick else str(VALIDATION_SEQUENCES)]
    # An arm that stops is trained again from its start: resume checkpoints would be
    # written (optimizer state included) only to be deleted.
    command += ["--no-checkpoints"]
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
