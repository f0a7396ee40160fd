"""The ``speed`` task: prefill and per-step decoding speed, and the memory of the cache.

A swapped model on CPU first builds longswap's C++ kernels (a build takes about a minute,
once per machine); then one warm-up ``generate`` (same shapes by default: compilation and
allocation happen there), then one ``generate`` whose steps are time-stamped as their
logits arrive: prefill is the time to the first logits, decoding the median interval
between steps. A swapped model decodes with ``longswap.swap.sparse_cache`` (window layers
bounded, selection layers from block summaries); any other model with transformers' default
cache.
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Any

import torch
from transformers import LogitsProcessorList

from longswap.environment import peak_memory
from longswap.kernels.cpp import build_all
from longswap.swap import sparse_cache, swap_spec


def decode_speed(
    model: Any, length: int, steps: int = 16, warmup_prompt: int | None = None
) -> dict[str, Any]:
    """Prefill and decoding speed with the KV cache, the context ending at ``length``.

    ``warmup_prompt``: the warm-up's prompt length (None: the measured one; on CPU, where
    nothing compiles per shape, a short one saves a long prefill).
    """
    prompt = length - steps - 1  # with ``steps`` decode forwards the context ends at ``length``
    if prompt < 1:
        raise ValueError(f"speed needs a length above {steps + 1} tokens, got {length}")
    device = next(model.parameters()).device
    ids = torch.randint(0, 200, (1, prompt), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    swapped = swap_spec(model) is not None
    stamps: list[float] = []

    def stamp(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())
        return scores

    def run(tokens: torch.Tensor, new: int) -> Any:
        return model.generate(
            tokens,
            attention_mask=torch.ones_like(tokens),  # a token equal to the pad id is no padding
            use_cache=True,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([stamp]),
            return_dict_in_generate=True,
            **({"cache": sparse_cache(model)} if swapped else {}),
        )

    if swapped and device.type == "cpu":
        build_all()  # never inside a timed call
    with torch.no_grad():
        run(ids[:, :warmup_prompt] if warmup_prompt else ids, 2)  # warm-up
        stamps.clear()
        # Decode steps are timed on a reused heap, as in a running server; the cache's own
        # size is measured apart (cache_mb).
        with peak_memory(device, fresh_heap=False) as memory:
            start = time.perf_counter()
            out = run(ids, steps + 1)
    step = statistics.median(b - a for a, b in itertools.pairwise(stamps))
    return {
        "prefill_tokens": prompt,
        "prefill_seconds": stamps[0] - start,
        "prefill_tokens_per_s": prompt / (stamps[0] - start),
        "decode_steps": len(stamps) - 1,
        "decode_step_ms": step * 1e3,
        "decode_tokens_per_s": 1 / step,
        "cache_mb": cache_bytes(out.cache) / 2**20,
        "peak_memory_mb": memory["peak_memory_mb"],
    }


def cache_bytes(cache: Any) -> int:
    """Bytes of memory a cache holds: every tensor its layers keep (keys, values, block
    summaries, buffers), each storage counted once and whole (a view of a buffer counts
    the buffer, spare capacity included)."""
    seen: dict[int, int] = {}
    for holder in [cache, *getattr(cache, "layers", [])]:
        for value in vars(holder).values():
            items = value.values() if isinstance(value, dict) else value
            for item in items if isinstance(items, list | tuple) else [items]:
                if isinstance(item, torch.Tensor):
                    storage = item.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
