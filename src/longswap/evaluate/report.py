"""``report.md`` and PNG plots from evaluation records, models side by side."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from longswap.io import write_atomic  # noqa: E402

#: Columns of the tables of the simple tasks: (record field, header, format).
COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "needles": [("accuracy", "accuracy", "{:.0%}"), ("trials", "trials", "{}")],
    "recall": [("accuracy", "accuracy", "{:.0%}"), ("trials", "trials", "{}")],
    "selection": [
        ("captured_mass", "dense mass kept", "{:.3f}"),
        ("oracle_mass", "oracle, same budget", "{:.3f}"),
        ("share_of_oracle", "share of oracle", "{:.1%}"),
        ("kept_nats", "-log mass kept (nats)", "{:.3f}"),
        ("oracle_nats", "oracle -log mass kept", "{:.3f}"),
    ],
    "speed": [
        ("prefill_tokens_per_s", "prefill tokens/s", "{:.0f}"),
        ("decode_tokens_per_s", "decode tokens/s", "{:.1f}"),
        ("decode_step_ms", "decode ms/step (median)", "{:.2f}"),
        ("cache_mb", "KV cache (MB)", "{:.2f}"),
        ("peak_memory_mb", "peak memory growth (MB)", "{:.0f}"),
    ],
}
#: The plots of each task: (record field, axis label).
PLOTS = {
    "needles": [("accuracy", "accuracy")],
    "recall": [("accuracy", "accuracy")],
    "selection": [("captured_mass", "dense attention mass kept")],
    "speed": [
        ("prefill_tokens_per_s", "prefill tokens/s"),
        ("decode_tokens_per_s", "decode tokens/s"),
        ("cache_mb", "KV cache (MB)"),
    ],
}


def _by(records: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    return [r for r in records if r["task"] == task]


def _name(path: str) -> str:
    return Path(path).name or path


def table(headers: list[str], rows: list[list[str]], right: int = 1) -> list[str]:
    """A markdown table; every column from index ``right`` on is right-aligned."""
    align = ["---" if i < right else "---:" for i in range(len(headers))]
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(align) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


def line_plot(rows: list[dict[str, Any]], field: str, label: str, path: Path) -> None:
    """One line per model against length; a shaded band where records carry ``field_ci``."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for model in sorted({r["model"] for r in rows}):
        mine = sorted(
            (r for r in rows if r["model"] == model and field in r), key=lambda r: r["length"]
        )
        if not mine:
            continue
        lengths = [r["length"] for r in mine]
        (line,) = ax.plot(lengths, [r[field] for r in mine], marker="o", label=_name(model))
        if all(f"{field}_ci" in r for r in mine):
            low, high = zip(*(r[f"{field}_ci"] for r in mine), strict=True)
            ax.fill_between(lengths, low, high, color=line.get_color(), alpha=0.2)
    ax.set_xscale("log", base=2)
    values = [r[field] for r in rows if field in r]
    # A log axis only where every value can sit on it (a zero would vanish from the plot).
    if values and min(values) > 0 and max(values) > 10 * min(values):
        ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(label)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _heatmap(rows: list[dict[str, Any]], model: str, path: Path) -> None:
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows if "depth" in r})
    grid = [[float("nan")] * len(lengths) for _ in depths]
    for r in rows:
        if "accuracy" in r:
            grid[depths.index(r["depth"])][lengths.index(r["length"])] = r["accuracy"]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length")
    ax.set_ylabel("key depth")
    ax.set_title(f"passkey: {_name(model)}", fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _length_cell(r: dict[str, Any]) -> str:
    beyond = f" (beyond its {r['beyond_trained']})" if "beyond_trained" in r else ""
    return f"{r['length']}{beyond}"


def _rows(
    records: list[dict[str, Any]], width: int, cells: Callable[[dict[str, Any]], list[str]]
) -> list[list[str]]:
    """Table rows: model, length, then ``cells(record)``, or the reason a record was skipped."""
    return [
        [_name(r["model"]), _length_cell(r)]
        + (cells(r) if "skipped" not in r else [f"skipped: {r['skipped']}"] + [""] * (width - 1))
        for r in records
    ]


def _perplexity(rows: list[dict[str, Any]], out: Path) -> list[str]:
    measured = [r for r in rows if "perplexity" in r]
    lines = ["## Perplexity vs context length", ""]
    if measured:
        line_plot(rows, "perplexity", "perplexity", out / "perplexity.png")
        lines += ["![](perplexity.png)", ""]

    def cells(r: dict[str, Any]) -> list[str]:
        low, high = r["perplexity_ci"]
        return [f"{r['perplexity']:.3f}", f"{low:.3f} - {high:.3f}", f"{r['bits_per_token']:.3f}"]

    interval = f"{measured[0]['confidence']:.0%} interval" if measured else "interval"
    headers = ["model", "length", "perplexity", interval, "bits per token"]
    lines += table(headers, _rows(rows, 3, cells))
    if measured:
        lines += [f"Scoring: {measured[0]['convention']}.", ""]
    return lines


def _passkey(rows: list[dict[str, Any]], out: Path) -> list[str]:
    lines = ["## Passkey retrieval", ""]
    depths = sorted({r["depth"] for r in rows if "depth" in r})
    grid: dict[tuple[str, int], dict[float, str]] = {}
    for r in rows:
        shown = f"{r['accuracy']:.0%}" if "accuracy" in r else "skipped"
        grid.setdefault((r["model"], r["length"]), {})[r.get("depth")] = shown
    body = [
        [_name(model), str(length), *(cells.get(d, "") for d in depths)]
        for (model, length), cells in grid.items()
    ]
    lines += table(["model", "length", *(f"depth {d:g}" for d in depths)], body)
    for model in sorted({r["model"] for r in rows if "accuracy" in r}):  # one measured, at least
        png = f"passkey-{_name(model)}.png"
        _heatmap([r for r in rows if r["model"] == model], model, out / png)
        lines += [f"![]({png})", ""]
    skipped = [r for r in rows if "skipped" in r]
    lines += [f"Skipped: {_name(r['model'])} at {r['length']}: {r['skipped']}" for r in skipped]
    return lines + [""] if skipped else lines


def _simple(task: str, rows: list[dict[str, Any]], out: Path) -> list[str]:
    lines = [f"## {task}", ""]
    for field, label in PLOTS[task]:
        if not any(field in r for r in rows):  # nothing measured: no empty plot
            continue
        png = f"{task}.png" if field == PLOTS[task][0][0] else f"{task}-{field}.png"
        line_plot(rows, field, label, out / png)
        lines.append(f"![]({png})")
    columns = COLUMNS[task]

    def cells(r: dict[str, Any]) -> list[str]:
        return [fmt.format(r[field]) if field in r else "" for field, _, fmt in columns]

    return [
        *lines,
        "",
        *table(["model", "length", *(h for _, h, _ in columns)], _rows(rows, len(columns), cells)),
    ]


def write_report(records: list[dict[str, Any]], out: Path) -> Path:
    """Write ``report.md`` and the plots into ``out``; returns the report's path."""
    lines = ["# longswap evaluation", ""]
    if ppl := _by(records, "ppl"):
        lines += _perplexity(ppl, out)
    if keys := _by(records, "passkey"):
        lines += _passkey(keys, out)
    for task in ("needles", "recall", "selection", "speed"):
        if rows := _by(records, task):
            lines += _simple(task, rows, out)
    path = out / "report.md"
    write_atomic(path, "\n".join(lines))
    return path
