"""Training spread over processes, through engines that exist: the Trainer's data
parallelism, FSDP2 (accelerate) and DeepSpeed (ZeRO sharding and Ulysses sequence
parallelism). longswap adds no communication of its own; this module turns a run's fields
into those engines' settings and says afterwards what ran.

Sequence parallelism (DeepSpeed Ulysses, as accelerate and transformers integrate it):
each process holds ``seq_len / N`` tokens of every sequence; around each attention call
DeepSpeed exchanges them so that a process attends over the whole sequence with ``1 / N``
of the heads. The attention mask is dropped on the way, so the swapped attention rebuilds
positions and documents from ``position_ids`` (every training batch carries them), and a
pattern that differs between heads is told which heads a process holds
(``swap.shard_heads``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import torch

#: ``--deepspeed`` choices that name a ZeRO stage (the alternative: a JSON config file).
ZERO_STAGES = {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3}


def deepspeed_problems(choice: str, sequence_parallel: Any) -> list[str]:
    """What is wrong with ``--deepspeed`` and ``--sequence-parallel``, told before any work."""
    found = []
    if not isinstance(sequence_parallel, int) or sequence_parallel < 1:
        return [f"sequence_parallel must be an integer >= 1, got {sequence_parallel!r}"]
    if not choice and sequence_parallel == 1:
        return []
    if choice and choice not in ZERO_STAGES and not Path(choice).is_file():
        found.append(
            f"--deepspeed {choice!r} is neither a ZeRO stage ({', '.join(ZERO_STAGES)}) nor "
            "a DeepSpeed JSON config file"
        )
    elif isinstance(stage := zero_stage(choice, sequence_parallel), str):
        found.append(f"--deepspeed {choice}: the config file is {stage}")
    elif sequence_parallel > 1 and stage != 3:
        found.append(
            f"--sequence-parallel runs on ZeRO stage 3 only (this run: stage {stage}): under "
            "stages 0 to 2, DeepSpeed sums the gradients of a sequence's shards where stage 3 "
            "averages them, so they come out --sequence-parallel times too large; pass "
            "--deepspeed zero3, or leave it out"
        )
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        found.append(
            "--deepspeed and --sequence-parallel run on DeepSpeed, which is not installed: "
            "pip install deepspeed (after torch, so that it keeps the torch you have)"
        )
    if "WORLD_SIZE" in os.environ and "RANK" not in os.environ:
        found.append(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but RANK is not, so no launcher "
            "started these processes; launch with torchrun --nproc_per_node N (it sets both), "
            "or unset WORLD_SIZE"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if sequence_parallel > 1 and world % sequence_parallel:
        found.append(
            f"--sequence-parallel {sequence_parallel} must divide the number of processes "
            f"({world}); launch with torchrun --nproc_per_node {sequence_parallel} (or a "
            "multiple of it)"
        )
    return found


def zero_stage(choice: str, sequence_parallel: int) -> int | str | None:
    """The ZeRO stage a run asks for (``--deepspeed``; left out: 3 with sequence
    parallelism, None without), or why its config file cannot be read."""
    if not choice:
        return 3 if isinstance(sequence_parallel, int) and sequence_parallel > 1 else None
    if choice in ZERO_STAGES:
        return ZERO_STAGES[choice]
    try:
        settings = json.loads(Path(choice).read_text())
    except (OSError, ValueError) as err:
        return f"unreadable ({err})"
    zero = settings.get("zero_optimization", {}) if isinstance(settings, dict) else None
    if not isinstance(zero, dict):
        return (
            "not a DeepSpeed config: DeepSpeed reads a JSON object whose zero_optimization is "
            'an object, such as {"zero_optimization": {"stage": 3}}'
        )
    stage = zero.get("stage", 0)
    if stage not in ZERO_STAGES.values():
        return f"asking for ZeRO stage {stage!r}; DeepSpeed has stages 0, 1, 2 and 3"
    return stage


def heads_problems(config: Any, sequence_parallel: int, learned: bool) -> list[str]:
    """What keeps a model (its text ``config``) from splitting its heads ``sequence_parallel``
    ways: Ulysses gives each process an equal share of the query heads and of the KV heads
    (KV heads are copied when there are fewer than processes), and a learned selector scores
    whole KV groups, so it needs the KV heads themselves to split evenly."""
    if sequence_parallel == 1:
        return []
    hq = config.num_attention_heads
    hkv = getattr(config, "num_key_value_heads", None) or hq  # GPT-2: one KV head per head
    found = []
    if hq % sequence_parallel or (hkv % sequence_parallel and sequence_parallel % hkv):
        found.append(
            f"--sequence-parallel {sequence_parallel}: the model's {hq} query and {hkv} KV "
            "heads do not split evenly over that many processes; pick a number that divides "
            "the query heads and divides, or is a multiple of, the KV heads"
        )
    elif learned and hkv % sequence_parallel:
        found.append(
            f"--sequence-parallel {sequence_parallel}: a learned selector scores whole groups of "
            f"query heads per KV head, and the model's {hkv} KV heads do not split over that "
            "many processes; pick a number that divides them"
        )
    return found


def deepspeed_arguments(choice: str, sequence_parallel: int, attention: str) -> dict[str, Any]:
    """TrainingArguments fields that run the Trainer on DeepSpeed (``choice``: a ZeRO stage
    or a JSON file; empty with ``sequence_parallel > 1``: ZeRO stage 3) with Ulysses over
    ``sequence_parallel`` processes around the model's ``attention`` (its registered name).
    Starts DeepSpeed's communication first (gloo on CPU, where accelerate does not)."""
    if choice in ZERO_STAGES or not choice:
        stage = ZERO_STAGES.get(choice, 3)
        settings: dict[str, Any] = {
            "zero_optimization": {"stage": stage}
            | ({"stage3_gather_16bit_weights_on_model_save": True} if stage == 3 else {}),
            # The Trainer's own AdamW and schedule, as without DeepSpeed: the same run.
            "zero_allow_untested_optimizer": True,
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
        }
    else:
        settings = json.loads(Path(choice).read_text())
    _start_deepspeed()
    fields: dict[str, Any] = {"deepspeed": settings}
    if sequence_parallel > 1:
        from accelerate.parallelism_config import ParallelismConfig
        from accelerate.utils import DeepSpeedSequenceParallelConfig

        handler = DeepSpeedSequenceParallelConfig(sp_attn_implementation="sdpa")
        # accelerate 1.16 accepts only flash and sdpa names here, while DeepSpeed wraps any
        # registered attention (and checks that it is the model's): name it after the check.
        handler.sp_attn_implementation = attention
        fields["parallelism_config"] = ParallelismConfig(
            sp_backend="deepspeed", sp_size=sequence_parallel, sp_handler=handler
        )
    return fields


