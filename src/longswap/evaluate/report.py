"""``report.md`` and PNG plots from evaluation records, models side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _by(records: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    return [r for r in records if r["task"] == task]


def _name(path: str) -> str:
    return Path(path).name or path


def _line_plot(rows: list[dict[str, Any]], field: str, label: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for model in sorted({r["model"] for r in rows}):
        points = sorted((r["length"], r[field]) for r in rows if r["model"] == model and field in r)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=_name(model))
    ax.set_xscale("log", base=2)
    values = [r[field] for r in rows if field in r and r[field] > 0]
    if values and max(values) > 10 * min(values):  # e.g. a model that fails beyond its length
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


def write_report(records: list[dict[str, Any]], out: Path) -> Path:
    """Write ``report.md`` and the plots into ``out``; returns the report's path."""
    lines = ["# longswap evaluation", ""]
    ppl = _by(records, "ppl")
    if ppl:
        _line_plot(ppl, "perplexity", "perplexity", out / "perplexity.png")
        lines += [
            "## Perplexity vs context length",
            "",
            "![](perplexity.png)",
            "",
            "| model | length | perplexity | bits per token | scoring |",
            "|---|---:|---:|---:|---|",
        ]
        for r in ppl:
            if "skipped" in r:
                lines.append(f"| {_name(r['model'])} | {r['length']} | skipped: {r['skipped']} |||")
            else:
                beyond = f" (beyond its {r['beyond_trained']})" if "beyond_trained" in r else ""
                lines.append(
                    f"| {_name(r['model'])} | {r['length']}{beyond} | {r['perplexity']:.3f} "
                    f"| {r['bits_per_token']:.3f} | {r['convention']} |"
                )
        lines.append("")
    keys = _by(records, "passkey")
    if keys:
        lines += ["## Passkey retrieval", ""]
        for model in sorted({r["model"] for r in keys}):
            png = f"passkey-{_name(model)}.png"
            _heatmap([r for r in keys if r["model"] == model], model, out / png)
            lines += [f"![]({png})", ""]
    for task, field, label in (
        ("needles", "accuracy", "accuracy"),
        ("recall", "accuracy", "accuracy"),
        ("speed", "prefill_tokens_per_s", "prefill tokens/s"),
    ):
        rows = _by(records, task)
        if not rows:
            continue
        _line_plot(rows, field, label, out / f"{task}.png")
        lines += [f"## {task}", "", f"![]({task}.png)", ""]
        if task == "speed":
            for extra, what in (
                ("decode_tokens_per_s", "decode tokens/s"),
                ("peak_rss_growth_mb", "peak memory growth (MB)"),
            ):
                _line_plot(rows, extra, what, out / f"{task}-{extra}.png")
                lines += [f"![]({task}-{extra}.png)", ""]
        lines += ["| model | length | result |", "|---|---:|---|"]
        for r in rows:
            shown = {
                k: (round(v, 3) if isinstance(v, float) else v)
                for k, v in r.items()
                if k not in ("key", "model", "task", "length", "config", "environment")
            }
            lines.append(f"| {_name(r['model'])} | {r['length']} | {shown} |")
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
