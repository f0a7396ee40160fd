"""Training throughput and memory: sparse attention against full attention, side by side.

    python benchmarks/finetune.py                       # L = 2k, 8k, 16k; about 10 minutes
    python benchmarks/finetune.py --lengths 4096 --repeats 5
    python benchmarks/finetune.py --smoke --out /tmp/finetune.json

The model is the embedded default's architecture (``longswap pretrain --size small``:
Llama, hidden 256, 4 layers, 8 heads, 4 key/value heads, byte vocabulary) with random
weights; throughput does not depend on the weights. Each arm runs full training steps
(forward, backward, AdamW update) on one sequence of L tokens: dense SDPA (what the
dense baseline fine-tunes with), and the same model swapped to ``sliding_window(512)``
and to ``block_topk(128, 4)`` with the ``blocks`` backend. Reported: median training
tokens/s over ``--repeats`` steps after a warm-up, and the peak resident memory growth.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from smoke import add_smoke_flag, apply_smoke
from transformers import LlamaForCausalLM

import longswap
from longswap.config import comma_list
from longswap.environment import environment, peak_rss_mb, reset_peak_rss
from longswap.io import write_json
from longswap.train.pretrain import model_config

ARMS = {
    "full (SDPA)": None,
    "sliding_window(512)": "sliding_window(window=512)",
    "block_topk(128, 4)": "block_topk(block_size=128, top_k=4)",
}


def step_time(model: torch.nn.Module, length: int, repeats: int) -> dict:
    """Median seconds of one training step on ``length`` tokens, and peak memory growth."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: tile plans, optimizer state
    times = []
    reset_peak_rss()
    base = peak_rss_mb("VmRSS")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "step_s": statistics.median(times),
        "runs": times,
        "peak_rss_growth_mb": max(peak_rss_mb() - base, 0.0),
    }


def main() -> None:
    """Measure each arm at each length; print a table; write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="2048,8192,16384", type=comma_list(int))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune.json"))
    add_smoke_flag(parser)
    args = parser.parse_args()
    args = apply_smoke(parser, args, lengths=[256], repeats=1, size="tiny")
    rows = []
    for length in args.lengths:
        for arm, pattern in ARMS.items():
            torch.manual_seed(0)
            model = LlamaForCausalLM(model_config(args.size, length, 257)).train()
            if pattern is not None:
                longswap.swap_attention(model, pattern, backend="blocks")
            result = step_time(model, length, args.repeats)
            row = {
                "arm": arm,
                "length": length,
                **result,
                "tokens_per_s": length / result["step_s"],
            }
            rows.append(row)
            print(f"{arm:22s} {length:6d} {row['tokens_per_s']:9.0f} tok/s", file=sys.stderr)
    for row in rows:
        dense = next(r for r in rows if r["length"] == row["length"] and r["arm"] == "full (SDPA)")
        row["speedup"] = row["tokens_per_s"] / dense["tokens_per_s"]
    lines = [
        "| arm | L | training tokens/s | vs full | step s | peak RSS growth MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['arm']} | {r['length']} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x "
        f"| {r['step_s']:.2f} | {r['peak_rss_growth_mb']:.0f} |"
        for r in rows
    ]
    print("\n".join(lines))
    record = {
        "benchmark": "finetune",
        "command": "python " + " ".join(sys.argv),
        "config": {"size": args.size, "repeats": args.repeats, "batch": 1},
        "environment": environment("cpu"),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, record)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
