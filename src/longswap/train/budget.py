"""Before training: the memory and time of a step, measured on the run's own model.

Two probe steps (forward and backward through the trainer's own loss, no optimizer step)
on one sequence of ``L/2`` and of ``L`` tokens (``L = min(seq_len, 1024)``) measure the
memory and seconds per sequence. A step of ``batch_size x seq_len`` is extrapolated from
them: memory linearly in the tokens, plus the optimizer's two moments per trainable
parameter; time linearly in the tokens when every layer is swapped to a sparse pattern
(its keys per query are bounded), and as ``a L + b L^2`` per sequence when some layer
attends densely, so that dense attention's quadratic cost shows. A run whose estimate
exceeds the memory available is refused before its first step (``--skip-budget-check``
trains without the probes). Memory is measured as growth above what the process holds
before a probe: the model's weights count once, in what the device has left.

The extrapolation is an estimate: short probes miss what only long sequences allocate, and
a machine's other load moves the time. The README compares it with measured runs.

Before any model is built, :func:`config_step_gb` estimates a full fine-tuning step from a
model's config alone (its parameters and the activations its layers keep per token), and
:func:`config_forward_gb` a forward without gradients (an evaluation): what ``longswap demo``
plans its lengths with.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from longswap.environment import peak_memory
from longswap.patterns import full
from longswap.swap import swap_spec

#: The longest probe sequence (the other is half of it).
PROBE_TOKENS = 1024


@dataclass(frozen=True)
class Budget:
    """A step's estimated memory (above what the process holds before training) and time,
    and the memory the device has available."""

    tokens: int  # per sequence
    batch_size: int
    steps: int
    fixed_gb: float  # whatever the batch: gradients, AdamW's moments, buffers
    per_sequence_gb: float
    available_gb: float | None
    step_seconds: float
    probes: tuple[tuple[int, float, float], ...]  # (tokens, seconds, MB) per probe

    @property
    def peak_gb(self) -> float:
        """The estimated peak of one step."""
        return self.fixed_gb + self.per_sequence_gb * self.batch_size

    def fitting_batch(self) -> int:
        """The largest batch size whose estimate fits the available memory (0: none)."""
        if self.available_gb is None or self.per_sequence_gb <= 0:
            return self.batch_size
        return max(int((self.available_gb - self.fixed_gb) // self.per_sequence_gb), 0)

    def summary(self) -> str:
        """One line for the console."""
        available = f" of {self.available_gb:.1f} GB available" if self.available_gb else ""
        probes = ", ".join(f"{n} tokens {s:.2f} s {m:.0f} MB" for n, s, m in self.probes)
        return (
            f"budget: about {self.peak_gb:.2f} GB for a step of {self.batch_size} x "
            f"{self.tokens} tokens{available}; about {self.step_seconds:.1f} s a step, "
            f"{_duration(self.step_seconds * self.steps)} for {self.steps} steps (estimated "
            f"from probe steps of one sequence: {probes})"
        )

    def problem(self) -> str | None:
        """Why the run cannot fit in memory, or None."""
        if self.available_gb is None or self.peak_gb <= self.available_gb:
            return None
        fits = self.fitting_batch()
        advice = f"--batch-size {fits} fits" if fits else "even --batch-size 1 does not fit"
        return (
            f"a training step of --batch-size {self.batch_size} x --seq-len {self.tokens} "
            f"needs about {self.peak_gb:.1f} GB, but {self.available_gb:.1f} GB are available "
            f"({advice}; --gradient-checkpointing, a shorter --seq-len or a sparser pattern "
            "need less; --skip-budget-check trains anyway). Estimated from probe steps of one "
            "sequence: " + ", ".join(f"{n} tokens {m:.0f} MB" for n, _, m in self.probes)
        )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def available_gb(device: torch.device) -> float | None:
    """Memory the device can still give: free CUDA memory, or ``MemAvailable`` on Linux."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**30
    return _meminfo_gb("MemAvailable")


