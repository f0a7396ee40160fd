"""What produced a number: versions, device, threads; and the process's peak memory."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.metadata
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from longswap import __version__
from longswap.kernels.cpp import kernel_status


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """An environment stamp for result records, so two runs can be compared."""
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "threads": torch.get_num_threads(),
        "cpu_bfloat16": cpu_runs_bfloat16(),
        "cpu_flags": cpu_flags(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


#: The libraries whose versions a bug report names (those not installed show as such).
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "gguf")


def bug_report() -> dict[str, str]:
    """What a bug report needs, as ``name: value`` lines: versions of Python, longswap and
    the libraries it builds on, the device, the CPU's capability, threads, and the state of
    each C++ kernel (nothing is built to find it)."""
    gpu = torch.cuda.is_available()
    stamp = environment("cuda" if gpu else "cpu")
    found = {"longswap": __version__, "python": stamp["python"]}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    native = {True: "native", False: "emulated (no AVX-512/AMX)", None: "unknown"}
    found |= {
        "device": f"cuda: {stamp['device']}" if gpu else "cpu (no CUDA device)",
        "cpu capability": torch.backends.cpu.get_cpu_capability(),
        "cpu bfloat16": native[stamp["cpu_bfloat16"]],
        "threads": str(stamp["threads"]),
        "platform": stamp["platform"],
    }
    found |= {f"kernel {name}": state for name, state in kernel_status().items()}
    return found


#: The CPU features that decide how fast attention and matrix products run here.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def cpu_flags() -> list[str]:
    """Which of :data:`CPU_FLAGS` this CPU has (from ``/proc/cpuinfo``; empty elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [flag for flag in CPU_FLAGS if flag in have]
    return []


def cpu_runs_bfloat16() -> bool | None:
    """Whether this CPU multiplies bfloat16 matrices natively (oneDNN's test: AVX-512 or
    AMX); None when this build of torch cannot tell (no oneDNN). Without it (an AVX2-only
    CPU) bfloat16 products are emulated and run several times slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def bfloat16_warning(dtype: torch.dtype | str, device: torch.device | str = "cpu") -> str | None:
    """A warning for bfloat16 work on a CPU without native bfloat16, else None."""
    if str(dtype).removeprefix("torch.") != "bfloat16" or torch.device(device).type != "cpu":
        return None
    if cpu_runs_bfloat16() is not False:
        return None
    return (
        "this CPU has no native bfloat16 (no AVX-512/AMX): bfloat16 matrix products are "
        "emulated and run several times slower than float32 here; pass --dtype float32 "
        "(twice the weights' memory) unless memory is what you are short of"
    )


def reset_peak_rss() -> None:
    """Reset the process's resident-set high-water mark (Linux; a no-op elsewhere)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb(field: str = "VmHWM") -> float:
    """The resident-set high-water mark (``VmHWM``) or current size (``VmRSS``) in MiB."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


#: glibc ``mallopt`` parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def heap_mode(own_peak: bool) -> None:
    """Set how glibc's heap handles large blocks (Linux; elsewhere a no-op).

    ``own_peak``: every block above 1 MiB comes straight from mmap and goes back to the OS
    when freed, so a call's resident high-water mark is its own and not hidden by memory
    kept from the call before. Otherwise freed blocks up to 32 MiB stay for reuse, as in a
    process that has run for a while (glibc's own limit): the setting for timing, since
    fresh pages cost a page fault each and would penalise code with many temporaries.
    """
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        mallopt = _libc().mallopt
        threshold = 2**20 if own_peak else 2**25
        mallopt(_M_MMAP_THRESHOLD, threshold)
        mallopt(_M_TRIM_THRESHOLD, 2 * threshold)


def release_free_memory() -> None:
    """Give the heap's free memory back to the OS (glibc ``malloc_trim``; elsewhere a
    no-op), so that the resident set holds only live memory."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            _libc().malloc_trim(0)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"))


@contextlib.contextmanager
def peak_memory(
    device: torch.device | str = "cpu", fresh_heap: bool = True
) -> Iterator[dict[str, float]]:
    """Measure the peak memory of the enclosed code into the yielded dict's ``peak_memory_mb``:
    how far it rose above what was held at entry (memory allocated before, such as a
    model's weights, does not count).

    On CUDA: the most device memory allocated (``torch.cuda.max_memory_allocated``) above
    the allocation at entry. On CPU: the process's resident-set high-water mark above its
    size at entry. With ``fresh_heap`` the heap's free memory is first given back to the OS
    (:func:`release_free_memory`), so that memory freed by earlier calls cannot hide this
    one's (the page faults of touching it again cost about 0.1 s a GB of any time taken
    inside); without it, a figure can read 0 when earlier calls left enough free memory in
    the heap.
    """
    device = torch.device(device)
    found = {"peak_memory_mb": 0.0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    else:
        if fresh_heap:
            release_free_memory()
        reset_peak_rss()
        base = peak_rss_mb("VmRSS")
    try:
        yield found
    finally:
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak = peak_rss_mb()
        found["peak_memory_mb"] = max(peak - base, 0.0)
