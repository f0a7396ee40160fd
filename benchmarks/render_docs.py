"""Render the results tables of README.md and docs/ from the committed results files.

    python benchmarks/render_docs.py            # rewrite every table in place
    python benchmarks/render_docs.py --check    # exit 1 when a table differs from its source

A table lives between two marker comments, ``<!-- render:NAME -->`` and
``<!-- /render:NAME -->``; everything between them is replaced by what ``TABLES[NAME]``
renders from ``benchmarks/results/*.json`` or ``docs/demo/``, followed by one line naming
the machine, date, versions and command of the measurement (from the file's
``environment`` and ``command``). A source file that does not exist yet renders as one
line saying how to produce it. Nothing here imports torch: the script runs in a second.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path("benchmarks/results")
#: The committed demo runs: the embedded model's and SmolLM2's (table-name prefix: folder).
DEMOS = {
    "demo": Path("docs/demo"),
    "smollm2-demo": Path("docs/demo-smollm2"),
    "demo-moba-128x4": Path("docs/history/demo-moba-128x4"),
}
#: ``longswap demo``'s defaults (tests/test_docs.py holds them equal to ``DemoConfig``'s):
#: a committed run's command names the fields that differ from them.
DEMO_DEFAULTS: dict[str, Any] = {
    "model": "",
    "pattern": "sliding_window(window=512, sinks=4) | block_topk(block_size=64, top_k=16)",
    "quick": False,
    "steps": 0,
    "factor": 8,
    "seq_len": 0,
    "lengths": [],
    "passkey_lengths": [],
    "depths": [],
    "trials": 0,
    "targets": 0,
    "learning_rate": 5e-4,
    "synthetic_ratio": 0.25,
    "learned": False,
    "seed": 0,
}
#: The real-model arms that the study tables show (the others are superseded: history).
STUDY_ARMS = (
    "dense",
    "window-1024",
    "window-2048",
    "moba-128x4",
    "moba-128x8",
    "shifted-2048",
    "window-512+moba-64x16",
    "window-512+oracle-64x16",
    "window-512+oracle-head-64x16",
)
FLOAT32_ARMS = (
    "dense",
    "window-512+learned-head-64x16-8k",
    "window-512+pieces-16-64x16-untrained",
    "window-512+learned-pieces-16-64x16-8k",
    "window-512+pieces-4-64x16-untrained",
    "window-512+learned-pieces-4-64x16-8k",
)
HISTORY_ARMS = (
    "learned-64x16",
    "window-512+learned-64x16-untrained",
    "window-512+learned-64x16",
    "window-512+learned-64x16-8k",
    "window-512+learned-64x16-8k-max",
    "window-512+learned-64x16-8k-max-beyond",
)
STUDY_COMMANDS = {
    "real_model.json": "python benchmarks/real_model.py",
    "real_model-fp32.json": (
        "python benchmarks/real_model.py --dtype float32 "
        "--out benchmarks/results/real_model-fp32.json"
    ),
}
#: README: one line per current arm (file, arm, what the row is in words).
SUMMARY_ARMS = (
    ("real_model.json", "dense", "dense"),
    ("real_model.json", "window-1024", "window"),
    ("real_model.json", "window-2048", "window"),
    ("real_model.json", "moba-128x8", "MoBA's mean keys"),
    ("real_model.json", "window-512+moba-64x16", "window + mean keys"),
    ("real_model-fp32.json", "window-512+pieces-4-64x16-untrained", "window + pieces gate"),
    (
        "real_model-fp32.json",
        "window-512+learned-pieces-4-64x16-8k",
        "window + pieces gate, warmed up at 8k",
    ),
    ("real_model.json", "window-512+oracle-64x16", "ceiling: dense attention's own choice"),
)


# ---------------------------------------------------------------- reading the sources


def load(root: Path, path: Path) -> dict[str, Any] | None:
    """The JSON file ``root / path``, or None when it does not exist."""
    file = root / path
    return json.loads(file.read_text()) if file.is_file() else None


def constant(file: Path, name: str) -> Any:
    """The literal value of the module-level ``name`` in ``file``, read without importing
    it (no torch)."""
    for node in ast.parse(file.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return ast.literal_eval(node.value)
    raise ValueError(f"{file} defines no {name}")


def arm_patterns(root: Path) -> dict[str, str]:
    """``ARMS`` of ``benchmarks/real_model.py``."""
    return constant(root / "benchmarks/real_model.py", "ARMS")


def stamp(env: dict[str, Any], command: str, extra: str = "") -> str:
    """The line under a table: machine, date, versions, command."""
    device = env.get("device", "unknown machine")
    gpu = any(word in device for word in ("NVIDIA", "AMD Instinct", "Radeon"))
    machine = f"{device}, {env.get('threads', '?')} CPU threads, " + ("GPU" if gpu else "no GPU")
    if gpu:
        machine = f"{device} GPU ({env.get('threads', '?')} CPU threads)"
    date = str(env.get("time", "undated"))[:10]
    versions = f"torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}"
    versions += f", Python {env.get('python', '?')}"
    if " (" in command:  # a note after the command line, e.g. how a run was stopped
        command, note = command.split(" (", 1)
        extra = (extra + "; " if extra else "") + note.rstrip(")").replace("`", "")
    extra = f"; {extra}" if extra else ""
    return f"_Measured on {machine}, {date}; {versions}{extra}. Command: `{command}`._"


def cell(text: str) -> str:
    """Text that may hold ``|``, made safe for a Markdown table cell."""
    return text.replace("|", "\\|")


def table(header: list[str], align: str, rows: list[list[str]]) -> str:
    """A Markdown table; ``align`` holds ``l`` or ``r`` per column."""
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def missing(path: Path, command: str) -> str:
    """What a table says before its source file exists."""
    return f"_Not measured yet: `{command}` writes `{path}`._"


# ---------------------------------------------------------------- the demo


def demo_command(demo: dict[str, Any]) -> str:
    """The ``longswap demo`` command line that a committed report came from (the fields
    that differ from the defaults; SmolLM2's file as ``"$SMOL"``, as the README sets it)."""
    words = ["longswap demo"]
    for name, default in DEMO_DEFAULTS.items():
        value = demo["config"].get(name, default)
        if value == default:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag)
        elif name == "model":
            words.append(f'{flag} "$SMOL"' if value.endswith(".gguf") else f"{flag} {value}")
        elif isinstance(value, list):
            words.append(f"{flag} {','.join(map(str, value))}")
        else:
            words.append(f'{flag} "{value}"' if " " in str(value) else f"{flag} {value}")
    return " ".join(words)


def demo_stamp(root: Path, folder: Path) -> tuple[dict[str, Any], str]:
    """The demo record in ``folder`` and the line under each of its tables."""
    demo = load(root, folder / "demo.json")
    assert demo is not None, f"{folder}/demo.json is committed"
    wall = f"the whole run {demo['wall_seconds'] / 60:.0f} min of wall time"
    if demo.get("attempts", 1) > 1:  # an interrupted run, continued
        wall += f" over {demo['attempts']} attempts"
    return demo, stamp(demo["environment"], demo_command(demo), wall)


