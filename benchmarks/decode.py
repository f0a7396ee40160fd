"""Decoding speed and KV-cache memory against generated length: dense vs a window swap.

    python benchmarks/decode.py                      # Llama-shaped model, 4 layers, 8 heads
    python benchmarks/decode.py --lengths 512,2048,8192 --window 256 --sinks 4
    python benchmarks/decode.py --smoke --out /tmp/decode.json

The same randomly initialised model (built locally; speed does not depend on the weights)
generates greedily three ways: dense attention with the default cache; swapped to
``sliding_window(window, sinks)`` with the default cache; and swapped with
``longswap.swap.sparse_cache``. For each generated length it reports the decoding rate
over the last quarter of the tokens (tokens/s), the KV-cache size after generation
(bytes held by the cache tensors, exact), and the process's peak resident memory growth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from smoke import add_smoke_flag, apply_smoke
from transformers import AutoModelForCausalLM, LlamaConfig

import longswap
from longswap.config import comma_list
from longswap.environment import environment, peak_rss_mb, reset_peak_rss
from longswap.patterns import sliding_window


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """A Llama-shaped model with random weights."""
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.lengths) + 64,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def cache_bytes(cache: object) -> int:
    """Bytes held by the key and value tensors of a cache."""
    return sum(
        layer.keys.numel() * layer.keys.element_size() * 2
        for layer in cache.layers
        if getattr(layer, "keys", None) is not None
    )


def decode(model: torch.nn.Module, length: int, cache: object | None) -> dict:
    """Generate ``length`` tokens one by one; time the last quarter."""
    from transformers import DynamicCache

    cache = cache if cache is not None else DynamicCache(config=model.config)
    ids = torch.randint(1, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    reset_peak_rss()
    base = peak_rss_mb("VmRSS")
    stamps = []
    with torch.no_grad():
        out = model(ids, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(length):
            out = model(token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            stamps.append(time.perf_counter())
    tail = stamps[-(length // 4) :]
    return {
        "tokens_per_s": (len(tail) - 1) / (tail[-1] - tail[0]),
        "cache_mb": cache_bytes(cache) / 2**20,
        "peak_rss_growth_mb": max(peak_rss_mb() - base, 0.0),
    }


def main() -> None:
    """Run the three arms for each length, print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="512,2048,8192", type=comma_list(int))
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode.json"))
    add_smoke_flag(parser)
    args = parser.parse_args()
    args = apply_smoke(
        parser, args, lengths=[48], window=16, sinks=2, hidden=64, layers=2, heads=4, repeats=1
    )
    pattern = sliding_window(args.window, sinks=args.sinks)
    dense = build_model(args)
    swapped = build_model(args)
    longswap.swap_attention(swapped, pattern)
    arms = {
        "dense": (dense, lambda: None),
        "window": (swapped, lambda: None),
        "window+bounded cache": (swapped, lambda: longswap.swap.sparse_cache(swapped)),
    }
    rows = []
    for length in args.lengths:
        for name, (model, make_cache) in arms.items():
            runs = [decode(model, length, make_cache()) for _ in range(args.repeats)]
            row = {
                "arm": name,
                "generated": length,
                "pattern": str(pattern) if name != "dense" else "full (dense SDPA)",
            }
            for key in runs[0]:
                row[key] = statistics.median(r[key] for r in runs)
            rows.append(row)
            print(
                f"{name:22s} {length:6d} {row['tokens_per_s']:8.1f} tok/s "
                f"cache {row['cache_mb']:7.2f} MB",
                file=sys.stderr,
            )
    lines = [
        "| arm | generated tokens | tokens/s (last quarter) | KV cache MB | peak RSS growth MB |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['arm']} | {r['generated']} | {r['tokens_per_s']:.1f} | {r['cache_mb']:.2f} "
        f"| {r['peak_rss_growth_mb']:.0f} |"
        for r in rows
    ]
    print("\n".join(lines))
    record = {
        "benchmark": "decode",
        "command": "python " + " ".join(sys.argv),
        "config": vars(args) | {"out": str(args.out)},
        "environment": environment("cpu"),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
