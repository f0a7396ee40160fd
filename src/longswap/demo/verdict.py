"""The demo's verdict: its expectations checked against the measured records.

Two perplexities scored on the same tokens (records that keep their per-chunk loss sums) are
compared by their paired ratio (``longswap.evaluate.paired``): an expectation holds when the
ratio's whole interval is on its side of the threshold, fails when it is wholly on the
other side, and is left undecided ("within noise") when the threshold falls inside. Records
without per-chunk sums are compared by their own intervals instead (both must agree), which
decides far less. The cost of
fine-tuning is judged by the CPU seconds of each arm's process, which the machine's load
barely moves; wall times are shown beside them, and flagged when the two disagree.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import torch

from longswap.evaluate import paired
from longswap.patterns import BlockTopK, LearnedTopK, Pattern, SelectionUnion

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
#: "Fine-tuning recovers most of the swap's loss": at least this share of it, judged only
#: when the swap lost more than ``SWAP_LOSS`` of arm 1's perplexity.
RECOVERS, SWAP_LOSS = 2 / 3, 0.01
#: ... and, where the records allow a paired interval, its lower end at least this share.
RECOVERS_LOW = 1 / 2
#: A paired retrieval difference is significant below this two-sided p-value.
SIGNIFICANT = 0.05
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


def ppl_record(records: list[dict], arm: str, length: int) -> dict | None:
    """The perplexity record of one arm at one length, or None."""
    found = matching(records, arm, "ppl", length, "perplexity")
    return found[0] if found else None


def compared(
    records: list[dict], x: tuple[str, int], y: tuple[str, int], factor: float, most: bool
) -> tuple[bool | None, str]:
    """Whether perplexity ``x <= factor * y`` (``most``) or ``x >= factor * y`` (``x``,
    ``y``: (arm, length)), and the evidence in words: the paired ratio and its interval when
    both records hold the same chunks, else the two intervals."""
    rx, ry = ppl_record(records, *x), ppl_record(records, *y)
    try:
        if rx is None or ry is None:
            raise ValueError("not measured")
        d = paired.ratio(rx, ry)
    except ValueError:
        ex, ey = perplexity_of(records, *x), perplexity_of(records, *y)
        return (at_most if most else at_least)(ex, ey, factor), ""
    low, high = 1 + d.low, 1 + d.high
    if most:
        holds = True if high <= factor else False if low > factor else None
    else:
        holds = True if low >= factor else False if high < factor else None
    return holds, f" (paired: x{1 + d.value:.3f} [{low:.3f}, {high:.3f}])"


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


def matching(
    records: list[dict], arm: str, task: str, length: int, field: str, depth: float | None = None
) -> list[dict]:
    """The records of one arm, task and length (and depth) that hold ``field``."""
    return [
        r
        for r in records
        if Path(r["model"]).name == arm and r["task"] == task and r["length"] == length
        if field in r and depth in (None, r.get("depth"))
    ]


def metric(
    records: list[dict], arm: str, task: str, length: int, field: str, depth: float | None = None
) -> float:
    """Mean of ``field`` over the records of one arm, task, length (and depth); NaN if none."""
    values = [r[field] for r in matching(records, arm, task, length, field, depth)]
    return sum(values) / len(values) if values else math.nan


def perplexity_of(records: list[dict], arm: str, length: int) -> Estimate:
    """The perplexity of one arm at one length with its interval; NaN if not measured."""
    found = matching(records, arm, "ppl", length, "perplexity")
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


#: Arm 6's selector scores a block from pieces of this many keys (``sub_block``): the best
#: learned union on SmolLM2 (benchmarks/results/real_model-fp32.md).
LEARNED_PIECE = 4


def learned_counterpart(pattern: Pattern) -> Pattern | None:
    """Arm 6's pattern: ``pattern`` with its mean-key selection (``block_topk``, alone or in
    a union) replaced by a learned selector of the same block size, ``top_k`` and
    granularity (per head), scoring pieces of ``LEARNED_PIECE`` keys where the block holds
    several; None when it has no such selection (a static pattern, or one whose selection
    is learned)."""
    if isinstance(pattern, SelectionUnion):
        learned = learned_counterpart(pattern.selection)
        return None if learned is None else pattern.static | learned
    if isinstance(pattern, BlockTopK) and not pattern.needs_selector:  # MoBA selects per head
        size = pattern.block_size
        piece = LEARNED_PIECE if size % LEARNED_PIECE == 0 and size > LEARNED_PIECE else None
        return LearnedTopK(block_size=size, top_k=pattern.top_k, per_head=True, sub_block=piece)
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
    measured_here = arms_in(records)
    found = {
        arm: metric(records, arm, "passkey", long, "accuracy")
        for arm in (ARMS[2], ARMS[5])
        if arm in measured_here
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
        dense = metric(records, ARMS[4], "passkey", long, "accuracy")
        failing = [arm for arm, v in measured_arms.items() if v < RETRIEVES]
        at_trained = {arm: metric(records, arm, "passkey", trained, "accuracy") for arm in failing}
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
    kept = [metric(records, arm, "selection", long, "captured_mass") for arm in (ARMS[2], ARMS[5])]
    best = [metric(records, arm, "selection", long, "oracle_mass") for arm in (ARMS[2], ARMS[5])]
    better = None if math.isnan(kept[0] + kept[1]) else kept[1] > kept[0]
    headroom = kept[0] / best[0] if best[0] > 0 else math.nan
    no_worse, paired_text = compared(records, (ARMS[5], long), (ARMS[2], long), NO_WORSE, True)
    c3, c6 = cost[ARMS[2]]["cpu_seconds"], cost[ARMS[5]]["cpu_seconds"]
    return (
        "A selector distilled from dense attention (arm 6) keeps more of it than MoBA's mean "
        "keys (arm 3), at no loss of quality",
        f"share of dense attention on the keys seen at {long}: arm 6 {kept[1]:.3f}, arm 3 "
        f"{kept[0]:.3f} (the best selection of the budget: {best[1]:.3f}, {best[0]:.3f}; mean "
        f"keys keep {headroom:.1%} of what the best keeps, the rest is what "
        "distillation can add); "
        f"perplexity at {long}: arm 6 {a6}, arm 3 {a3}{paired_text} (no worse: up to "
        f"x{NO_WORSE}){_why(no_worse)}; CPU time {c6:.1f} s vs {c3:.1f} s",
        _all(better, no_worse),
    )


def _recovered_row(records: list[dict], tuned: int) -> tuple[str, str, bool | None]:
    """How much of the swap's loss fine-tuning gives back at the fine-tuning length: the
    swap's loss is arm 2 against arm 1 (untrained), what is left of it arm 3 against arm 5
    (both fine-tuned on the same data, so what the data itself teaches cancels out)."""
    a1, a2, a3, a5 = (perplexity_of(records, ARMS[i], tuned) for i in (0, 1, 2, 4))
    lost, left = a2.value - a1.value, a3.value - a5.value
    claim = f"Fine-tuning recovers most of the swap's loss at {tuned} (at least {RECOVERS:.0%})"
    if not lost > SWAP_LOSS * a1.value:
        return (
            claim,
            f"perplexity at {tuned}: arm 2 {a2}, arm 1 {a1}: the swap lost less than "
            f"{SWAP_LOSS:.0%}, nothing to recover",
            None,
        )
    share = 1 - left / lost
    found = [ppl_record(records, ARMS[i], tuned) for i in (1, 0, 2, 4)]
    try:
        if None in found:
            raise ValueError("not measured")
        d = paired.recovered(*found)
    except ValueError:  # records without per-chunk sums: the point estimate alone
        evidence, holds = "(point estimates)", share >= RECOVERS
    else:
        evidence = f"(paired, in log-loss: {d.value:.0%} [{d.low:.0%}, {d.high:.0%}])"
        holds = d.value >= RECOVERS and d.low >= RECOVERS_LOW
        holds = True if holds else False if d.high < RECOVERS else None
    return (
        claim,
        f"perplexity at {tuned}: the swap costs {lost:+.3f} (arm 2 {a2} vs arm 1 {a1}); after "
        f"fine-tuning, {left:+.3f} is left (arm 3 {a3} vs arm 5 {a5}): {share:.0%} recovered "
        f"{evidence}",
        holds,
    )


def _beyond_row(
    records: list[dict], tuned: int, lengths: list[int]
) -> tuple[str, str, bool | None]:
    """Arm 3 beyond its fine-tuning length: no worse than arm 5, better than arm 1."""
    parts, outcomes = [], []
    for n in (n for n in lengths if n > tuned):
        a1, a3, a5 = (perplexity_of(records, ARMS[i], n) for i in (0, 2, 4))
        vs5, text5 = compared(records, (ARMS[2], n), (ARMS[4], n), NO_WORSE, True)
        vs1, text1 = compared(records, (ARMS[2], n), (ARMS[0], n), 1.0, True)
        outcomes += [vs5, vs1]
        parts.append(
            f"at {n}: arm 3 {a3}, arm 5 {a5}{text5} (no worse: up to x{NO_WORSE}){_why(vs5)}, "
            f"arm 1 {a1}{text1}{_why(vs1)}"
        )
    return (
        f"Beyond {tuned}, arm 3 is no worse than arm 5 and better than arm 1",
        "; ".join(parts),
        _all(*outcomes),
    )


def passkey_hits(records: list[dict], arm: str, length: int) -> list[tuple[int, bool]]:
    """``(key, found)`` of every passkey prompt of one arm at one length, by depth."""
    found = sorted(matching(records, arm, "passkey", length, "answers"), key=lambda r: r["depth"])
    return [(a["key"], a["answered"] == a["key"]) for r in found for a in r["answers"]]


def _passkey_vs_dense_row(records: list[dict], length: int) -> tuple[str, str, bool | None]:
    """Arm 3's passkey accuracy at ``length`` against arm 1's (the untrained dense base), on
    the same prompts: it fails when arm 1 finds significantly more keys (McNemar's exact
    test, two-sided p < ``SIGNIFICANT``), is undecided when arm 3 finds fewer without
    significance, and holds otherwise."""
    a1, a3 = (metric(records, arm, "passkey", length, "accuracy") for arm in (ARMS[0], ARMS[2]))
    claim = f"Arm 3 retrieves the passkey at {length} at least as well as arm 1"
    measured = f"passkey accuracy at {length}: arm 3 {a3:.0%}, arm 1 {a1:.0%}"
    h1, h3 = passkey_hits(records, ARMS[0], length), passkey_hits(records, ARMS[2], length)
    if math.isnan(a1 + a3) or not h1 or [k for k, _ in h1] != [k for k, _ in h3]:
        return claim, measured, None if math.isnan(a1 + a3) else a3 >= a1
    test = paired.exact_test([hit for _, hit in h3], [hit for _, hit in h1])
    worse = test["b_only"] > test["a_only"]
    holds = (not worse) or (None if test["p_value"] >= SIGNIFICANT else False)
    return (
        claim,
        f"{measured} on the same {len(h1)} prompts (arm 3 alone {test['a_only']}, arm 1 alone "
        f"{test['b_only']}; exact test p = {test['p_value']:.3g})",
        holds,
    )


def verdict(records: list[dict], cost: dict, pattern: Pattern, plan: Any) -> list[dict[str, Any]]:
    """The expectations of the study, each with its measured numbers and outcome.

    ``plan`` (a :class:`~longswap.demo.config.Plan`) gives the base's trained length, the
    fine-tuning length (``tuned``) and the evaluation lengths. Perplexities are given as
    ``value [interval]`` and judged with the intervals (see the module's docstring); the
    cost, by CPU seconds.
    """
    trained, tuned, far = plan.trained, plan.tuned, max(plan.lengths)
    a1_short, a1_far = (
        perplexity_of(records, ARMS[0], trained),
        perplexity_of(records, ARMS[0], far),
    )
    a3, a4, a5 = (perplexity_of(records, arm, tuned) for arm in ARMS[2:5])
    a3_far = perplexity_of(records, ARMS[2], far)
    c3, c5 = cost[ARMS[2]]["cpu_seconds"], cost[ARMS[4]]["cpu_seconds"]
    w3, w5 = cost[ARMS[2]]["wall_seconds"], cost[ARMS[4]]["wall_seconds"]
    wide, wide_text = compared(records, (ARMS[3], tuned), (ARMS[2], tuned), WIDE, False)
    no_worse, no_worse_text = compared(records, (ARMS[2], far), (ARMS[0], trained), NO_WORSE, True)
    close, close_text = compared(records, (ARMS[2], tuned), (ARMS[4], tuned), CLOSE, True)
    degrades, degrades_text = compared(records, (ARMS[0], far), (ARMS[0], trained), DEGRADES, False)
    unreliable = (
        " (wall times unreliable: the machine was loaded)" if wall_times_unreliable(cost) else ""
    )
    at_trained = trained in plan.lengths  # arm 1 measured at its trained length
    rows = [
        (
            "Arm 3 beats arm 4 (random init, same budget) by a wide margin",
            f"perplexity at {tuned}: arm 3 {a3}, arm 4 {a4} (x{a4.value / a3.value:.2f}"
            f"{wide_text}; wide: >= x{WIDE}){_why(wide)}",
            wide,
        ),
        *(
            [
                (
                    f"Arm 3 at {far} is no worse than arm 1 at its trained length {trained}",
                    f"perplexity: arm 3 {a3_far} at {far}, arm 1 {a1_short} at {trained}"
                    f"{no_worse_text} (allowed up to x{NO_WORSE}){_why(no_worse)}",
                    no_worse,
                )
            ]
            if at_trained
            else []
        ),
        (
            "Arm 3 is close to arm 5 (dense fine-tune) at a fraction of its cost",
            f"perplexity at {tuned}: arm 3 {a3}, arm 5 {a5}{close_text} (close: within "
            f"x{CLOSE}){_why(close)}; CPU time {c3:.1f} s vs {c5:.1f} s ({c3 / c5:.3f} of it; a "
            f"fraction: <= {FRACTION}); wall time {w3:.1f} s vs {w5:.1f} s{unreliable}",
            _all(close, c3 <= FRACTION * c5),
        ),
        _recovered_row(records, tuned),
        *([_beyond_row(records, tuned, plan.lengths)] if far > tuned else []),
        *([_learned_row(records, cost, tuned)] if ARMS[5] in cost else []),
        *(
            [
                (
                    f"Arm 1 degrades at {far} compared with {trained}",
                    f"perplexity: {a1_short} at {trained}, {a1_far} at {far}{degrades_text} "
                    f"(degrades: > x{DEGRADES}){_why(degrades)}",
                    degrades,
                )
            ]
            if far > trained and at_trained
            else []
        ),
        _passkey_row(records, pattern, trained, max(plan.passkey_lengths)),
        _passkey_vs_dense_row(records, max(plan.passkey_lengths)),
    ]
    return [{"claim": c, "measured": m, "holds": h} for c, m, h in rows]
