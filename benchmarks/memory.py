"""Activation memory per token of one decoder layer, by attention pattern, and what it
means for fine-tuning a 7B model at 64k tokens.

    python benchmarks/memory.py                  # Llama-2-7B's layer, 4k and 8k tokens; ~6 min
    python benchmarks/memory.py --smoke --out /tmp/memory.json

One decoder layer of Llama-2-7B's shape (hidden 4096, 32 heads, 32 KV heads, MLP 11008),
random weights, float32 on CPU, runs a training forward at each length. Counted: the bytes
of every tensor autograd saves for the backward pass inside the layer (each storage once,
parameters excluded): what a layer holds between its forward and its backward, and what
gradient checkpointing recomputes one layer at a time. The per-token figure is the slope
between the two lengths (saved bytes are linear in the tokens for every arm here). Dense
attention is SDPA (its CPU kernel saves the output and log-sum-exp, O(L), as FlashAttention
does on GPUs); sparse arms use the ``blocks`` kernel, the CPU training path (FlexAttention,
the GPU path, has no CPU backward, so its figures are not measured here).

The estimate below the table (printed and written to the record) is arithmetic on those
figures for a 7B Llama (32 layers, vocabulary 32,000) in bfloat16 (half the float32 bytes
measured), AdamW with float32 master weights and moments, every layer checkpointed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

import torch
from smoke import add_smoke_flag, apply_smoke
from transformers import LlamaConfig, LlamaForCausalLM

import longswap
from longswap.config import comma_list
from longswap.environment import environment
from longswap.io import write_atomic, write_json

ARMS = {
    "dense (SDPA)": None,
    "sliding_window(1024, sinks=4)": "sliding_window(window=1024, sinks=4)",
    "block_topk(128, 8)": "block_topk(block_size=128, top_k=8)",
    "window 512 + learned_topk(64, 16)": (
        "sliding_window(window=512, sinks=4) | learned_topk(block_size=64, top_k=16)"
    ),
}
#: Llama-2-7B: parameters, layers, hidden size, vocabulary.
SEVEN_B = {"parameters": 6.74e9, "layers": 32, "hidden": 4096, "vocab": 32000}
GIB = 2**30


def saved_bytes(layer: torch.nn.Module, run: Any) -> int:
    """Bytes of the tensors autograd saves while ``layer`` runs its forward in ``run()``."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    storages: dict[int, int] = {}
    inside = contextlib.ExitStack()

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def enter(*_: Any) -> None:
        inside.enter_context(torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t))

    def leave(*_: Any) -> None:
        inside.close()

    hooks = [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return sum(storages.values())


def measure(config: LlamaConfig, pattern: str | None, length: int) -> int:
    """Saved bytes of the first decoder layer in a training forward over ``length`` tokens."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    if pattern is not None:
        longswap.swap_attention(model, pattern, backend="blocks", block_size=128)
    ids = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator())
    layer = model.model.layers[0]
    return saved_bytes(layer, lambda: model(ids, logits_to_keep=1))


def estimate(per_token: float, tokens: int, gpus: int) -> dict[str, float]:
    """GiB per GPU for a 7B model at ``tokens``, sequence split over ``gpus`` (Ulysses) and
    states sharded over them (ZeRO-3); ``per_token``: one layer's saved bytes per token in
    float32 (halved for bfloat16)."""
    p, layers, hidden, vocab = (SEVEN_B[k] for k in ("parameters", "layers", "hidden", "vocab"))
    local = tokens / gpus
    return {
        "full fine-tune states": 16 * p / gpus / GIB,  # bf16 weights + grads, fp32 Adam x3
        "LoRA states": 2 * p / gpus / GIB,  # frozen bf16 weights (adapters: negligible)
        "layer checkpoints": local * hidden * 2 * layers / GIB,
        "one layer recomputed": local * per_token / 2 / GIB,
        "logits and their gradient": local * vocab * 4 * 2 / GIB,
    }


def main() -> None:
    """Measure each arm at two lengths; print the table and the 7B estimate; write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="4096,8192", type=comma_list(int))
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--tokens", type=int, default=65536, help="the estimate's length")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/memory.json"))
    add_smoke_flag(parser)
    args = parser.parse_args()
    args = apply_smoke(parser, args, lengths=[2048, 3072], hidden=128, heads=2, intermediate=256)
    if len(args.lengths) != 2:
        parser.error("--lengths takes two lengths (the slope between them is per token)")
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=1,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.lengths),
    )
    rows = []
    for arm, pattern in ARMS.items():
        saved = [measure(config, pattern, n) for n in args.lengths]
        per_token = (saved[1] - saved[0]) / (args.lengths[1] - args.lengths[0])
        rows.append({"arm": arm, "pattern": pattern, "saved_bytes": saved, "per_token": per_token})
        print(f"{arm:34s} {per_token / 1024:8.1f} KiB/token/layer", file=sys.stderr)
    lines = [
        "| arm | saved per token, one layer (float32) | "
        + " | ".join(f"saved at {n}" for n in args.lengths)
        + " |",
        "|---|---:|" + "---:|" * len(args.lengths),
    ]
    lines += [
        f"| {r['arm']} | {r['per_token'] / 1024:.1f} KiB | "
        + " | ".join(f"{b / 2**20:.0f} MiB" for b in r["saved_bytes"])
        + " |"
        for r in rows
    ]
    estimates = {}
    for gpus in (1, 8):
        for r in rows:
            estimates[f"{r['arm']} on {gpus}"] = estimate(r["per_token"], args.tokens, gpus)
    parts = list(next(iter(estimates.values())))
    lines += ["", f"7B at {args.tokens} tokens, GiB per GPU (bfloat16, every layer checkpointed):"]
    lines += ["", "| arm, GPUs | " + " | ".join(parts) + " | total, full | total, LoRA |"]
    lines += ["|---|" + "---:|" * (len(parts) + 2)]
    for name, e in estimates.items():
        shared = sum(v for k, v in e.items() if "states" not in k)
        cells = " | ".join(f"{v:.1f}" for v in e.values())
        full, lora = shared + e["full fine-tune states"], shared + e["LoRA states"]
        lines.append(f"| {name} | {cells} | {full:.1f} | {lora:.1f} |")
    print("\n".join(lines))
    record = {
        "benchmark": "memory",
        "command": "python " + " ".join(sys.argv),
        "config": {k: getattr(args, k) for k in ("lengths", "hidden", "heads", "intermediate")},
        "environment": environment("cpu"),
        "results": rows,
        "estimate_7b": {"tokens": args.tokens, "model": SEVEN_B, "gib_per_gpu": estimates},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, record)
    write_atomic(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
