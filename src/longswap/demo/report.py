"""The demo's ``report.md``: the verdict table, then perplexity, passkey, cost, selection
and speed, each a section built from the records (``verdict`` judges, this module shows)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from longswap.demo.verdict import (
    UNRELIABLE,
    arms_in,
    learned_counterpart,
    matching,
    metric,
    perplexity_of,
    wall_times_unreliable,
)
from longswap.evaluate.report import table
from longswap.patterns import parse_pattern


def outcome(holds: bool | None, emphasis: str = "**") -> str:
    """An expectation's outcome in words; a failure stands out (``emphasis`` around it)."""
    if holds is None:
        return "not decided (the measured column says why)"
    return "holds" if holds else f"{emphasis}does not hold{emphasis}"


def _attempts(results: dict[str, Any]) -> str:
    """`` over N attempts`` for a demo that was interrupted and continued, else nothing."""
    attempts = results.get("attempts", 1)
    return f" over {attempts} attempts (interrupted and continued)" if attempts > 1 else ""


def _intro(results: dict[str, Any]) -> list[str]:
    trained, long = results["trained_length"], results["long_length"]
    env, last = results["environment"], 6 if results.get("learned_pattern") else 5
    config = results["config"]
    base = f"`{Path(config['model']).name}`" if config.get("model") else "a dense byte-level Llama"
    longest = results.get("plan", {}).get("longest", long)
    extended = f" (positions extended to {longest} for every arm)" if longest > long else ""
    rate = config.get("learning_rate")
    lines = [
        "# longswap demo",
        "",
        f"Base: {base}, trained at {trained} tokens. Pattern of arms 2-4: "
        f"`{results['pattern']}`. Arms 3-{last}: {results['steps']} full fine-tuning steps "
        f"of {long} tokens each{extended}, peak learning rate {rate}, same data and seed. "
        f"Held-out text: {results.get('heldout', 'the standard library test suites')}. Wall "
        f"time {results['wall_seconds']:.0f} s{_attempts(results)} on {env['device']} "
        f"({env['threads']} threads).",
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


def _perplexity_section(records: list[dict], unit: str) -> list[str]:
    lengths = sorted({r["length"] for r in records if r["task"] == "ppl"})
    rows = []
    for arm in arms_in(records):
        cells = []
        for n in lengths:
            p = perplexity_of(records, arm, n)
            cells.append("skipped" if math.isnan(p.value) else f"{p} ({math.log2(p.value):.2f})")
        rows.append([arm, *cells])
    return [
        f"## Perplexity vs length (held-out text; 95% interval; bits per {unit} in brackets)",
        "",
        "![](eval/perplexity.png) ![](eval/perplexity-pretrained.png)",
        "",
        *table(["arm", *map(str, lengths)], rows),
    ]


def _passkey_section(records: list[dict]) -> list[str]:
    cells = sorted({(r["length"], r["depth"]) for r in records if r["task"] == "passkey"})
    rows = []
    for arm in arms_in(records):
        found = [metric(records, arm, "passkey", n, "accuracy", depth=d) for n, d in cells]
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
    warmed = [arm[0] for arm, c in cost.items() if "--method selector" in c["command"]]
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
        [arm, *(f"{metric(records, arm, 'selection', long, f):.3f}" for f in fields)]
        for arm in arms_in(records)
        if matching(records, arm, "selection", long, "captured_mass")
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
            f"{metric(records, arm, 'speed', long, 'prefill_tokens_per_s'):.0f}",
            f"{metric(records, arm, 'speed', long, 'decode_tokens_per_s'):.1f}",
            f"{metric(records, arm, 'speed', long, 'cache_mb'):.2f}",
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
        *_perplexity_section(records, "token" if results["config"].get("model") else "byte"),
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
