"""longswap's C++ kernels for CPU: each built on first use, or none at all.

Each kernel is one source file under ``csrc/``, compiled by ``torch.utils.cpp_extension``
the first time it is needed (cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``, under a name that carries the kernel, the CPU's instruction
set, the torch version and a digest of the sources and compiler flags: a new torch builds
its own copy instead of loading one compiled against another ABI, and a build found there is
loaded as it is, so that checkouts and virtual environments with the same sources share it
instead of compiling again from their own paths). Kernels share the helpers of
``csrc/attention_rows.h``. Sources are compiled without ``-ffast-math``: NaN and infinities
follow IEEE, so a NaN input gives NaN outputs as in the dense oracle; exponentials are
vectorized through ATen's ``Vectorized<float>`` instead. Where a kernel cannot be built (no
C++ compiler), longswap warns once and keeps to its pure-PyTorch paths: same pattern, same
results, slower. ``LONGSWAP_CPU_KERNEL=0`` in the environment keeps them there without
trying.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
import warnings
from pathlib import Path
from types import ModuleType

import torch

#: Environment variable: "0" keeps every path in pure PyTorch on CPU (no C++ kernel).
SWITCH = "LONGSWAP_CPU_KERNEL"
#: The kernels: source file stem -> what runs in pure PyTorch without it.
KERNELS = {
    "window_attention": "sliding_window and dilated run through the pure-PyTorch paths of "
    "`blocks` instead",
    "selection_decode": "decoding steps of block selections run through their pure-PyTorch "
    "path instead",
    "selection_attention": "block selections (block_topk, learned_topk and their unions with "
    "a window) run through the pure-PyTorch tiles of `blocks` instead",
}
_SOURCES = Path(__file__).with_name("csrc")
#: Compiler flags of every build.
_CFLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]
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


def source_digest(kernel: str) -> str:
    """Eight hex digits of what a build reads: the kernel's source, the shared header and
    the compiler flags."""
    digest = hashlib.sha256(repr((_CFLAGS, _ISA_FLAGS)).encode())
    for path in (_SOURCES / f"{kernel}.cpp", _SOURCES / "attention_rows.h"):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:8]


def extension_name(kernel: str, isa: str, torch_version: str) -> str:
    """A build's name, and so its cache folder: one per kernel, instruction set, torch
    version and source digest."""
    version = "".join(c if c.isalnum() else "_" for c in torch_version)
    return f"longswap_{kernel}_{isa.lower()}_torch{version}_{source_digest(kernel)}"


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
    name = extension_name(kernel, isa, torch.__version__)
    built = _module_path(name)
    if built.is_file():  # built before, by any checkout or environment with these sources
        with contextlib.suppress(ImportError):
            return _import(name, built)
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(_SOURCES / f"{kernel}.cpp")],
            extra_include_paths=[str(_SOURCES)],
            extra_cflags=[*_CFLAGS, *_ISA_FLAGS.get(isa, [])],
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


def build_all() -> dict[str, bool]:
    """Build (or load from the cache) every kernel now, so that no later call, timed or not,
    pays for a build; whether each is available."""
    return {kernel: compiled(kernel) is not None for kernel in KERNELS}


def kernel_status() -> dict[str, str]:
    """Each kernel's state, found without building anything: ``off`` (switched off by
    ``LONGSWAP_CPU_KERNEL=0``), ``cached`` (built before: loads without compiling),
    ``builds on first use``, or ``unavailable`` (no C++ compiler or no ninja: the
    pure-PyTorch paths run)."""
    from torch.utils import cpp_extension

    if os.environ.get(SWITCH, "1") == "0":
        return dict.fromkeys(KERNELS, f"off ({SWITCH}=0)")
    isa = torch.backends.cpu.get_cpu_capability()
    missing = [
        tool
        for tool, found in [
            ("C++ compiler", shutil.which(os.environ.get("CXX", "c++"))),
            ("ninja", cpp_extension.is_ninja_available()),
        ]
        if not found
    ]
    status = {}
    for kernel in KERNELS:
        if _module_path(extension_name(kernel, isa, torch.__version__)).is_file():
            status[kernel] = "cached"
        elif missing:
            status[kernel] = f"unavailable (no {' and no '.join(missing)})"
        else:
            status[kernel] = "builds on first use"
    return status


def _module_path(name: str) -> Path:
    """Where the build named ``name`` leaves its module, by torch's own rule
    (``TORCH_EXTENSIONS_DIR`` or torch's cache folder, a folder per Python version and
    accelerator, then ``name``)."""
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"


def _import(name: str, path: Path) -> ModuleType:
    """Load a built module without running the build: its sources may sit in another
    checkout, whose paths would make ninja compile everything again."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a loadable module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
