"""Speed and memory of every pattern x backend against dense SDPA, side by side in one run.

    python benchmarks/attention.py                       # L = 2k..32k, B=1, H=8, D=64
    python benchmarks/attention.py --lengths 4096 --patterns sliding_window --repeats 5
    python benchmarks/attention.py --smoke --backends blocks --out /tmp/attention.json
    python benchmarks/attention.py --lengths 4096,16384 --backends blocks \
        --terms plain,softcap,sinks --out benchmarks/results/attention-terms.json

``--terms``: besides plain softmax attention, each pattern with Gemma 2's logit cap
(``softcap=50``) and with gpt-oss's learned sinks (one logit per head, with a gradient),
side by side, so that their cost is a ratio measured in one run.

For each length: torch SDPA with ``is_causal=True`` (the dense baseline) and SDPA with a
dense boolean mask (what Hugging Face's built-in sliding window does; it computes every
pair, so its cost does not depend on the pattern and it is measured once per length).
Then each pattern with ``blocks`` (forward, and forward+backward) and ``flex`` (forward;
on CPU FlexAttention has no backward). Times are medians of ``--repeats`` runs after a
warm-up; structure build and FlexAttention compile times are reported apart. Peak memory
is the resident-set high-water mark above the level before the call (Linux; from one extra
call with large blocks mapped fresh, see ``heap_mode``; the timed calls reuse the heap as a
running process does), or CUDA's peak allocation on a GPU.

density  = visible pairs / causal pairs (so ``full()`` has density 1);
speedup  = dense SDPA time / this time;
efficiency = speedup / (1 / density), the share of the ideal speedup reached.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from smoke import add_smoke_flag, apply_smoke

from longswap import sparse_attention
from longswap.config import comma_list
from longswap.environment import environment, heap_mode, peak_rss_mb, reset_peak_rss
from longswap.io import write_json
from longswap.kernels import flex
from longswap.patterns import (
    Pattern,
    bigbird,
    block_topk,
    dilated,
    full,
    learned_topk,
    local_global,
    shifted_groups,
    sliding_window,
)
from longswap.selectors import BlockGate

PATTERNS: dict[str, Pattern] = {
    "full": full(),
    "sliding_window": sliding_window(512),
    "dilated": dilated(window=256, dilation=4),
    "local_global": local_global(window=512, global_tokens=tuple(range(16))),
    "bigbird": bigbird(block_size=128, window_blocks=2, global_blocks=1, random_blocks=2),
    "shifted_groups": shifted_groups(group_size=2048),
    "block_topk": block_topk(block_size=128, top_k=4),
    # The same budget, selected by a learned gate (its scores are part of every timed call).
    "learned_topk": learned_topk(block_size=128, top_k=4),
    # Its gate scoring each block from pieces of 16 keys (8 scores per block, log-sum-exp).
    "learned_topk_pieces": learned_topk(block_size=128, top_k=4, sub_block=16),
}


#: What each ``--terms`` choice adds to the attention call.
TERMS = {"plain": {}, "softcap": {"softcap": 50.0}, "sinks": {"sinks": True}}


def measure(fn: Callable[[], object], repeats: int, device: torch.device) -> dict:
    """Median seconds over ``repeats`` calls after one warm-up, and the peak extra memory.

    On CPU the peak comes from one more call in :func:`heap_mode` ``own_peak``; the timed
    calls run with heap reuse. A call slower than 20 s is timed once: the ratio is what
    matters and the run stays short.
    """
    start = time.perf_counter()
    fn()
    if time.perf_counter() - start > 20:
        repeats = 1
    times, peaks = [], []
    if device.type == "cpu":
        heap_mode(own_peak=True)
        reset_peak_rss()
        base = peak_rss_mb("VmRSS")
        fn()
        peaks.append((peak_rss_mb() - base) * 2**20)
        heap_mode(own_peak=False)
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
        times.append(time.perf_counter() - start)
    return {"s": statistics.median(times), "peak_mb": max(peaks) / 2**20, "runs": times}


def density(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, chunk: int = 1024) -> float:
    """Visible pairs / causal pairs, counted exactly, ``chunk`` query rows at a time."""
    heads, length = q.shape[1], q.shape[2]
    mask_heads = pattern.mask_heads(heads)
    visible_fn = pattern.mask_fn(length, heads, q.device)
    kv = torch.arange(length, device=q.device)[None, None, :]
    h = torch.arange(mask_heads, device=q.device)[:, None, None]
    visible = 0
    for start in range(0, length, chunk):
        rows = torch.arange(start, min(start + chunk, length), device=q.device)[None, :, None]
        visible += int(visible_fn(rows, kv, h).sum()) * (heads // mask_heads)
    if pattern.data_dependent:  # plus the blocks each query selected
        visible += int(pattern.select(q, k, block_scores=scores(pattern, q, k)).sum()) * (
            pattern.block_size
        )
    return visible / (heads * length * (length + 1) / 2)


def estimate_gb(pattern: Pattern, length: int, heads: int, dim: int) -> float:
    """Rough peak of the blocks backend: gathered keys and values, mask, gradients.

    ``full()`` runs through SDPA's causal kernel: nothing of size L x L.
    """
    if pattern == full():
        return 0.0
    st = pattern.block_structure(length, length, 128, heads)
    keys = float(st.kv_counts.float().clamp_min(1).sum()) * 128 * 128  # pairs in tiles
    keys *= heads if st.num_heads == 1 else 1
    return keys * (4 + 2) / 2**30 + 6 * keys / 128 * dim * 4 / 2**30


def scores(pattern: Pattern, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """A learned pattern's block scores from an untrained gate (its cost is the same as a
    trained one's); None for patterns that score blocks themselves."""
    if not pattern.needs_selector:
        return None
    shape = BlockGate.shape_for(pattern, q.shape[-1], q.shape[1] // k.shape[1])
    return BlockGate(*shape).to(q.device)(q, k)


def build_times(length: int, heads: int, device: torch.device) -> list[dict]:
    """Block-structure and FlexAttention BlockMask build time per static pattern."""
    rows = []
    for name, pattern in PATTERNS.items():
        start = time.perf_counter()
        pattern.block_structure(length, length, 128, heads, device)
        structure_ms = (time.perf_counter() - start) * 1000
        flex.static_block_mask.cache_clear()
        flex._static_parts.cache_clear()
        start = time.perf_counter()
        flex.static_block_mask(pattern, length, length, 128, heads, device)
        rows.append(
            {
                "pattern": name,
                "length": length,
                "structure_ms": structure_ms,
                "blockmask_ms": (time.perf_counter() - start) * 1000,
            }
        )
    return rows


def run(args: argparse.Namespace) -> dict:
    """Measure everything asked for; return the JSON-ready record."""
    device = torch.device(args.device)
    h, d = args.heads, args.dim
    results: list[dict] = []
    gen = torch.Generator(device="cpu").manual_seed(0)

    def inputs(length: int, grad: bool) -> tuple[torch.Tensor, ...]:
        return tuple(
            torch.randn(1, h, length, d, generator=gen).to(device).requires_grad_(grad)
            for _ in range(3)
        )

    def fwd_bwd(attend: Callable[..., torch.Tensor], length: int) -> Callable[[], None]:
        q, k, v = inputs(length, True)
        return lambda: attend(q, k, v).sum().backward()

    def fwd(attend: Callable[..., torch.Tensor], length: int) -> Callable[[], None]:
        q, k, v = inputs(length, False)

        def call() -> None:
            with torch.no_grad():
                attend(q, k, v)

        return call

    header = {
        "benchmark": "attention",
        "command": "python " + " ".join(sys.argv),
        "config": {
            "batch": 1,
            "heads": h,
            "dim": d,
            "block_size": {"blocks": 128, "flex": flex.DEFAULT_BLOCK.get(device.type, 128)},
            "repeats": args.repeats,
        },
        "environment": environment(device),
    }
    for length in args.lengths:
        print(f"--- L={length}", file=sys.stderr, flush=True)
        dense = {
            "fwd": measure(fwd(causal_sdpa, length), args.repeats, device),
            "fwd_bwd": measure(fwd_bwd(causal_sdpa, length), args.repeats, device),
        }
        results.append({"name": "sdpa_causal", "length": length, "density": 1.0, **dense})
        mask_gb = length * length * (1 + 4 * 3) / 2**30
        row = {"name": "sdpa_dense_mask", "length": length, "density": None}
        if mask_gb > args.memory_budget_gb:
            row["skipped"] = f"needs about {mask_gb:.0f} GB for the L x L mask and its copies"
        else:
            mask = PATTERNS["sliding_window"].dense_mask(length, length, 1, device)[None]

            def masked(q, k, v, mask=mask):  # noqa: ANN001, ANN202
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

            row["fwd"] = measure(fwd(masked, length), args.repeats, device)
            row["fwd_bwd"] = measure(fwd_bwd(masked, length), args.repeats, device)
        results.append(row)
        for name in args.patterns:
            pattern = PATTERNS[name]
            q, k, _ = inputs(length, False)
            dens = density(pattern, q, k)
            for backend in args.backends:
                for term in args.terms:
                    row = {
                        "name": name if term == "plain" else f"{name}+{term}",
                        "pattern": str(pattern),
                        "backend": backend,
                        "terms": term,
                        "length": length,
                        "density": dens,
                    }
                    results.append(row)
                    skip = skipped(pattern, name, backend, term, length, args)
                    if skip:
                        row["skipped"] = skip
                        continue
                    extras = dict(TERMS[term])
                    if extras.pop("sinks", False):
                        extras["sinks"] = torch.zeros(h, device=device, requires_grad=True)

                    def attend(q, k, v, p=pattern, b=backend, x=extras):  # noqa: ANN001, ANN202
                        return sparse_attention(
                            q, k, v, p, backend=b, block_scores=scores(p, q, k), **x
                        )

                    start = time.perf_counter()
                    fwd(attend, length)()  # first call: builds tiles or compiles
                    row["first_call_s"] = time.perf_counter() - start
                    row["fwd"] = measure(fwd(attend, length), args.repeats, device)
                    if backend == "blocks" or device.type == "cuda":
                        row["fwd_bwd"] = measure(fwd_bwd(attend, length), args.repeats, device)
                    print(f"{row['name']:22s} {backend:6s} {row['fwd']['s']:.3f}s", file=sys.stderr)
        if args.partial is not None:  # what is measured so far survives a crash or a time limit
            write_json(args.partial, {**header, "results": results})
    add_ratios(results)
    return {**header, "results": results, "build": build_times(args.build_length, h, device)}


def skipped(
    pattern: Pattern, name: str, backend: str, term: str, length: int, args: argparse.Namespace
) -> str | None:
    """Why a (pattern, backend, term) cell is not measured, or None."""
    need = estimate_gb(pattern, length, args.heads, args.dim)
    if backend == "blocks" and need > args.memory_budget_gb:
        return f"needs about {need:.0f} GB (> --memory-budget-gb)"
    if backend == "flex" and name == "full" and length > 8192:
        return "full() through flex beyond 8k: slow, and SDPA is the baseline"
    if backend == "flex" and term == "sinks" and args.device == "cpu":
        return "flex applies sinks on CUDA only (no log-sum-exp from its CPU kernel)"
    return None


def add_ratios(results: list[dict]) -> None:
    """Speedup over causal SDPA at the same length, and efficiency = speedup x density."""
    for row in results:
        base = next(
            r for r in results if r["name"] == "sdpa_causal" and r["length"] == row["length"]
        )
        for mode in ("fwd", "fwd_bwd"):
            if mode in row:
                row[f"{mode}_speedup"] = base[mode]["s"] / row[mode]["s"]
                if row.get("density"):
                    row[f"{mode}_efficiency"] = row[f"{mode}_speedup"] * row["density"]


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The dense baseline."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def table(record: dict) -> str:
    """Markdown tables: attention times and ratios, then build times."""
    lines = [
        "| pattern | backend | L | density | fwd s | fwd speedup | fwd+bwd s | fwd+bwd speedup "
        "| efficiency (fwd+bwd) | peak MB (fwd+bwd) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["results"]:
        head = [r["name"], r.get("backend", "sdpa"), str(r["length"])]
        if "skipped" in r:
            lines.append("| " + " | ".join([*head, "", f"skipped: {r['skipped']}"]) + " |||||")
            continue
        dens = r.get("density")
        cells = [
            f"{dens:.3f}" if dens is not None else "1 (computes all)",
            f"{r['fwd']['s']:.3f}",
            f"{r['fwd_speedup']:.1f}x",
        ]
        fb = r.get("fwd_bwd")
        if fb:
            eff = r.get("fwd_bwd_efficiency")
            cells += [
                f"{fb['s']:.3f}",
                f"{r['fwd_bwd_speedup']:.1f}x",
                f"{eff:.0%}" if eff is not None else "",
                f"{fb['peak_mb']:.0f}",
            ]
        else:
            cells += ["n/a"] * 4
        lines.append("| " + " | ".join(head + cells) + " |")
    if not record.get("build"):
        return "\n".join(lines)
    lines += [
        "",
        "| pattern | L | block structure ms | FlexAttention BlockMask ms |",
        "|---|---:|---:|---:|",
    ]
    for b in record["build"]:
        lines.append(
            f"| {b['pattern']} | {b['length']} | {b['structure_ms']:.1f} "
            f"| {b['blockmask_ms']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--lengths",
        default="2048,4096,8192,16384,32768",
        type=comma_list(int),
    )
    parser.add_argument(
        "--patterns", default=",".join(PATTERNS), type=lambda s: [x for x in s.split(",") if x]
    )
    parser.add_argument("--backends", default="blocks,flex", type=lambda s: s.split(","))
    parser.add_argument(
        "--terms",
        default="plain",
        type=comma_list(str),
        help=f"softmax terms to measure each pattern with: {', '.join(TERMS)}",
    )
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--build-length", type=int, default=65536)
    parser.add_argument("--memory-budget-gb", type=float, default=8.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attention.json"))
    parser.add_argument("--partial", type=Path, help="also write results after each length here")
    parser.add_argument(
        "--tabulate", type=Path, help="only print the table of a --partial (or --out) file"
    )
    add_smoke_flag(parser)
    args = parser.parse_args()
    args = apply_smoke(parser, args, lengths=[256], repeats=1, build_length=512)
    if args.tabulate:
        record = json.loads(args.tabulate.read_text())
        add_ratios(record["results"])
        print(table(record))
        return
    unknown = [p for p in args.patterns if p not in PATTERNS]
    if unknown:
        parser.error(f"unknown pattern(s) {unknown}; choose from {', '.join(PATTERNS)}")
    unknown = [t for t in args.terms if t not in TERMS]
    if unknown:
        parser.error(f"unknown term(s) {unknown}; choose from {', '.join(TERMS)}")
    record = run(args)
    print(table(record))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, record)
    print(f"\nwrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