def render_demo_verdict(root: Path, folder: Path) -> str:
    """The demo's verdict rows."""
    demo, line = demo_stamp(root, folder)
    words = {True: "holds", False: "**does not hold**", None: "not decided"}
    rows = [[cell(v["claim"]), cell(v["measured"]), words[v["holds"]]] for v in demo["verdict"]]
    return table(["expectation", "measured", "outcome"], "lll", rows) + "\n\n" + line


def demo_records(root: Path, folder: Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The demo's evaluation records by (arm, task)."""
    records = load(root, folder / "eval/results.json")
    assert records is not None, f"{folder}/eval/results.json is committed"
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records["records"]:
        found.setdefault((Path(record["model"]).name, record["task"]), []).append(record)
    return found


def demo_mean(
    found: dict[tuple[str, str], list[dict[str, Any]]], arm: str, task: str, length: int, field: str
) -> float:
    """The mean of ``field`` over one arm's records of ``task`` at ``length`` (the passkey
    depths, say); NaN when there are none."""
    values = [r[field] for r in found.get((arm, task), []) if r["length"] == length]
    return sum(values) / len(values) if values else float("nan")


def render_demo_perplexity(root: Path, folder: Path) -> str:
    """Perplexity against length per demo arm, 95% interval."""
    _, line = demo_stamp(root, folder)
    found = demo_records(root, folder)
    arms = sorted({arm for arm, task in found if task == "ppl"})
    lengths = sorted({r["length"] for (_, task), rs in found.items() if task == "ppl" for r in rs})
    rows = []
    for arm in arms:
        by_length = {r["length"]: r for r in found[(arm, "ppl")]}
        rows.append([arm] + [ppl(by_length.get(n), 2) for n in lengths])
    return table(["arm", *map(str, lengths)], "l" + "r" * len(lengths), rows) + "\n\n" + line


def render_demo_passkey(root: Path, folder: Path) -> str:
    """Passkey accuracy per demo arm, length and depth."""
    _, line = demo_stamp(root, folder)
    found = demo_records(root, folder)
    arms = sorted({arm for arm, task in found if task == "passkey"})
    cells = sorted(
        {(r["length"], r["depth"]) for (_, t), rs in found.items() if t == "passkey" for r in rs}
    )
    rows = []
    for arm in arms:
        by_cell = {(r["length"], r["depth"]): r["accuracy"] for r in found[(arm, "passkey")]}
        rows.append([arm] + [f"{by_cell[c]:.0%}" if c in by_cell else "" for c in cells])
    header = ["arm"] + [f"{n} @ {d:g}" for n, d in cells]
    return table(header, "l" + "r" * len(cells), rows) + "\n\n" + line


def render_demo_cost(root: Path, folder: Path) -> str:
    """The cost of the demo's fine-tuning arms."""
    demo, line = demo_stamp(root, folder)
    rows = [
        [
            arm,
            f"{c['cpu_seconds']:.1f}",
            f"{c['wall_seconds']:.1f}",
            f"{c['tokens_per_second']:.0f}",
            f"{c['peak_memory_mb']:.0f}",
            f"{c['validation_loss']:.3f}",
        ]
        for arm, c in demo["cost"].items()
    ]
    header = ["arm", "CPU s", "wall s", "tokens/s", "peak memory (MB)", "validation loss"]
    return table(header, "lrrrrr", rows) + "\n\n" + line


def render_demo_speed(root: Path, folder: Path) -> str:
    """Prefill and decode speed of the demo's arms at the longest length measured."""
    _, line = demo_stamp(root, folder)
    found = demo_records(root, folder)
    rows = []
    longest = 0
    for arm in sorted({arm for arm, task in found if task == "speed"}):
        record = max(found[(arm, "speed")], key=lambda r: r["length"])
        longest = record["length"]
        rows.append(
            [
                arm,
                f"{record['prefill_tokens_per_s']:.0f}",
                f"{record['decode_tokens_per_s']:.1f}",
                f"{record['cache_mb']:.2f}",
            ]
        )
    header = [f"arm (at {longest} tokens)", "prefill tokens/s", "decode tokens/s", "KV cache MB"]
    return table(header, "lrrr", rows) + "\n\n" + line


# ---------------------------------------------------------------- the real-model study


def ppl(record: dict[str, Any] | None, digits: int = 3) -> str:
    """A perplexity with its interval, or an empty cell."""
    if record is None:
        return ""
    if "skipped" in record:
        return "skipped"
    low, high = record["perplexity_ci"]
    return f"{record['perplexity']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def study(root: Path, name: str) -> dict[str, Any] | None:
    """A real-model study file, its records indexed as ``(arm, task, length)``."""
    data = load(root, RESULTS / name)
    if data is not None:
        data["index"] = {(r["arm"], r["task"], r["length"]): r for r in data["records"]}
    return data


def study_stamp(data: dict[str, Any], name: str) -> str:
    """The line under a study table: the study accumulates runs, so name them all."""
    runs = len(data.get("commands", [])) or 1
    what = f"{data['config']['dtype']}; {runs} runs that resume one another, their arguments "
    what += f"under `commands` in `{RESULTS / name}`; date of the last"
    return stamp(data["environment"], STUDY_COMMANDS[name], what)


def passkey(record: dict[str, Any] | None) -> str:
    """Keys found of those asked, or an empty cell."""
    if record is None or "skipped" in record:
        return "" if record is None else "skipped"
    return f"{record['correct']}/{record['trials']}"


def selection(record: dict[str, Any] | None) -> str:
    """Dense attention mass kept, with the best selection of the same budget."""
    if record is None:
        return ""
    return f"{record['captured_mass']:.3f} ({record['oracle_mass']:.3f})"


def versus(record: dict[str, Any] | None, dense: dict[str, Any] | None) -> str:
    """An arm's perplexity over dense's, as a signed percentage."""
    if record is None or dense is None or "skipped" in record:
        return ""
    return f"{record['perplexity'] / dense['perplexity'] - 1:+.1%}"


def render_real_model_summary(root: Path) -> str:
    """README: the current arms at the trained length, from both study files."""
    patterns = arm_patterns(root)
    files = {name: study(root, name) for name in ("real_model.json", "real_model-fp32.json")}
    rows = []
    for name, arm, label in SUMMARY_ARMS:
        data = files[name]
        if data is None:
            continue
        at = data["index"]
        record = at.get((arm, "ppl", 8192))
        rows.append(
            [
                label,
                f"`{cell(patterns[arm])}`",
                data["config"]["dtype"],
                ppl(record),
                versus(record, at.get(("dense", "ppl", 8192))),
                passkey(at.get((arm, "passkey", 8192))),
                selection(at.get((arm, "selection", 8192))),
            ]
        )
    header = ["swap", "pattern", "dtype", "perplexity at 8192", "vs dense", "passkey 8192"]
    header.append("mass kept (best)")
    lines = [table(header, "lllrrrr", rows)]
    lines += [study_stamp(data, name) for name, data in files.items() if data is not None]
    return "\n\n".join(lines)


def render_real_model_perplexity(root: Path) -> str:
    """Perplexity against length for the current parameter-free arms (bfloat16 study)."""
    data = study(root, "real_model.json")
    if data is None:
        return missing(RESULTS / "real_model.json", "python benchmarks/real_model.py")
    patterns = arm_patterns(root)
    at = data["index"]
    lengths = (2048, 8192, 16384, 32768)
    rows = []
    for arm in STUDY_ARMS:
        cells = [ppl(at.get((arm, "ppl", n))) for n in lengths]
        gain = data["gain_kept_2k_to_8k"].get(arm)
        rows.append(
            [arm, f"`{cell(patterns[arm])}`", *cells, "" if gain is None else f"{gain:.0%}"]
        )
    header = ["arm", "pattern", *(f"ppl {n}" for n in lengths), "2k->8k gain kept"]
    return table(header, "llrrrrr", rows) + "\n\n" + study_stamp(data, "real_model.json")


def render_real_model_other(root: Path) -> str:
    """Passkey and selection of the current parameter-free arms (bfloat16 study)."""
    data = study(root, "real_model.json")
    if data is None:
        return missing(RESULTS / "real_model.json", "python benchmarks/real_model.py")
    at = data["index"]
    rows = []
    for arm in STUDY_ARMS:
        if "oracle" in arm:  # a ceiling for perplexity only: it computes dense attention
            continue
        keys = [passkey(at.get((arm, "passkey", n))) for n in (4096, 8192, 16384)]
        rows.append([arm, *keys, selection(at.get((arm, "selection", 8192)))])
    header = ["arm", "passkey 4096", "passkey 8192", "passkey 16384", "mass kept 8192 (best)"]
    return table(header, "lrrrr", rows) + "\n\n" + study_stamp(data, "real_model.json")


def render_real_model_float32(root: Path) -> str:
    """The learned and piece-scored unions against dense, float32 study."""
    data = study(root, "real_model-fp32.json")
    if data is None:
        return missing(RESULTS / "real_model-fp32.json", "python benchmarks/real_model.py")
    patterns = arm_patterns(root)
    at = data["index"]
    dense = at.get(("dense", "ppl", 8192))
    rows = []
    for arm in FLOAT32_ARMS:
        record = at.get((arm, "ppl", 8192))
        chosen = at.get((arm, "selection", 8192))
        nats = "" if chosen is None else f"{chosen['kept_nats']:.3f} ({chosen['oracle_nats']:.3f})"
        rows.append(
            [
                arm,
                f"`{cell(patterns[arm])}`",
                ppl(record),
                versus(record, dense),
                selection(chosen),
                nats,
                passkey(at.get((arm, "passkey", 8192))),
            ]
        )
    header = ["arm", "pattern", "ppl 8192", "vs dense", "mass kept (best)", "-log mass, nats"]
    header += ["passkey 8192"]
    return table(header, "llrrrrr", rows) + "\n\n" + study_stamp(data, "real_model-fp32.json")


def render_real_model_history(root: Path) -> str:
    """Superseded learned arms of the bfloat16 study (gates that today's code cannot load)."""
    data = study(root, "real_model.json")
    if data is None:
        return missing(RESULTS / "real_model.json", "python benchmarks/real_model.py")
    at = data["index"]
    dense = at.get(("dense", "ppl", 8192))
    rows = []
    for arm in HISTORY_ARMS:
        record = at.get((arm, "ppl", 8192))
        rows.append(
            [
                arm,
                ppl(at.get((arm, "ppl", 2048))),
                ppl(record),
                versus(record, dense),
                passkey(at.get((arm, "passkey", 8192))),
                selection(at.get((arm, "selection", 8192))),
            ]
        )
    header = ["arm", "ppl 2048", "ppl 8192", "vs dense", "passkey 8192", "mass kept (best)"]
    return table(header, "lrrrrr", rows) + "\n\n" + study_stamp(data, "real_model.json")


#: The (pass, length) cells of the real-model speed benchmark that the summaries quote.
CELLS = (("forward", 8192), ("forward", 16384), ("train lora-plus", 8192))
#: The real-model speed benchmark's results and command.
SPEED, SPEED_COMMAND = RESULTS / "real_model_speed.json", "python benchmarks/real_model_speed.py"
#: A speed cell's key: (arm, dtype, length, pass).
SpeedKey = tuple[str, str, int, str]


def speed_seconds(root: Path) -> tuple[dict[str, Any], dict[SpeedKey, float]] | None:
    """``real_model_speed.json`` and its median seconds by (arm, dtype, length, pass), or
    None when it is missing or from before the benchmark measured each dtype."""
    data = load(root, SPEED)
    if data is None or any("dtype" not in r for r in data["rows"]):
        return None
    return data, {
        (r["arm"], r["dtype"], r["length"], r["pass"]): r["median_seconds"] for r in data["rows"]
    }


def fastest_dense(seconds: dict[SpeedKey, float], length: int, kind: str) -> float | None:
    """The fastest dense seconds of any dtype at this length and pass, or None."""
    found = [t for (a, _, n, k), t in seconds.items() if (a, n, k) == ("dense", length, kind)]
    return min(found) if found else None


def render_real_model_speed(root: Path) -> str:
    """Forward and training-step seconds of SmolLM2 per pattern and dtype, when measured."""
    if (found := speed_seconds(root)) is None:
        return missing(SPEED, SPEED_COMMAND)
    data, seconds = found
    rows = []
    for r in data["rows"]:
        same = seconds.get(("dense", r["dtype"], r["length"], r["pass"]))
        best = fastest_dense(seconds, r["length"], r["pass"])
        rows.append(
            [
                r["arm"],
                r["dtype"],
                str(r["length"]),
                r["pass"],
                f"{r['min_seconds']:.1f} / {r['median_seconds']:.1f} / {r['max_seconds']:.1f}",
                *("" if d is None else f"{d / r['median_seconds']:.2f}x" for d in (same, best)),
                f"{r['peak_memory_mb']:.0f}",
            ]
        )
    header = ["arm", "dtype", "length", "pass", "seconds (min / median / max)"]
    header += ["vs dense, same dtype", "vs fastest dense", "peak memory MB"]
    patterns = "; ".join(f"{a}: `{p}`" for a, p in arm_speed_patterns(data).items())
    return (
        table(header, "llrlrrrr", rows)
        + f"\n\nPatterns: {patterns}.\n\n"
        + stamp(data["environment"], data.get("command", SPEED_COMMAND), "median of the repeats")
    )


def arm_speed_patterns(data: dict[str, Any]) -> dict[str, str]:
    """Each sparse arm's pattern in the speed record."""
    return {r["arm"]: r["pattern"] for r in data["rows"] if r["arm"] != "dense"}


def render_real_model_speed_summary(root: Path) -> str:
    """One row per sparse arm and dtype: speed-up over dense of the same dtype per length
    and pass, and in brackets over the fastest dense of the run."""
    if (found := speed_seconds(root)) is None:
        return missing(SPEED, SPEED_COMMAND)
    data, seconds = found
    columns = sorted({(r["pass"], r["length"]) for r in data["rows"]})
    dtypes = list(dict.fromkeys(r["dtype"] for r in data["rows"]))
    rows = []
    for dtype in dtypes:
        cells = [seconds.get(("dense", dtype, n, k)) for k, n in columns]
        shown = ["" if t is None else f"{t:.0f} s" for t in cells]
        rows.append([f"dense, {dtype} (seconds)", *shown])
    for arm, pattern in arm_speed_patterns(data).items():
        for dtype in dtypes:
            out = []
            for kind, length in columns:
                mine = seconds.get((arm, dtype, length, kind))
                same = seconds.get(("dense", dtype, length, kind))
                best = fastest_dense(seconds, length, kind)
                if mine is None or same is None or best is None:
                    out.append("")
                else:
                    out.append(f"{same / mine:.2f}x ({best / mine:.2f}x)")
            rows.append([f"`{cell(pattern)}`, {dtype}", *out])
    header = ["pattern, dtype", *(f"{k} {n // 1024}k" for k, n in columns)]
    extra = "median of the repeats; speed-up over dense of the same dtype (over the fastest dense)"
    return (
        table(header, "l" + "r" * len(columns), rows)
        + "\n\n"
        + stamp(data["environment"], data.get("command", SPEED_COMMAND), extra)
    )


#: The two quality-keeping unions of the speed benchmark: mean keys, and the learned gate.
UNIONS = ("window-512+moba-64x16", "window-512+learned-pieces-4-64x16")
#: A speed-up of an arm: ``ratio(arm, length, pass, dtype)`` (dense seconds / the arm's).
Ratio = Callable[[str, int, str, str], float]


def unions_speed(root: Path) -> tuple[dict[str, Any], Ratio] | None:
    """The speed benchmark and its :data:`Ratio` against dense of the same dtype, when it
    measured dense and both unions in both dtypes at every one of :data:`CELLS`; else None."""
    if (found := speed_seconds(root)) is None:
        return None
    data, seconds = found
    needed = [
        (a, d, n, k) for a in ("dense", *UNIONS) for d in ("float32", "bfloat16") for k, n in CELLS
    ]
    if any(key not in seconds for key in needed):
        return None

    def ratio(arm: str, length: int, kind: str, dtype: str) -> float:
        return seconds[("dense", dtype, length, kind)] / seconds[(arm, dtype, length, kind)]

    return data, ratio


#: What a paragraph about the unions says before the speed benchmark has measured them.
NO_UNIONS = missing(SPEED, f"{SPEED_COMMAND} (dense and the unions, both dtypes)")


def speed_pairs(ratio: Ratio, arm: str, kind: str) -> str:
    """``1.40x and 1.95x (bfloat16: 1.64x and 2.69x)``: the arm's speed-ups at the lengths
    of :data:`CELLS` for ``kind``, in float32 (bfloat16)."""
    lengths = [n for k, n in CELLS if k == kind]

    def pair(dtype: str) -> str:
        return " and ".join(f"{ratio(arm, n, kind, dtype):.2f}x" for n in lengths)

    return f"{pair('float32')} (bfloat16: {pair('bfloat16')})"


def render_real_model_speed_headline(root: Path) -> str:
    """README's opening: the unions' speed-ups over dense of the same dtype."""
    if (found := unions_speed(root)) is None:
        return NO_UNIONS
    data, ratio = found
    union, learned = UNIONS
    return (
        "On SmolLM2-135M on a 2-core CPU, against dense attention in the same dtype, in "
        "float32 (and bfloat16), the union of a 512-token window with sinks and 16 selected "
        "blocks of 64 runs a prefill of 8k and 16k tokens at "
        f"{speed_pairs(ratio, union, 'forward')} dense's speed and a LoRA+ training step of "
        f"8k tokens at {speed_pairs(ratio, union, 'train lora-plus')}; with the learned "
        "pieces-of-4 "
        f"gate, a prefill at {speed_pairs(ratio, learned, 'forward')} and a training step "
        f"at {speed_pairs(ratio, learned, 'train lora-plus')} "
        f"(`{data.get('command', SPEED_COMMAND)}`, "
        f"{str(data['environment'].get('time', ''))[:10]})."
    )


def render_real_model_speed_bullet(root: Path) -> str:
    """docs/performance.md: the real model's line in the summary of where sparse pays."""
    if (found := unions_speed(root)) is None:
        return NO_UNIONS
    _, ratio = found
    union, learned = UNIONS
    return (
        "* **A real model on CPU** (SmolLM2-135M, against dense of the same dtype, float32 "
        "(bfloat16)): the window | `block_topk(64, 16)` union runs a forward of 8k and 16k "
        f"tokens at {speed_pairs(ratio, union, 'forward')} dense's speed and a LoRA+ training "
        f"step of 8k at {speed_pairs(ratio, union, 'train lora-plus')}; the same union with "
        "the learned "
        f"pieces-of-4 gate, a forward at {speed_pairs(ratio, learned, 'forward')} and a "
        f"training step at {speed_pairs(ratio, learned, 'train lora-plus')} (table below)."
    )


# ---------------------------------------------------------------- kernels and training


def attention_rows(data: dict[str, Any], lengths: tuple[int, ...]) -> list[list[str]]:
    """Rows of ``benchmarks/attention.py``'s table for ``lengths``; speed-ups against SDPA
    ``is_causal=True`` at the same length, efficiency = speed-up x density."""
    causal = {r["length"]: r for r in data["results"] if r["name"] == "sdpa_causal"}
    rows = []
    for r in data["results"]:
        if r["length"] not in lengths:
            continue
        head = [r["name"], r.get("backend", "sdpa"), str(r["length"])]
        if "skipped" in r:
            rows.append(head + ["", "skipped: " + r["skipped"]] + [""] * 5)
            continue
        base = causal[r["length"]]
        density = r.get("density")
        fwd, both = r["fwd"]["s"], r.get("fwd_bwd")
        speedup = None if both is None else base["fwd_bwd"]["s"] / both["s"]
        rows.append(
            head
            + [
                "all pairs" if density is None else f"{density:.3f}",
                f"{fwd:.3f}",
                f"{base['fwd']['s'] / fwd:.1f}x",
                "n/a" if both is None else f"{both['s']:.3f}",
                "n/a" if speedup is None else f"{speedup:.1f}x",
                "" if speedup is None or density is None else f"{speedup * density:.0%}",
                "n/a" if both is None else f"{both['peak_mb']:.0f}",
            ]
        )
    return rows


ATTENTION_HEADER = ["pattern", "backend", "L", "density", "fwd s", "fwd speed-up", "fwd+bwd s"]
ATTENTION_HEADER += ["fwd+bwd speed-up", "efficiency", "peak MB"]


def attention_table(root: Path, name: str, lengths: tuple[int, ...]) -> str:
    """One of ``benchmarks/attention.py``'s result files as a table."""
    path = RESULTS / name
    data = load(root, path)
    if data is None:
        return missing(path, "python benchmarks/attention.py --out " + str(path))
    rows = attention_rows(data, lengths)
    c = data["config"]
    extra = f"B={c['batch']}, H={c['heads']}, D={c['dim']}, median of {c['repeats']}"
    return (
        table(ATTENTION_HEADER, "llrrrrrrrr", rows)
        + "\n\n"
        + stamp(data["environment"], data["command"], extra)
    )


def render_attention_cpu(root: Path) -> str:
    """Attention kernels on the CPU at 16k and 32k tokens."""
    return attention_table(root, "attention.json", (16384, 32768))


def render_attention_h200(root: Path) -> str:
    """Attention kernels on one H200 at 16k tokens."""
    return attention_table(root, "attention-h200.json", (16384,))


def render_attention_learned(root: Path) -> str:
    """The learned gate's cost against MoBA's mean keys at 16k tokens."""
    return attention_table(root, "attention-learned.json", (16384,))


def render_attention_pure_pytorch(root: Path) -> str:
    """Windows without the C++ kernel (``LONGSWAP_CPU_KERNEL=0``)."""
    text = attention_table(root, "attention-pure-pytorch.json", (16384,))
    return text.replace("Command: `", "Command: `LONGSWAP_CPU_KERNEL=0 ")


def render_attention_terms(root: Path) -> str:
    """Soft-capped logits and learned sinks: what they cost on CPU at 4k tokens."""
    path = RESULTS / "attention-terms.json"
    data = load(root, path)
    if data is None:
        return missing(path, "python benchmarks/attention.py --terms plain,softcap,sinks")
    rows = [
        [
            cell(r["pattern"]),
            r["terms"],
            f"{r['fwd']['s']:.3f}",
            f"{r['fwd_bwd']['s']:.3f}" if "fwd_bwd" in r else "n/a",
        ]
        for r in data["results"]
        if "terms" in r
    ]
    header = ["pattern", "terms", "fwd s", "fwd+bwd s"]
    return table(header, "llrr", rows) + "\n\n" + stamp(data["environment"], data["command"])


def render_attention_build(root: Path) -> str:
    """Building the block structure and FlexAttention's BlockMask at 64k tokens."""
    data = load(root, RESULTS / "attention.json")
    if data is None:
        return missing(RESULTS / "attention.json", "python benchmarks/attention.py")
    rows = [
        [b["pattern"], str(b["length"]), f"{b['structure_ms']:.1f}", f"{b['blockmask_ms']:.1f}"]
        for b in data["build"]
    ]
    header = ["pattern", "L", "block structure ms", "BlockMask ms"]
    return table(header, "lrrr", rows) + "\n\n" + stamp(data["environment"], data["command"])


def decode_table(root: Path, name: str) -> str:
    """One of ``benchmarks/decode.py``'s result files as a table."""
    path = RESULTS / name
    data = load(root, path)
    if data is None:
        return missing(path, "python benchmarks/decode.py --out " + str(path))
    rows = [
        [
            r["arm"],
            str(r["context"]),
            f"{r['decode_tokens_per_s']:.2f}",
            f"{r['speedup_vs_dense']:.2f}",
            f"{r['prefill_seconds']:.1f}",
            f"{r['cache_mb']:.1f}",
        ]
        for r in data["results"]
    ]
    header = ["arm", "context", "decode tokens/s", "x dense", "prefill s", "KV cache MB"]
    extra = f"{data['config'].get('dtype', 'bfloat16')}, median of {data['config']['steps']} steps"
    return (
        table(header, "lrrrrr", rows) + "\n\n" + stamp(data["environment"], data["command"], extra)
    )


def render_decode_smollm2(root: Path) -> str:
    """Decoding SmolLM2-135M per pattern."""
    return decode_table(root, "decode-smollm2-fp32.json")


def render_decode_bench(root: Path) -> str:
    """Decoding a small Llama-shaped model per pattern, to 32k tokens."""
    return decode_table(root, "decode-bench.json")


def render_finetune_throughput(root: Path) -> str:
    """Training steps of the embedded model's architecture, dense against sparse."""
    path = RESULTS / "finetune.json"
    data = load(root, path)
    if data is None:
        return missing(path, "python benchmarks/finetune.py")
    rows = [
        [
            r["arm"],
            str(r["length"]),
            f"{r['tokens_per_s']:.0f}",
            f"{r['speedup']:.2f}x",
            f"{r['step_s']:.2f}",
            f"{r['peak_rss_growth_mb']:.0f}",
        ]
        for r in data["results"]
    ]
    header = ["arm", "L", "training tokens/s", "vs dense", "step s", "peak memory growth MB"]
    return table(header, "lrrrrr", rows) + "\n\n" + stamp(data["environment"], data["command"])


def render_memory_per_token(root: Path) -> str:
    """Bytes autograd saves per token in one Llama-2-7B-shaped layer."""
    path = RESULTS / "memory.json"
    data = load(root, path)
    if data is None:
        return missing(path, "python benchmarks/memory.py")
    rows = [[cell(r["arm"]), f"{r['per_token'] / 1024:.1f} KiB"] for r in data["results"]]
    header = ["arm", "saved per token, one layer, float32"]
    return table(header, "lr", rows) + "\n\n" + stamp(data["environment"], data["command"])


def render_memory_7b(root: Path) -> str:
    """The worked estimate: GiB per GPU for a 7B Llama at 64k tokens."""
    path = RESULTS / "memory.json"
    data = load(root, path)
    if data is None:
        return missing(path, "python benchmarks/memory.py")
    estimate = data["estimate_7b"]
    parts = ["full fine-tune states", "LoRA states", "layer checkpoints", "one layer recomputed"]
    parts.append("logits and their gradient")
    rows = []
    for setting, gib in estimate["gib_per_gpu"].items():
        shared = sum(gib[p] for p in parts[2:])
        full, lora = gib[parts[0]] + shared, gib[parts[1]] + shared
        rows.append(
            [cell(setting)] + [f"{gib[p]:.1f}" for p in parts] + [f"{full:.1f}", f"{lora:.1f}"]
        )
    header = ["arm on GPUs", *parts, "total, full", "total, LoRA"]
    extra = f"{estimate['tokens']} tokens, arithmetic on the measured bytes"
    return (
        table(header, "lrrrrrrr", rows)
        + "\n\n"
        + stamp(data["environment"], data["command"], extra)
    )


#: The demo's arms, by their folder names (``longswap.demo.verdict.ARMS``).
DENSE, SWAPPED, TUNED, SCRATCH, TUNED_DENSE, LEARNED = constant(
    ROOT / "src/longswap/demo/verdict.py", "ARMS"
)


class DemoNumbers:
    """The figures of one committed demo run that tables and prose quote."""

    def __init__(self, root: Path, folder: Path) -> None:
        self.demo, self.line = demo_stamp(root, folder)
        self.found = demo_records(root, folder)
        self.plan = self.demo["plan"]
        self.tuned, self.far = self.plan["tuned"], max(self.plan["passkey_lengths"])
        self.beyond = [n for n in self.plan["lengths"] if n > self.tuned]
        self.learned = LEARNED in self.demo["cost"]

    def ppl(self, arm: str, length: int | None = None) -> float:
        """Perplexity of ``arm`` at ``length`` (the fine-tuning length by default)."""
        return demo_mean(self.found, arm, "ppl", length or self.tuned, "perplexity")

    def gap(self, arm: str, length: int | None = None) -> float:
        """How much higher ``arm``'s perplexity is than the dense fine-tune's (arm 5)."""
        return self.ppl(arm, length) / self.ppl(TUNED_DENSE, length) - 1

    def key(self, arm: str, length: int | None = None) -> float:
        """Passkey accuracy of ``arm`` at ``length`` (the longest by default), over depths."""
        return demo_mean(self.found, arm, "passkey", length or self.far, "accuracy")

    def mass(self, arm: str, field: str = "captured_mass") -> float:
        """Share of dense attention's mass that ``arm``'s selection keeps at the fine-tuning
        length (``oracle_mass``: that the best selection of its budget keeps)."""
        return demo_mean(self.found, arm, "selection", self.tuned, field)

    def cost(self, arm: str, field: str = "cpu_seconds") -> float:
        """``arm``'s fine-tuning cost ``field`` as a share of the dense fine-tune's."""
        cost = self.demo["cost"]
        return cost[arm][field] / cost[TUNED_DENSE][field]

    def recovered(self) -> float:
        """Share of the swap's perplexity loss (arm 2 against arm 1) that fine-tuning gives
        back, measured against the dense fine-tune (arm 5), at the fine-tuning length."""
        lost = self.ppl(SWAPPED) - self.ppl(DENSE)
        return 1 - (self.ppl(TUNED) - self.ppl(TUNED_DENSE)) / lost


def render_demo_targets(root: Path, folder: Path) -> str:
    """The real-model recipe's targets, each computed from the demo's records and cost, for
    arm 3 (the demo's pattern) and, when the run has it, arm 6 (its learned counterpart)."""
    run = DemoNumbers(root, folder)
    tuned, far = run.tuned, run.far

    def measured(arm: str) -> list[str]:
        """The targets' cells of ``arm`` (3 or 6): the swap fine-tuned."""
        lost = run.ppl(SWAPPED) - run.ppl(DENSE)
        left = run.ppl(arm) - run.ppl(TUNED_DENSE)
        own = arm == TUNED  # arms 2 and 4 have arm 3's pattern
        return [
            f"{run.recovered():.0%} (loss {lost:+.3f}, left {left:+.3f})" if own else "",
            f"x{run.ppl(arm) / run.ppl(TUNED_DENSE):.3f}",
            *(
                f"{run.ppl(arm, n):.2f} (arm 5 {run.ppl(TUNED_DENSE, n):.2f}, arm 1 "
                f"{run.ppl(DENSE, n):.2f})"
                for n in run.beyond
            ),
            f"{run.key(arm):.0%} (arm 1 {run.key(DENSE):.0%})",
            f"{run.cost(arm):.2f}",
            f"x{run.ppl(SCRATCH) / run.ppl(arm):.1f}" if own else "",
        ]

    targets = [
        f"recovers >= 2/3 of the swap's loss at {tuned} (arm 2 vs 1, against arm 5)",
        f"within 3% of arm 5 at {tuned}",
        *(f"at {n} ({n // tuned}x): no worse than arm 5, better than arm 1" for n in run.beyond),
        f"passkey at {far}: at least arm 1's",
        "fine-tuning CPU seconds <= 0.6 of arm 5's",
        f"arm 4 (random init) far worse at {tuned}",
    ]
    arms = [TUNED] + ([LEARNED] if run.learned else [])
    columns = [measured(arm) for arm in arms]
    rows = [[target, *cells] for target, *cells in zip(targets, *columns, strict=True)]
    header = ["target", "arm 3 (the pattern)", "arm 6 (learned selector)"][: len(arms) + 1]
    return table(header, "l" + "r" * len(arms), rows) + "\n\n" + run.line


def standing(run: DemoNumbers, arm: str, other: str, name: str) -> str:
    """Where ``arm`` stands against ``other`` (called ``name``) beyond the fine-tuning
    length: ``ahead of the dense base at 8k (8.59 against 9.18) and 16k (...)``, or, when
    the lengths disagree, ``ahead of ... at 8k (...) and behind it at 16k (...)``."""
    groups: dict[str, list[str]] = {}
    for n in run.beyond:
        word = "ahead of" if run.ppl(arm, n) < run.ppl(other, n) else "behind"
        groups.setdefault(word, []).append(
            f"{n // 1024}k ({run.ppl(arm, n):.2f} against {run.ppl(other, n):.2f})"
        )
    parts = [
        f"{word} {name if i == 0 else 'it'} at {' and '.join(found)}"
        for i, (word, found) in enumerate(groups.items())
    ]
    return " and ".join(parts)


def render_default_choice(root: Path) -> str:
    """README: what the SmolLM2 demo's fine-tuned swaps achieved and why the default is
    the mean-key union, every number from the demo's records and the speed benchmark."""
    run = DemoNumbers(root, DEMOS["smollm2-demo"])
    if not run.learned:
        return missing(DEMOS["smollm2-demo"] / "demo.json", "longswap demo --model ... --learned")
    if (found := unions_speed(root)) is None:
        return NO_UNIONS
    _, ratio = found
    tuned, far = run.tuned, run.far
    cheaper = [
        run.cost(arm) < 1 and all(ratio(union, n, k, "float32") > 1 for k, n in CELLS)
        for arm, union in zip((TUNED, LEARNED), UNIONS, strict=True)
    ]
    if cheaper != [True, False]:
        raise ValueError(
            "smollm2-default-choice: the results no longer say that only the mean-key union "
            "is cheaper than dense everywhere; re-decide the default and rewrite the paragraph"
        )
    return (
        "Starting from the pre-trained weights is what makes the swap work (from random "
        "weights the same budget leaves a perplexity "
        f"{run.ppl(SCRATCH) / run.ppl(TUNED):,.0f} times higher), and "
        f"{run.demo['steps']} fine-tuning steps at {tuned} tokens taught both swapped models "
        f"passkey retrieval at {far} (arm 3 {run.key(TUNED):.0%}, arm 6 "
        f"{run.key(LEARNED):.0%}; the dense base {run.key(DENSE):.0%}). With blocks chosen "
        "by a learned selector (arm 6: the same budget of keys, each block scored from "
        "pieces of 4 keys by a gate distilled from dense attention) the fine-tuned swap is "
        f"{run.gap(LEARNED):.1%} behind the dense fine-tune at {tuned} and "
        f"{standing(run, LEARNED, DENSE, 'the dense base')}; "
        f"with MoBA's mean keys (arm 3) it is {run.gap(TUNED):.1%} behind at {tuned} (point "
        f"estimates; with {run.plan['targets']:,} scored tokens the intervals are wider "
        "than the differences). **Why the default is still the mean-key union**: the "
        "recipe asks for the best quality at a cost below dense, and only the mean-key "
        f"union is below dense's cost at every length measured: at {tuned} its fine-tuning "
        f"takes {run.cost(TUNED):.2f} of dense's CPU time where the learned union takes "
        f"{run.cost(LEARNED):.2f} (selector warm-up included), and one forward at 8k is "
        f"{ratio(UNIONS[0], 8192, 'forward', 'float32'):.2f}x dense's speed against "
        f"{ratio(UNIONS[1], 8192, 'forward', 'float32'):.2f}x in float32 "
        "(`longswap demo --model ... --learned`, "
        "`python benchmarks/real_model_speed.py`)."
    )


def interval(run: DemoNumbers, arm: str) -> float:
    """Half the width of ``arm``'s perplexity interval at the fine-tuning length, as a share
    of its perplexity."""
    records = run.found[(arm, "ppl")]
    low, high = next(r["perplexity_ci"] for r in records if r["length"] == run.tuned)
    return (high - low) / 2 / run.ppl(arm)


def render_smollm2_findings(root: Path) -> str:
    """docs/demo.md: what the SmolLM2 run shows, each figure from its records."""
    run = DemoNumbers(root, DEMOS["smollm2-demo"])
    tuned, k = run.tuned, [f"{n // 1024}k" for n in run.plan["passkey_lengths"]]

    def keys(arm: str) -> str:
        return " and ".join(f"{run.key(arm, n):.0%}" for n in run.plan["passkey_lengths"])

    recovered = run.recovered()
    lines = [
        "* **Pre-trained initialisation is what makes the swap work**: from random weights "
        f"the same budget leaves a perplexity of {run.ppl(SCRATCH):,.0f} at {tuned:,} tokens "
        "(arm 4) "
        f"against {run.ppl(TUNED):.2f} (arm 3).",
        "* **The fine-tune teaches retrieval across the extended length**: passkeys found at "
        f"{' and '.join(k)}: the fine-tuned swap {keys(TUNED)}, the dense fine-tune "
        f"{keys(TUNED_DENSE)}, the untrained swap {keys(SWAPPED)}, the dense base "
        f"{keys(DENSE)}.",
        "* **With MoBA's mean keys (arm 3) fine-tuning "
        + ("recovers most of" if recovered >= 2 / 3 else "does not close")
        + f" the swap's perplexity gap at this budget**: {recovered:.0%} of the swap's loss "
        f"is recovered at {tuned:,} tokens. Beyond the fine-tuning length the swapped model is "
        f"{standing(run, TUNED, TUNED_DENSE, 'the dense fine-tune')}, and "
        f"{standing(run, TUNED, DENSE, 'the untrained dense base with extended positions')} "
        "(point estimates; the intervals overlap). A fixed "
        "budget of about 1,600 keys per query sees a shrinking share of a longer context. "
        f"{run.demo['steps']} steps of {tuned:,} tokens is what this machine affords; the GPU "
        "command is where the recipe's budget belongs.",
    ]
    if run.learned:
        lines.append(
            "* **With the learned selector (arm 6) the same budget comes closer**: blocks "
            "scored from pieces of 4 keys by a gate distilled from dense attention (a "
            f"{run.demo['steps']}-step warm-up with the model frozen, then the same "
            f"{run.demo['steps']} steps) bring the fine-tuned swap within "
            f"{run.gap(LEARNED):.1%} of the dense fine-tune at {tuned:,} tokens "
            f"({run.ppl(LEARNED):.2f} against {run.ppl(TUNED_DENSE):.2f}), "
            f"{standing(run, LEARNED, DENSE, 'the dense base')}; "
            f"it keeps {run.mass(LEARNED):.1%} of dense attention's mass at {tuned:,} tokens where "
            f"mean keys keep {run.mass(TUNED):.1%}. At {run.plan['longest'] // 1024}k it is "
            f"{run.gap(LEARNED, run.plan['longest']):.1%} behind the dense fine-tune."
        )
        lines.append(
            f"* **Cost of fine-tuning at {tuned:,} tokens**: the union sees most of a "
            f"{tuned:,}-token context, and at this length the projections and MLPs dominate "
            f"a 135M model's step: arm 3 trains at {run.cost(TUNED):.2f} of the dense "
            f"arm's CPU time and arm 6, whose gate scores every piece of 4 keys, at "
            f"{run.cost(LEARNED):.2f} (its warm-up included; "
            f"{run.cost(LEARNED, 'peak_memory_mb'):.2f} of dense's peak memory). The "
            "saving grows with length ([performance](performance.md)). The default is the "
            "union with the best quality at a cost below dense's."
        )
    lines.append(
        f"* **The intervals are wide**: {run.plan['targets']:,} target tokens give intervals "
        f"of about ±{interval(run, TUNED_DENSE):.0%}; every arm is scored on the same "
        "tokens, so the differences between arms are better determined than the intervals "
        "suggest, but the verdict compares intervals and leaves those expectations "
        "undecided."
    )
    return "\n".join(lines)


def render_demo_findings(root: Path) -> str:
    """docs/demo.md: what the embedded model's run shows, each figure from its records."""
    run = DemoNumbers(root, DEMOS["demo"])
    tuned, trained, far = run.tuned, run.plan["trained"], run.far
    lost = run.ppl(SWAPPED) / run.ppl(DENSE) - 1
    keys = {arm: f"{run.key(arm):.0%}" for arm in (TUNED, TUNED_DENSE, LEARNED, DENSE)}
    dense_fails = run.key(TUNED_DENSE) < 0.8  # the verdict's bar for "works"
    lines = [
        "* **Pre-trained initialisation matters, by far**: from the same budget the swapped "
        f"model (arm 3) reaches a perplexity of {run.ppl(TUNED):.2f} at {tuned}, the randomly "
        f"initialised one (arm 4) {run.ppl(SCRATCH):.2f}, "
        f"{run.ppl(SCRATCH) / run.ppl(TUNED):.1f} times higher.",
        f"* **Arm 1 is the base with its positions extended to {run.plan['longest']} (YaRN, "
        f"{run.plan['longest'] // trained}x) at every length**, as the fine-tuned arms are: "
        f"{run.ppl(DENSE, trained):.2f} at its trained {trained}, where the base as trained "
        'scores lower ([history](history.md)), so "arm 3 at '
        f'{tuned} is no worse than arm 1 at {trained}" compares with the stretched base.',
        "* **The swap itself "
        + ("costs nothing here**" if abs(lost) < 0.01 else f"costs {lost:+.1%} here**")
        + f": the untrained swap scores {run.ppl(SWAPPED):.2f} at {tuned} against the "
        f"extended base's {run.ppl(DENSE):.2f} (the window union sees most of the model's "
        "trained length), so there is little loss for fine-tuning to recover.",
        f"* **Cost**: arm 3 trains in {run.cost(TUNED):.2f} of the dense fine-tune's CPU "
        f"time, {run.gap(TUNED):+.1%} from its perplexity at {tuned}; the verdict above says "
        'whether the intervals decide "close at a fraction of the cost".',
        f"* **Passkey retrieval at {far} ({far // trained}x)**: arm 3 finds {keys[TUNED]}, "
        f"arm 6 {keys[LEARNED]}, the dense fine-tune {keys[TUNED_DENSE]}, the extended base "
        f"{keys[DENSE]}"
        + (
            ": the dense fine-tune fails too, so the budget falls short, not the pattern "
            "(`--steps` buys more)."
            if dense_fails
            else "."
        ),
    ]
    if run.learned:
        lines.append(
            "* **Distillation**: mean keys keep "
            f"{run.mass(TUNED):.1%} of dense attention's mass at {tuned} where the best "
            f"selection of the budget keeps {run.mass(TUNED, 'oracle_mass'):.1%}, so a learned "
            f"gate has little to add: arm 6 keeps {run.mass(LEARNED):.1%} and scores "
            f"{run.gap(LEARNED):+.1%} from the dense fine-tune (arm 3 {run.gap(TUNED):+.1%}), "
            f"at {run.cost(LEARNED):.2f} of its CPU time (its gate scores every piece of 4 "
            "keys). On SmolLM2, where mean keys keep less, the same arm is the best swap "
            "measured (below)."
        )
    return "\n".join(lines)


def render_learned_in_demo(root: Path) -> str:
    """docs/learned-selection.md: arm 6 of the SmolLM2 demo in one sentence."""
    run = DemoNumbers(root, DEMOS["smollm2-demo"])
    if not run.learned:
        return missing(DEMOS["smollm2-demo"] / "demo.json", "longswap demo --model ... --learned")
    return (
        f"On SmolLM2, fine-tuned at {run.tuned:,} tokens, it is {run.gap(LEARNED):.1%} behind "
        f"the dense fine-tune at that length (arm 3, mean keys: {run.gap(TUNED):.1%}) and "
        f"{standing(run, LEARNED, DENSE, 'the dense base')}, at "
        f"{run.cost(LEARNED):.2f} of the dense fine-tune's CPU time (arm 3: "
        f"{run.cost(TUNED):.2f}); see the [demo](demo.md) for every number."
    )


DEMO_TABLES = {
    "verdict": render_demo_verdict,
    "perplexity": render_demo_perplexity,
    "passkey": render_demo_passkey,
    "cost": render_demo_cost,
    "speed": render_demo_speed,
}
TABLES: dict[str, Callable[[Path], str]] = {
    **{
        f"{prefix}-{name}": functools.partial(render, folder=folder)
        for prefix, folder in DEMOS.items()
        for name, render in DEMO_TABLES.items()
    },
    "smollm2-demo-targets": functools.partial(render_demo_targets, folder=DEMOS["smollm2-demo"]),
    "smollm2-default-choice": render_default_choice,
    "smollm2-findings": render_smollm2_findings,
    "demo-findings": render_demo_findings,
    "smollm2-learned-in-demo": render_learned_in_demo,
    "real-model-summary": render_real_model_summary,
    "real-model-perplexity": render_real_model_perplexity,
    "real-model-other": render_real_model_other,
    "real-model-float32": render_real_model_float32,
    "real-model-history": render_real_model_history,
    "real-model-speed": render_real_model_speed,
    "real-model-speed-summary": render_real_model_speed_summary,
    "real-model-speed-headline": render_real_model_speed_headline,
    "real-model-speed-bullet": render_real_model_speed_bullet,
    "attention-cpu": render_attention_cpu,
    "attention-build": render_attention_build,
    "attention-h200": render_attention_h200,
    "attention-learned": render_attention_learned,
    "attention-pure-pytorch": render_attention_pure_pytorch,
    "attention-terms": render_attention_terms,
    "decode-smollm2": render_decode_smollm2,
    "decode-bench": render_decode_bench,
    "finetune-throughput": render_finetune_throughput,
    "memory-per-token": render_memory_per_token,
    "memory-7b": render_memory_7b,
}


# ---------------------------------------------------------------- the documents


def documents(root: Path) -> list[Path]:
    """README.md and every page under docs/ (the demos' own generated reports excepted)."""
    pages = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    reports = {root / folder / "report.md" for folder in DEMOS.values()}
    return [p for p in pages if p.is_file() and p not in reports]


def rendered(text: str, root: Path, where: str) -> str:
    """``text`` with every marked table rendered anew."""
    out, rest = [], text
    while (start := rest.find("<!-- render:")) >= 0:
        head_end = rest.index("-->", start) + 3
        name = rest[start + len("<!-- render:") : head_end - 3].strip()
        closing = f"<!-- /render:{name} -->"
        end = rest.find(closing, head_end)
        if end < 0:
            raise ValueError(f"{where}: <!-- render:{name} --> has no {closing}")
        if name not in TABLES:
            raise ValueError(f"{where}: unknown table {name!r}; known: {', '.join(TABLES)}")
        out.append(rest[:head_end] + "\n" + TABLES[name](root) + "\n" + closing)
        rest = rest[end + len(closing) :]
    return "".join(out) + rest


def render(root: Path = ROOT, check: bool = False) -> list[str]:
    """Render every document under ``root``; return the documents that changed (with
    ``check``, that differ, without writing them)."""
    changed = []
    for page in documents(root):
        text = page.read_text()
        new = rendered(text, root, str(page.relative_to(root)))
        if new != text:
            changed.append(str(page.relative_to(root)))
            if not check:
                page.write_text(new)
    return changed


def main(argv: list[str] | None = None) -> int:
    """Rewrite the tables, or with ``--check`` report the documents whose tables drifted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a table differs")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root")
    args = parser.parse_args(argv)
    try:
        changed = render(args.root, args.check)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for page in changed:
        verb = "differs from its results files" if args.check else "rendered"
        print(f"{page}: {verb}")
    if args.check and changed:
        print("run: python benchmarks/render_docs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
