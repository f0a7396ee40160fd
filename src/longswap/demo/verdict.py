"""The demo's verdict and report: its expectations checked against the measured records.

Perplexities are compared with their bootstrap intervals: an expectation holds when the
whole interval is on its side of the threshold, fails when the whole interval is on the other
side, and is left undecided ("within noise") when the threshold falls inside. The cost of
fine-tuning is judged by the CPU seconds of each arm's process, which the machine's load
barely moves; wall times are shown beside them, and flagged when the two disagree.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import torch

from longswap.evaluate.report import table
from longswap.patterns import BlockTopK, LearnedTopK, Pattern, SelectionUnion, parse_pattern

#: Arm folder names, in study order (the sixth only with ``--learned``).
ARMS = (
    "1-dense",
    "2-swapped",
    "3-swap-finetune",
    "4-random-finetune",
    "5-dense-finetune",
    "6-learned-finetune",
)
#: How much worse than a comparison a result may be and still count as "no worse" / "close".
NO_WORSE, CLOSE, WIDE, DEGRADES = 1.05, 1.10, 1.5, 1.10
#: "A fraction of the cost": arm 3's CPU seconds at most this share of arm 5's.
FRACTION = 0.75
#: Passkey retrieval "works": mean accuracy over the depths at the long length.
RETRIEVES = 0.8
#: Wall times are unreliable when the arms' CPU-per-wall-second differ by more than this.
UNRELIABLE = 1.25


class Estimate(NamedTuple):
    """A perplexity with its interval (all three equal where no interval was recorded)."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        if self.low == self.high:
            return f"{self.value:.2f}"
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]"


def at_most(x: Estimate, y: Estimate, factor: float) -> bool | None:
    """Whether ``x <= factor * y``: decided only when both intervals agree, else None."""
    if x.high <= factor * y.low:
        return True
    if x.low > factor * y.high:
        return False
    return None


def at_least(x: Estimate, y: Estimate, factor: float) -> bool | None:
    """Whether ``x >= factor * y``: decided only when both intervals agree, else None."""
    if x.low >= factor * y.high:
        return True
    if x.high < factor * y.low:
        return False
    return None


def _all(*parts: bool | None) -> bool | None:
    """Three-valued "and": False if any part fails, None if any is undecided, else True."""
    if False in parts:
        return False
    return None if None in parts else True


