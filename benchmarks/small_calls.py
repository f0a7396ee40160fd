"""Calls without gradients at small sizes: the dense oracle against ``blocks``.

``auto`` sends small calls without gradients to ``reference`` (one masked softmax, nothing
to compile) and the rest to ``blocks`` on CPU. This measures where the two cross: decoding
steps (one query over ``Lk`` keys) and prompts (``L`` queries over ``L`` keys), for a
window (with and without sinks), a dilated window and a top-k pattern, with grouped-query
heads (8 query heads, 4 key heads, D=32, the demo model's attention). A decoding row grows
its keys by one at every timed call, as a decoding loop does. Prints a table with the
backend ``auto`` picks, writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from smoke import add_smoke_flag, apply_smoke

from longswap import sparse_attention
from longswap.environment import environment
from longswap.io import write_json
from longswap.kernels import resolve_backend
from longswap.patterns import block_topk, dilated, sliding_window

PATTERNS = {
    "sliding_window(256)": sliding_window(256),
    "sliding_window(256,sinks=4)": sliding_window(256, sinks=4),
    "dilated(64,4)": dilated(64, 4),
    "block_topk(128,4)": block_topk(128, 4),
}
SHAPES = [(1, 512), (1, 1024), (1, 2048), (1, 4096), (1, 8192), (1, 16384), (64, 64), (128, 128)]
SHAPES += [(256, 256), (512, 512), (1024, 1024)]
#: ``--smoke``: one decoding step and one prompt.
SMOKE_SHAPES = [(1, 512), (64, 64)]


def median_ms(fn: Callable[[int], object], repeats: int) -> float:
    """Median wall time of ``fn(i)`` for ``i = 1..repeats`` in ms, after a warm-up ``fn(0)``."""
    fn(0)
    times = []
    for i in range(1, repeats + 1):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _step(call: Callable[..., object], q: torch.Tensor, keys: list, i: int) -> object:
    """Call ``i``: ``q`` against the ``i``-th (keys, values)."""
    return call(q, *keys[i])


def run(repeats: int, shapes: list[tuple[int, int]]) -> dict:
    """Every (pattern, ``(Lq, Lk)`` shape) through both backends, side by side."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for q_len, kv_len in shapes:
        q = torch.randn(1, 8, q_len, 32, generator=gen)
        # A decoding loop meets a new key length at every step (nothing cached per shape
        # helps it): call i of a decoding row sees kv_len + i keys. Prompts repeat one shape.
        grows = q_len == 1
        k, v = (torch.randn(1, 4, kv_len + repeats * grows, 32, generator=gen) for _ in range(2))
        keys = [
            (k[:, :, : kv_len + i * grows].contiguous(), v[:, :, : kv_len + i * grows].contiguous())
            for i in range(repeats + 1)
        ]
        for name, pattern in PATTERNS.items():
            row = {"pattern": name, "q_len": q_len, "kv_len": kv_len}
            with torch.no_grad():
                for backend in ("reference", "blocks"):
                    call = functools.partial(sparse_attention, pattern=pattern, backend=backend)
                    row[backend] = median_ms(functools.partial(_step, call, q, keys), repeats)
                k, v = keys[0]
                row["auto"] = resolve_backend("auto", q, k, v, pattern)
            row["faster"] = min(("reference", "blocks"), key=row.get)
            rows.append(row)
            print(f"{name} {q_len}x{kv_len}: {row['faster']}", file=sys.stderr)
    return {
        "benchmark": "small_calls",
        "command": "python " + " ".join(sys.argv),
        "environment": environment(),
        "results": rows,
    }


def table(record: dict) -> str:
    """Markdown: times of both backends, the faster one, and what ``auto`` picks."""
    lines = [
        "| pattern | Lq x Lk | reference ms | blocks ms | faster | auto picks |",
        "|---|---|---:|---:|---|---|",
    ]
    for r in record["results"]:
        lines.append(
            f"| {r['pattern']} | {r['q_len']} x {r['kv_len']} | {r['reference']:.2f} "
            f"| {r['blocks']:.2f} | {r['faster']} | {r['auto']} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/small_calls.json"))
    add_smoke_flag(parser)
    args = apply_smoke(parser, parser.parse_args(), repeats=1)
    record = run(args.repeats, SMOKE_SHAPES if args.smoke else SHAPES)
    print(table(record))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, record)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