def machine_gb(device: torch.device) -> float | None:
    """All the memory of the device: the CUDA device's, or ``MemTotal`` on Linux."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1] / 2**30
    return _meminfo_gb("MemTotal")


def _meminfo_gb(field: str) -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 2**20
    return None


#: Bytes a full fine-tuning holds per parameter: float32 weights, gradients, AdamW's moments.
TRAINED_BYTES_PER_PARAMETER = 16
#: What a training step holds per token over the float32 activations that
#: :func:`_kept_per_token` counts: the allocator's slack and a sparse attention's gathered
#: key blocks. Measured as the peak of the demo's fine-tuning processes at 4,096 tokens
#: (CPU, 2026-12): on SmolLM2-135M, 11.1 GB dense, 11.9 GB window 512 | block_topk(64, 16)
#: and 14.4 GB with learned selection (this estimate: 15.2 GB).
STEP_ALLOWANCE = 1.4
#: What a training process holds whatever its model: Python, torch, transformers, the data.
RUNTIME_GB = 0.6


def _kept_per_token(config: Any) -> float:
    """Bytes of float32 activations a training step keeps per token for the backward: per
    layer its norms' inputs and outputs, projections and MLP products (about 12 x hidden +
    4 x intermediate), and four copies of the logits (the loss's and their gradients)."""
    text = config.get_text_config()
    hidden = text.hidden_size
    inner = getattr(text, "intermediate_size", None) or 4 * hidden
    return 4.0 * (text.num_hidden_layers * (12 * hidden + 4 * inner) + 4 * text.vocab_size)


def _parameters(config: Any) -> int:
    with torch.device("meta"):  # no memory, no initialisation
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def config_step_gb(config: Any, seq_len: int) -> float:
    """The peak of a process fine-tuning a model (all its parameters) on one ``seq_len``-token
    sequence, estimated from the model's ``config`` alone, in GB: the runtime, weights,
    gradients and optimizer moments, and the activations kept for the backward (dense or
    sparse attention: the larger of the two)."""
    kept = _kept_per_token(config) * STEP_ALLOWANCE * seq_len
    return RUNTIME_GB + (TRAINED_BYTES_PER_PARAMETER * _parameters(config) + kept) / 2**30


def config_forward_gb(config: Any, seq_len: int) -> float:
    """The peak of a process running a forward without gradients over ``seq_len`` tokens (an
    evaluation), estimated from a model's ``config``, in GB: the runtime, float32 weights,
    the KV cache, one layer's activations and the logits of every token."""
    text = config.get_text_config()
    hidden = text.hidden_size
    inner = getattr(text, "intermediate_size", None) or 4 * hidden
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    per_token = 4.0 * (text.num_hidden_layers * 2 * kv + 4 * hidden + 3 * inner + text.vocab_size)
    return RUNTIME_GB + (4 * _parameters(config) + per_token * seq_len) / 2**30


def _probe(trainer: Any, model: Any, tokens: int, device: torch.device) -> tuple[float, float]:
    """Seconds and peak memory (MB) of one forward and backward over ``tokens`` tokens."""
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    with peak_memory(device) as memory:
        began = time.perf_counter()
        loss = trainer.compute_loss(model, {"input_ids": ids, "labels": ids})
        loss.backward()
        seconds = time.perf_counter() - began
    model.zero_grad(set_to_none=True)
    return seconds, memory["peak_memory_mb"]


def estimate(trainer: Any, seq_len: int, batch_size: int, steps: int, dense: bool = True) -> Budget:
    """Probe ``trainer``'s model (in training mode, its trainable parameters as configured)
    and extrapolate a step of ``batch_size`` sequences of ``seq_len`` tokens; ``dense``:
    some layer attends densely (time then grows with the square of the length)."""
    model = trainer.model
    device = next(model.parameters()).device
    long = min(seq_len, PROBE_TOKENS)
    lengths = (max(long // 2, 1), long)
    was_training = model.training
    model.train()
    try:
        _probe(trainer, model, lengths[0], device)  # first calls allocate and load kernels
        probes = tuple((n, *_probe(trainer, model, n, device)) for n in lengths)
    finally:
        model.train(was_training)
    (l1, t1, m1), (l2, t2, m2) = probes
    # Time per sequence a L + b L^2 through both probes (b >= 0: never faster than linear).
    b = max((t2 / l2 - t1 / l1) / (l2 - l1), 0.0) if dense and l2 > l1 else 0.0
    a = t2 / l2 - b * l2
    # Memory: per token from the probes' difference; the rest does not grow with the batch.
    per_token = max(m2 - m1, 0.0) / (l2 - l1) if l2 > l1 else m2 / l2
    moments = sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return Budget(
        tokens=seq_len,
        batch_size=batch_size,
        steps=steps,
        fixed_gb=(max(m2 - per_token * l2, 0.0) + moments / 2**20) / 1024,
        per_sequence_gb=per_token * seq_len / 1024,
        available_gb=available_gb(device),
        step_seconds=max(batch_size * (a * seq_len + b * seq_len**2), 0.0),
        probes=probes,
    )


def check_budget(trainer: Any, seq_len: int, batch_size: int, steps: int) -> Budget:
    """:func:`estimate`, printed; raises ValueError when the step cannot fit in memory."""
    spec = swap_spec(trainer.model)
    dense = spec is None or any(spec.pattern(i) == full() for i in range(len(spec.layers)))
    budget = estimate(trainer, seq_len, batch_size, steps, dense)
    print(budget.summary(), flush=True)
    problem = budget.problem()
    if problem:
        raise ValueError(problem)
    return budget
