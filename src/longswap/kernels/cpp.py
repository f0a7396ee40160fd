"""longswap's C++ kernels for CPU: each built on first use, or none at all.

Each kernel is one source file under ``csrc/``, compiled by ``torch.utils.cpp_extension``
the first time it is needed (cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``, under a name that carries the kernel, the CPU's instruction
set and the torch version: a new torch builds its own copy instead of loading one compiled
against another ABI). Sources are compiled without ``-ffast-math``: NaN and infinities
follow IEEE, so a NaN input gives NaN outputs as in the dense oracle; exponentials are
vectorized through ATen's ``Vectorized<float>`` instead. Where a kernel cannot be built (no
C++ compiler), longswap warns once and keeps to its pure-PyTorch paths: same pattern, same
results, slower. ``LONGSWAP_CPU_KERNEL=0`` in the environment keeps them there without
trying.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

#: Environment variable: "0" keeps every path in pure PyTorch on CPU (no C++ kernel).
SWITCH = "LONGSWAP_CPU_KERNEL"
#: The kernels: source file stem -> what runs in pure PyTorch without it.
KERNELS = {
    "window_attention": "sliding_window and dilated run through the pure-PyTorch paths of "
    "`blocks` instead",
    "selection_decode": "decoding steps of block selections run through their pure-PyTorch "
    "path instead",
}
_SOURCES = Path(__file__).with_name("csrc")
#: Compiler flags per CPU capability: the instruction set, and the macro that makes ATen's
#: ``Vectorized<float>`` use it.
_ISA_FLAGS = {
    "AVX512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mavx2",
        "-mfma",
        "-mf16c",
        "-DCPU_CAPABILITY_AVX512",
    ],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
}


def extension_name(kernel: str, isa: str, torch_version: str) -> str:
    """A build's name, and so its cache folder: one per kernel, instruction set and torch
    version."""
    version = "".join(c if c.isalnum() else "_" for c in torch_version)
    return f"longswap_{kernel}_{isa.lower()}_torch{version}"


@functools.cache
def compiled(kernel: str):  # noqa: ANN201 (a compiled module)
    """The compiled module of ``csrc/{kernel}.cpp``; None when switched off, or (with one
    warning) when it cannot be built."""
    from torch.utils import cpp_extension

    if kernel not in KERNELS:
        raise ValueError(f"unknown CPU kernel {kernel!r}; known: {', '.join(KERNELS)}")
    if os.environ.get(SWITCH, "1") == "0":
        return None
    isa = torch.backends.cpu.get_cpu_capability()
    try:
        return cpp_extension.load(
            name=extension_name(kernel, isa, torch.__version__),
            sources=[str(_SOURCES / f"{kernel}.cpp")],
            extra_cflags=["-O3", "-fno-math-errno", "-fopenmp", *_ISA_FLAGS.get(isa, [])],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # noqa: BLE001 (any build failure: report it and go on)
        warnings.warn(
            f"longswap could not build its CPU kernel {kernel!r} ({error}); {KERNELS[kernel]} "
            "(same results, slower). Install a C++ compiler (g++) to get the kernel, or set "
            f"{SWITCH}=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
