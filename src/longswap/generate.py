"""Generating text with a converted model, streamed, through its sparse cache.

A swapped model decodes through :func:`longswap.swap.sparse_cache` (window layers keep a
bounded cache, selection layers score block summaries); any other model through
transformers' dynamic cache. transformers' ``generate`` cannot pick the sparse cache by
itself, so :func:`generate` passes it as ``model.generate(..., cache=...)``.

Speeds: a short warm-up generation first (compilation, kernel builds, allocation), on a
part of the prompt long enough for the sparse path the prompt takes (a pattern attends
densely over short contexts, where no kernel is needed), then prefill is the time to the
first new token and decoding the median interval between new tokens, as in the ``speed``
task of ``longswap eval``.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase, set_seed
from transformers.generation.streamers import BaseStreamer

from longswap.checkpoint import model_problem
from longswap.data.tokenizer import tokenizer_for
from longswap.environment import bfloat16_warning
from longswap.evaluate.speed import cache_bytes
from longswap.patterns import Pattern
from longswap.swap import load, swap_spec
from longswap.swap.cache import sparse_cache

#: Prompt tokens of the warm-up generation (enough for a few key blocks), unless the prompt
#: reaches past where a layer's pattern attends densely (see :func:`warmup_tokens`).
WARMUP_TOKENS = 256
#: The longest context searched for the end of a pattern's dense stretch.
_SEARCHED = 1 << 24


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen, and how many are generated."""

    max_new_tokens: int = 256
    #: 0 decodes greedily (the most likely token every step).
    temperature: float = 0.8
    #: Nucleus sampling: the smallest set of tokens holding this much probability (1: all).
    top_p: float = 0.95
    #: Sample among this many most likely tokens (0: no limit).
    top_k: int = 50
    seed: int = 0

    def problems(self) -> list[str]:
        """What is wrong with these settings, one line each."""
        found = []
        if self.max_new_tokens < 1:
            found.append(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:
            found.append(
                f"--temperature must be 0 (greedy) or a positive number, got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            found.append(f"--top-p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            found.append(f"--top-k must be 0 (no limit) or more, got {self.top_k}")
        if not 0 <= self.seed < 2**32:
            found.append(f"--seed must lie in [0, 2**32) (numpy's seeds), got {self.seed}")
        return found

    def options(self) -> dict[str, Any]:
        """The matching ``model.generate`` arguments."""
        if self.temperature == 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {
            "do_sample": True,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
        }


@dataclass
class Generation:
    """What one generation produced and how fast."""

    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    #: Median time between two new tokens (0 with a single new token).
    decode_step_seconds: float
    #: "sparse" (longswap's cache for a swapped model) or "dynamic" (transformers' default).
    cache: str
    cache_mb: float

    def summary(self) -> str:
        """One line for the terminal: prefill and decoding speeds, the cache's size."""
        prefill = self.prompt_tokens / self.prefill_seconds
        decode = f"{1 / self.decode_step_seconds:,.1f}" if self.decode_step_seconds else "-"
        return (
            f"prefill {self.prompt_tokens:,} tokens: {prefill:,.1f} tokens/s; "
            f"decode {self.new_tokens:,} tokens: {decode} tokens/s; "
            f"KV cache ({self.cache}): {self.cache_mb:,.2f} MiB"
        )


def read_prompt(model: Path, prompt_file: Path | None, sampling: Sampling) -> str:
    """The prompt, from ``prompt_file`` or standard input, once every input is checked
    (nothing is loaded); one ValueError lists every problem."""
    found = [problem] if (problem := model_problem(model)) else []
    found += sampling.problems()
    prompt = None
    if prompt_file is not None and not prompt_file.is_file():
        found.append(f"--prompt-file {prompt_file} does not exist or is not a file")
    elif prompt_file is not None:
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            found.append(f"--prompt-file {prompt_file} is not UTF-8 text ({err.reason})")
    elif not found:  # standard input is read only when nothing else is wrong
        prompt = _stdin_prompt(sys.stdin)
    if prompt is not None and not prompt.strip():
        where = f"--prompt-file {prompt_file}" if prompt_file else "standard input"
        found.append(f"the prompt is empty ({where} holds no text)")
    if found:
        raise ValueError("cannot generate:\n- " + "\n- ".join(found))
    return prompt or ""


def _stdin_prompt(stdin: TextIO) -> str:
    if stdin.isatty():
        print("(reading the prompt from standard input; end it with Ctrl-D)", file=sys.stderr)
    return stdin.read()


def load_for_generation(
    path: Path, device: str = "auto", dtype: str = "auto", base: Path | None = None
) -> tuple[Any, PreTrainedTokenizerBase]:
    """A model (folder, LoRA output or .gguf file; ``base``: a LoRA output's moved base)
    ready to generate on ``device``, and its tokenizer. ``auto``: CUDA when there is one;
    float32 on CPU, bfloat16 on GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        msg = f"--device {device!r} is not a device: give cpu, cuda, cuda:N or auto"
        raise ValueError(msg) from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch finds no CUDA device here; use cpu or auto")
    if dtype == "auto":
        dtype = "float32" if kind == "cpu" else "bfloat16"
    if warning := bfloat16_warning(dtype, device):
        print(f"warning: {warning}", file=sys.stderr)
    model = load(path, base=base, dtype=getattr(torch, dtype)).to(device).eval()
    return model, tokenizer_for(path)


class _Stream(BaseStreamer):
    """Writes the new text as its tokens arrive and time-stamps each new token.

    A token that ends inside a character (a byte-level tokenizer's multi-byte UTF-8) is
    held back until the character is complete.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, write: Callable[[str], None]) -> None:
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.stamps: list[float] = []
        self.shown = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        """Take the prompt (the first call) or one new token."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids += value.flatten().tolist()
        self.stamps.append(time.perf_counter())
        self._show(final=False)

    def end(self) -> None:
        """Write whatever is still held back."""
        self._show(final=True)

    def _show(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return
        self.write(text[self.shown :])
        self.shown = len(text)

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def warmup_tokens(model: Any, prompt_tokens: int) -> int:
    """Prompt tokens of the warm-up generation before a ``prompt_tokens``-token prompt: the
    first length at which some layer's pattern skips keys (its sparse kernels are built
    and warmed there) when the prompt goes that far, else :data:`WARMUP_TOKENS` at most."""
    spec = swap_spec(model)
    patterns = {spec.pattern(i) for i in range(len(spec.layers))} if spec else set()
    sparse_from = [n for p in patterns if (n := _first_sparse_length(p)) is not None]
    needed = [n for n in sparse_from if n <= prompt_tokens]
    return min(prompt_tokens, max([WARMUP_TOKENS, *needed]))


def _first_sparse_length(pattern: Pattern) -> int | None:
    """The shortest context in which ``pattern`` hides some causal pair (None: it attends
    densely at every length searched), by bisection (a pattern covers a prefix of lengths)."""
    if pattern.covers(_SEARCHED):
        return None
    low, high = 0, _SEARCHED  # covers(low) or low == 0; not covers(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if pattern.covers(middle) else (low, middle)
    return high


def generate(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    sampling: Sampling,
    write: Callable[[str], None] = lambda text: None,
) -> Generation:
    """Continue ``prompt``, passing each new piece of text to ``write`` as it is decoded.

    Stops after ``sampling.max_new_tokens`` or at an end-of-text token (the tokenizer's or
    the model's).
    """
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    if ids.shape[1] == 0:
        raise ValueError("the prompt has no tokens")
    swapped = swap_spec(model) is not None
    stops = [t for t in _stop_tokens(model, tokenizer) if t is not None]

    def run(tokens: torch.Tensor, options: dict[str, Any], streamer: Any = None) -> Any:
        cache = sparse_cache(model) if swapped else DynamicCache(config=model.config)
        model.generate(
            input_ids=tokens,
            attention_mask=torch.ones_like(tokens),
            cache=cache,
            use_cache=True,
            eos_token_id=stops or None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            streamer=streamer,
            **options,
        )
        return cache

    stream = _Stream(tokenizer, write)
    with torch.no_grad():
        warm = warmup_tokens(model, ids.shape[1])
        run(ids[:, :warm], {"do_sample": False, "max_new_tokens": 2})
        set_seed(sampling.seed)
        start = time.perf_counter()
        cache = run(ids, sampling.options(), stream)
    steps = [b - a for a, b in pairwise(stream.stamps)]
    return Generation(
        text=stream.text,
        prompt_tokens=ids.shape[1],
        new_tokens=len(stream.ids),
        prefill_seconds=stream.stamps[0] - start,
        decode_step_seconds=statistics.median(steps) if steps else 0.0,
        cache="sparse" if swapped else "dynamic",
        cache_mb=cache_bytes(cache) / 2**20,
    )


def _stop_tokens(model: Any, tokenizer: PreTrainedTokenizerBase) -> list[int | None]:
    """End-of-text ids: the tokenizer's and those of the model's generation config."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys([tokenizer.eos_token_id, *configured]))
