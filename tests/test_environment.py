"""The peak-memory measurement the benchmarks and evaluations report."""

import sys

import pytest
import torch

from longswap import environment as environment_module
from longswap.environment import bfloat16_warning, environment, peak_memory


def blocks_of_16_mb(count: int) -> list[torch.Tensor]:
    """``count`` 16 MB tensors (below glibc's largest mmap threshold: once it has adapted,
    they come from its heap), written to."""
    return [torch.ones(4 * 2**20) for _ in range(count)]


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_peak_memory_is_not_hidden_by_memory_an_earlier_call_freed():
    """Memory an earlier call freed can stay in glibc's heap; the measured call's own
    allocations still count (the real-model study once read 0 MB here)."""
    for _ in range(3):  # let glibc raise its thresholds
        blocks_of_16_mb(4)
    earlier = blocks_of_16_mb(20)
    kept = earlier.pop()  # the last block pins the heap's top: the rest is not trimmed
    del earlier
    with peak_memory() as memory:
        now = blocks_of_16_mb(19)
    assert len(now) == 19 and kept.shape == now[0].shape
    assert memory["peak_memory_mb"] > 250


def test_bfloat16_on_a_cpu_without_it_is_warned_about(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(environment_module, "cpu_runs_bfloat16", lambda: False)
    hint = bfloat16_warning(torch.bfloat16)
    assert hint is not None and "--dtype float32" in hint
    assert bfloat16_warning("float32") is None
    assert bfloat16_warning("bfloat16", "cuda") is None
    for answer in (True, None):  # native, or a build that cannot tell
        monkeypatch.setattr(environment_module, "cpu_runs_bfloat16", lambda a=answer: a)
        assert bfloat16_warning("bfloat16") is None
    assert environment()["cpu_bfloat16"] in (True, False, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_memory_counts_growth_above_what_was_allocated_before() -> None:
    held = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MB, before
    with peak_memory("cuda") as memory:
        grown = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    assert 63 < memory["peak_memory_mb"] < 128 and held.numel() and grown.numel()