def _start_deepspeed() -> None:
    """DeepSpeed's process group: over torch's if a launcher started one, else one of its
    own (one process without a launcher gets the variables a launcher would set)."""
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": str(port)}
        os.environ.update({"MASTER_ADDR": "127.0.0.1", **defaults})
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def main_process() -> bool:
    """Whether this process writes the run's files: rank 0 of a launch (``RANK``, which
    torchrun, accelerate and DeepSpeed set before the process group exists), or the only
    process."""
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_everyone() -> None:
    """Wait until every process of a distributed run gets here (nothing without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def head_share(sequence_parallel: int) -> tuple[int, int]:
    """``(rank, size)``: which share of the heads this process holds under Ulysses (its
    sequence-parallel groups are consecutive ranks)."""
    return int(os.environ.get("RANK", "0")) % sequence_parallel, sequence_parallel


def gathered(model: torch.nn.Module) -> contextlib.AbstractContextManager[Any]:
    """A context in which a ZeRO-3 model's partitioned parameters are whole on every
    process (to save it); nothing for any other model."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def parallelism(trainer: Any) -> dict[str, Any]:
    """How the run is spread over processes: accelerate's engine (``NO``, ``MULTI_CPU`` or
    ``MULTI_GPU`` for data parallelism, ``FSDP``, ``DEEPSPEED``), the number of processes,
    the FSDP version or ZeRO stage, the sequence-parallel size, and a note when an FSDP
    configuration was given but is not in force (accelerate runs FSDP on accelerators
    only; on CPU the same launch is data-parallel)."""
    state = trainer.accelerator.state
    plugin = getattr(state, "fsdp_plugin", None)
    speed = getattr(state, "deepspeed_plugin", None)
    config = getattr(trainer.accelerator, "parallelism_config", None)
    found: dict[str, Any] = {
        "engine": str(state.distributed_type.value),
        "processes": state.num_processes,
        "fsdp_version": getattr(plugin, "fsdp_version", None),
        "zero_stage": getattr(speed, "zero_stage", None),
        "sequence_parallel": getattr(config, "sp_size", None) or 1,
    }
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and found["engine"] != "FSDP":
        found["note"] = (
            f"an FSDP configuration was given, but accelerate runs FSDP on GPUs (and other "
            f"accelerators) only: this run is {found['engine']} (data parallel), each process "
            "holding the whole model"
        )
    return found


def whole_size(parameter: torch.nn.Parameter) -> int:
    """The number of values in ``parameter``, whole even when ZeRO-3 holds a shard of it."""
    return getattr(parameter, "ds_numel", None) or parameter.numel()


def sharded(model: Any) -> int:
    """How many of ``model``'s parameters are sharded across processes (FSDP's DTensors,
    ZeRO-3's partitioned parameters)."""
    return sum(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in model.parameters())