def sees_every_depth(pattern: Pattern, length: int) -> bool:
    """Whether the last query of ``length`` tokens can attend to keys at every depth.

    Data-dependent patterns (block_topk) count as able: any complete block may be selected.
    """
    if pattern.data_dependent:
        return True
    if pattern.reach() is not None:
        return pattern.reach() >= length - 1
    depths = torch.arange(length // 8, length, length // 8)
    last = torch.full_like(depths, length - 1)
    return bool(pattern.mask_fn(length, 2)(last, depths, torch.zeros_like(depths)).all())


def _matching(
    records: list[dict], arm: str, task: str, length: int, field: str, depth: float | None = None
) -> list[dict]:
    return [
        r
        for r in records
        if Path(r["model"]).name == arm and r["task"] == task and r["length"] == length
        if field in r and depth in (None, r.get("depth"))
    ]


def _metric(
    records: list[dict], arm: str, task: str, length: int, field: str, depth: float | None = None
) -> float:
    """Mean of ``field`` over the records of one arm, task, length (and depth); NaN if none."""
    values = [r[field] for r in _matching(records, arm, task, length, field, depth)]
    return sum(values) / len(values) if values else math.nan


def perplexity_of(records: list[dict], arm: str, length: int) -> Estimate:
    """The perplexity of one arm at one length with its interval; NaN if not measured."""
    found = _matching(records, arm, "ppl", length, "perplexity")
    if not found:
        return Estimate(math.nan, math.nan, math.nan)
    value = found[0]["perplexity"]
    return Estimate(value, *found[0].get("perplexity_ci", (value, value)))


def wall_times_unreliable(cost: dict[str, dict[str, Any]]) -> bool:
    """Whether the arms' wall times disagree with their CPU times (a loaded machine)."""
    use = [c["cpu_seconds"] / c["wall_seconds"] for c in cost.values() if c["wall_seconds"] > 0]
    return bool(use) and max(use) > UNRELIABLE * min(use)


def _why(holds: bool | None) -> str:
    return " (within noise: the threshold lies inside the intervals)" if holds is None else ""


def learned_counterpart(pattern: Pattern) -> Pattern | None:
    """Arm 6's pattern: ``pattern`` with its mean-key selection (``block_topk``, alone or in
    a union) replaced by a learned selector of the same block size, ``top_k`` and
    granularity (per head); None when it has no such selection (a static pattern, or one
    whose selection is learned)."""
    if isinstance(pattern, SelectionUnion):
        learned = learned_counterpart(pattern.selection)
        return None if learned is None else pattern.static | learned
    if isinstance(pattern, BlockTopK) and not pattern.needs_selector:  # MoBA selects per head
        return LearnedTopK(block_size=pattern.block_size, top_k=pattern.top_k, per_head=True)
    return None


def arms_in(records: list[dict]) -> list[str]:
    """The arms that ``records`` measure, in study order."""
    names = {Path(r["model"]).name for r in records}
    return [arm for arm in ARMS if arm in names]


def _passkey_row(
    records: list[dict], pattern: Pattern, trained: int, long: int
) -> tuple[str, str, bool | None]:
    """Retrieval at the long length by the sparse fine-tuned arms (3, and 6 if run); when it
    fails, why, from the dense fine-tune's (arm 5) retrieval with the same budget."""
    found = {
        arm: _metric(records, arm, "passkey", long, "accuracy")
        for arm in (ARMS[2], ARMS[5])
        if arm in arms_in(records)
    }
    reach = sees_every_depth(pattern, long)
    measured_arms = {arm: v for arm, v in found.items() if not math.isnan(v)}
    works = all(v >= RETRIEVES for v in measured_arms.values()) if reach and measured_arms else None
    measured = (
        f"passkey accuracy at {long}: "
        + ", ".join(f"arm {arm[0]} {value:.0%}" for arm, value in found.items())
        + f" (works: >= {RETRIEVES:.0%}); the last query "
        + ("can" if reach else "cannot (not applicable)")
        + " attend to keys at every depth"
    )
    if works is False:
        dense = _metric(records, ARMS[4], "passkey", long, "accuracy")
        failing = [arm for arm, v in measured_arms.items() if v < RETRIEVES]
        at_trained = {arm: _metric(records, arm, "passkey", trained, "accuracy") for arm in failing}
        short = ", ".join(
            f"arm {arm[0]} {v:.0%}" for arm, v in at_trained.items() if not math.isnan(v)
        )
        if dense < RETRIEVES:
            measured += (
                f". Why not: the dense fine-tune (arm 5) retrieves {dense:.0%} at {long} with "
                "the same budget, so the budget falls short, not the pattern: these steps do "
                f"not teach this model retrieval across {long} tokens"
                + (f" (at {trained}: {short})" if short else "")
                + "; --steps buys more"
            )
        else:
            measured += (
                f". Why not: the dense fine-tune (arm 5) retrieves {dense:.0%} at {long} with "
                "the same budget, so the sparse pattern loses what dense attention finds"
            )
    return f"Passkey retrieval at {long} works for patterns with long-range reach", measured, works


def _learned_row(records: list[dict], cost: dict, long: int) -> tuple[str, str, bool | None]:
    """Arm 6 against arm 3: the share of dense attention each selection keeps (the
    ``selection`` task), perplexity, and cost."""
    a3, a6 = (perplexity_of(records, arm, long) for arm in (ARMS[2], ARMS[5]))
    kept = [_metric(records, arm, "selection", long, "captured_mass") for arm in (ARMS[2], ARMS[5])]
    best = [_metric(records, arm, "selection", long, "oracle_mass") for arm in (ARMS[2], ARMS[5])]
    better = None if math.isnan(kept[0] + kept[1]) else kept[1] > kept[0]
    headroom = kept[0] / best[0] if best[0] > 0 else math.nan
    no_worse = at_most(a6, a3, NO_WORSE)
    c3, c6 = cost[ARMS[2]]["cpu_seconds"], cost[ARMS[5]]["cpu_seconds"]
    return (
        "A selector distilled from dense attention (arm 6) keeps more of it than MoBA's mean "
        "keys (arm 3), at no loss of quality",
        f"share of dense attention on the keys seen at {long}: arm 6 {kept[1]:.3f}, arm 3 "
        f"{kept[0]:.3f} (the best selection of the budget: {best[1]:.3f}, {best[0]:.3f}; mean "
        f"keys keep {headroom:.1%} of what the best keeps, the rest is what "
        "distillation can add); "
        f"perplexity at {long}: arm 6 {a6}, arm 3 {a3} (no worse: up to x{NO_WORSE})"
        f"{_why(no_worse)}; CPU time {c6:.1f} s vs {c3:.1f} s",
        _all(better, no_worse),
    )


def verdict(
    records: list[dict], cost: dict, pattern: Pattern, trained: int, long: int
) -> list[dict[str, Any]]:
    """The expectations of the study, each with its measured numbers and outcome.

    Perplexities are given as ``value [interval]`` and judged with the intervals (see the
    module's docstring); the cost, by CPU seconds.
    """
    a1_short, a1_long = (
        perplexity_of(records, ARMS[0], trained),
        perplexity_of(records, ARMS[0], long),
    )
    a3, a4, a5 = (perplexity_of(records, arm, long) for arm in ARMS[2:5])
    c3, c5 = cost[ARMS[2]]["cpu_seconds"], cost[ARMS[4]]["cpu_seconds"]
    w3, w5 = cost[ARMS[2]]["wall_seconds"], cost[ARMS[4]]["wall_seconds"]
    wide, no_worse = at_least(a4, a3, WIDE), at_most(a3, a1_short, NO_WORSE)
    close, degrades = at_most(a3, a5, CLOSE), at_least(a1_long, a1_short, DEGRADES)
    unreliable = (
        " (wall times unreliable: the machine was loaded)" if wall_times_unreliable(cost) else ""
    )
    rows = [
        (
            "Arm 3 beats arm 4 (random init, same budget) by a wide margin",
            f"perplexity at {long}: arm 3 {a3}, arm 4 {a4} (x{a4.value / a3.value:.2f}; "
            f"wide: >= x{WIDE}){_why(wide)}",
            wide,
        ),
        (
            f"Arm 3 at {long} is no worse than arm 1 at its trained length {trained}",
            f"perplexity: arm 3 {a3} at {long}, arm 1 {a1_short} at {trained} "
            f"(allowed up to x{NO_WORSE}){_why(no_worse)}",
            no_worse,
        ),
        (
            "Arm 3 is close to arm 5 (dense fine-tune) at a fraction of its cost",
            f"perplexity at {long}: arm 3 {a3}, arm 5 {a5} (close: within x{CLOSE}){_why(close)}; "
            f"CPU time {c3:.1f} s vs {c5:.1f} s ({c3 / c5:.3f} of it; a fraction: <= "
            f"{FRACTION}); wall time {w3:.1f} s vs {w5:.1f} s{unreliable}",
            _all(close, c3 <= FRACTION * c5),
        ),
        *([_learned_row(records, cost, long)] if ARMS[5] in cost else []),
        (
            f"Arm 1 degrades at {long} compared with {trained}",
            f"perplexity: {a1_short} at {trained}, {a1_long} at {long} "
            f"(degrades: > x{DEGRADES}){_why(degrades)}",
            degrades,
        ),
        _passkey_row(records, pattern, trained, long),
    ]
    return [{"claim": c, "measured": m, "holds": h} for c, m, h in rows]


def outcome(holds: bool | None, emphasis: str = "**") -> str:
    """An expectation's outcome in words; a failure stands out (``emphasis`` around it)."""
    if holds is None:
        return "not decided (the measured column says why)"
    return "holds" if holds else f"{emphasis}does not hold{emphasis}"


def _intro(results: dict[str, Any]) -> list[str]:
    trained, long = results["trained_length"], results["long_length"]
    env, last = results["environment"], 6 if results.get("learned_pattern") else 5
    lines = [
        "# longswap demo",
        "",
        f"Base: a dense byte-level Llama trained at {trained} tokens. Pattern of arms 2-4: "
        f"`{results['pattern']}`. Arms 3-{last}: {results['steps']} full fine-tuning steps "
        f"of {long} tokens each, same data and seed. Wall time "
        f"{results['wall_seconds']:.0f} s on {env['device']} ({env['threads']} threads).",
        "",
    ]
    if results.get("learned_pattern"):
        lines[-1:-1] = [
            f"Arm 6: arm 3 with `{results['learned_pattern']}`, the same budget of keys chosen "
            "by a selector distilled from the model's dense attention (warm-up with the model "
            "frozen, then trained along with it) instead of MoBA's mean keys.",
        ]
    elif learned_counterpart(parse_pattern(results["pattern"])) is not None:
        lines[-1:-1] = [
            "`longswap demo --learned` adds arm 6: the same budget of keys chosen by a "
            "selector distilled from the model's dense attention instead of mean keys.",
        ]
    if results["config"]["quick"]:
        lines += [
            f"**A `--quick` smoke run** ({results['steps']} steps, two lengths): it checks "
            "that every part works, and its verdict says little about the method; "
            "`longswap demo` runs the real study.",
            "",
        ]
    return lines


def _verdict_section(results: dict[str, Any]) -> list[str]:
    rows = [[v["claim"], v["measured"], outcome(v["holds"])] for v in results["verdict"]]
    return [
        "## Verdict",
        "",
        *table(["expectation", "measured", "outcome"], rows, right=3),
        "Each outcome is computed from the numbers below with the thresholds shown; one that "
        "does not hold is reported as measured (the README's demo section discusses the "
        "default run). Perplexities carry their 95% bootstrap intervals in brackets; an "
        "expectation about them is decided only when the intervals lie wholly on one side of "
        "its threshold, and is otherwise reported as within noise. Cost is judged by CPU "
        "seconds, which the machine's load barely moves.",
        "",
    ]


def _perplexity_section(records: list[dict]) -> list[str]:
    lengths = sorted({r["length"] for r in records if r["task"] == "ppl"})
    rows = []
    for arm in arms_in(records):
        cells = []
        for n in lengths:
            p = perplexity_of(records, arm, n)
            cells.append("skipped" if math.isnan(p.value) else f"{p} ({math.log2(p.value):.2f})")
        rows.append([arm, *cells])
    return [
        "## Perplexity vs length (held-out text; 95% interval; bits per byte in brackets)",
        "",
        "![](eval/perplexity.png)",
        "",
        *table(["arm", *map(str, lengths)], rows),
    ]


def _passkey_section(records: list[dict]) -> list[str]:
    cells = sorted({(r["length"], r["depth"]) for r in records if r["task"] == "passkey"})
    rows = []
    for arm in arms_in(records):
        found = [_metric(records, arm, "passkey", n, "accuracy", depth=d) for n, d in cells]
        rows.append([arm, *("skipped" if math.isnan(a) else f"{a:.0%}" for a in found)])
    return [
        "## Passkey retrieval (accuracy by length and depth)",
        "",
        *table(["arm", *(f"{n} @ {d:g}" for n, d in cells)], rows),
        *(f"![](eval/passkey-{arm}.png)" for arm in arms_in(records)),
        "",
    ]


def _cost_section(results: dict[str, Any]) -> list[str]:
    cost = results["cost"]
    rows = [
        [
            arm,
            f"{c['cpu_seconds']:.1f}",
            f"{c['wall_seconds']:.1f}",
            f"{c['train_seconds']:.1f}",
            f"{c['tokens_per_second']:.0f}",
            f"{c['peak_memory_mb']:.0f}",
            f"{c['validation_loss']:.3f}",
        ]
        for arm, c in cost.items()
    ]
    headers = ["arm", "CPU seconds", "wall seconds", "training loop seconds", "tokens/s"]
    lines = [
        f"## Cost of fine-tuning at {results['long_length']} tokens",
        "",
        *table([*headers, "peak memory (MB)", "validation loss"], rows),
        "CPU and wall seconds cover each arm's whole `longswap finetune` process; the training "
        "loop's seconds and tokens/s are the Trainer's own (wall time).",
        "",
    ]
    learned = parse_pattern(results["pattern"]).needs_selector
    warmed = [arm[0] for arm in cost if arm in ARMS[2:4]] if learned else []
    warmed += [arm[0] for arm in cost if arm == ARMS[5]]
    if warmed:
        arms, verb = ("Arms", "include their") if len(warmed) > 1 else ("Arm", "includes its")
        lines[-1:-1] = [
            f"{arms} {' and '.join(warmed)} {verb} selectors' warm-up (`--method selector`, "
            "the first of the arm's commands below): its seconds are added, its memory counts "
            "in the peak.",
        ]
    if wall_times_unreliable(cost):
        lines += [
            "**Wall times are unreliable in this run:** the arms got different shares of the "
            f"CPU (CPU seconds per wall second differ by more than x{UNRELIABLE}), so another "
            "load shared the machine. The cost verdict uses CPU seconds.",
            "",
        ]
    return lines


def _selection_section(records: list[dict], long: int) -> list[str]:
    """What each selecting arm keeps of its own dense attention (the ``selection`` task)."""
    fields = ("captured_mass", "oracle_mass", "kept_nats", "oracle_nats")
    rows = [
        [arm, *(f"{_metric(records, arm, 'selection', long, f):.3f}" for f in fields)]
        for arm in arms_in(records)
        if _matching(records, arm, "selection", long, "captured_mass")
    ]
    if not rows:
        return []
    return [
        f"## What the selections keep of dense attention at {long} tokens",
        "",
        *table(["arm", "mass kept", "best of the budget", "-log kept (nats)", "best (nats)"], rows),
        "The share of each arm's own dense attention that falls on the keys its queries see "
        "(own block and selected blocks), averaged over layers, heads and queries of one "
        "held-out text; the best selection of the same budget takes each head's blocks with "
        "the most dense mass. -log kept: the mean over queries of -log(share kept), which a "
        "few queries that lose most of their mass raise where the mean share hides them.",
        "",
    ]


def _speed_section(records: list[dict], long: int) -> list[str]:
    rows = [
        [
            arm,
            f"{_metric(records, arm, 'speed', long, 'prefill_tokens_per_s'):.0f}",
            f"{_metric(records, arm, 'speed', long, 'decode_tokens_per_s'):.1f}",
            f"{_metric(records, arm, 'speed', long, 'cache_mb'):.2f}",
        ]
        for arm in arms_in(records)
    ]
    return [
        f"## Inference speed at {long} tokens",
        "",
        *table(["arm", "prefill tokens/s", "decode tokens/s (median step)", "KV cache (MB)"], rows),
        "![](eval/speed.png) ![](eval/speed-decode_tokens_per_s.png)",
        "",
    ]


def report(results: dict[str, Any], records: list[dict]) -> str:
    """``report.md``: verdict, perplexity table and plot, passkey, cost, speed, commands."""
    lines = [
        *_intro(results),
        *_verdict_section(results),
        *_perplexity_section(records),
        *_passkey_section(records),
        *_cost_section(results),
        *_selection_section(records, results["long_length"]),
        *_speed_section(records, results["long_length"]),
        "All records: `eval/results.json`; the full evaluation report: `eval/report.md`.",
        "",
        "## Commands of the trained arms",
        "",
        "```",
        *(c["command"] for c in results["cost"].values()),
        "```",
        "",
    ]
    return "\n".join(lines)
