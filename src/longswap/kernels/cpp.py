"""longswap's C++ kernels for CPU: each built on first use, or none at all.

Each kernel is one source file under ``csrc/``, compiled by ``torch.utils.cpp_extension``
the first time it is needed and cached in a folder of its own under
``TORCH_EXTENSIONS_DIR`` (by default torch's ``~/.cache/torch_extensions``). The folder's
name carries the kernel, the CPU's instruction set, the torch version and a digest of
everything else a build reads: every file under ``csrc/``, the compiler flags, the C++
compiler on ``PATH``, whether ninja is found, and the Python ABI (``SOABI``). A new torch,
Python, compiler or source builds its own copy instead of loading (or overwriting) one
built from other inputs, and a build found there is loaded as it is, so that checkouts and
virtual environments with the same inputs share it instead of compiling again from their
own paths. Kernels share the helpers of ``csrc/attention_rows.h``. Sources are compiled
without ``-ffast-math``: NaN and infinities follow IEEE, so a NaN input gives NaN outputs
as in the dense oracle; exponentials are vectorized through ATen's ``Vectorized<float>``
instead.

Where a kernel cannot be built (no C++ compiler, no ninja, a compiler error), longswap
warns once and keeps to its pure-PyTorch paths: same pattern, same results, slower. The
error is kept in the build's folder (:data:`FAILED`), and while it is there no process
tries that build again: changing any input (installing a compiler, a new torch) or deleting
the file makes the next process try. ``LONGSWAP_CPU_KERNEL=0`` in the environment keeps
every kernel off without trying.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import sysconfig
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


#: File a failed build leaves in its folder, holding the error: no process builds that
#: kernel again from the same inputs while it is there.
FAILED = "longswap-build-failed.txt"


def abi_tag() -> str:
    """This interpreter's ABI tag (``SOABI``, e.g. ``cpython-311-x86_64-linux-gnu``): a
    module built for one Python does not load into another."""
    return sysconfig.get_config_var("SOABI") or sys.implementation.cache_tag


def source_digest() -> str:
    """A digest of every file under ``csrc/``: its name and its bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in _SOURCES.rglob("*") if p.is_file()):
        digest.update(path.relative_to(_SOURCES).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def extension_name(kernel: str, isa: str, torch_version: str, abi: str) -> str:
    """A build's name, and so its cache folder: the kernel, instruction set and torch
    version, and a digest of the sources, compiler flags, compiler, Python ABI and whether
    ninja is found."""
    # Whether ninja is found, not where: each virtual environment has its own.
    tools = [_compiler(), shutil.which("ninja") is not None]
    inputs = repr((_CFLAGS, _ISA_FLAGS.get(isa, []), torch_version, abi, tools, source_digest()))
    version = "".join(c if c.isalnum() else "_" for c in torch_version)
    digest = hashlib.sha256(inputs.encode()).hexdigest()[:12]
    return f"longswap_{kernel}_{isa.lower()}_torch{version}_{digest}"


@functools.cache
def compiled(kernel: str):  # noqa: ANN201 (a compiled module)
    """The compiled module of ``csrc/{kernel}.cpp``; None when switched off, or (with one
    warning) when it cannot be built, now or by an earlier process from the same inputs."""
    from torch.utils import cpp_extension

    if kernel not in KERNELS:
        raise ValueError(f"unknown CPU kernel {kernel!r}; known: {', '.join(KERNELS)}")
    if os.environ.get(SWITCH, "1") == "0":
        return None
    isa = torch.backends.cpu.get_cpu_capability()
    name = extension_name(kernel, isa, torch.__version__, abi_tag())
    folder = _build_folder(name)
    built, failed = folder / f"{name}.so", folder / FAILED
    if built.is_file():  # built before, by any checkout or environment with these inputs
        with contextlib.suppress(ImportError):
            return _import(name, built)
    if failed.is_file():
        first = (failed.read_text().strip().splitlines() or ["unknown error"])[0]
        what = f"did not build its CPU kernel {kernel!r}: it failed before ({first})"
        _warn(what, kernel, failed)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(_SOURCES / f"{kernel}.cpp")],
            extra_include_paths=[str(_SOURCES)],
            extra_cflags=[*_CFLAGS, *_ISA_FLAGS.get(isa, [])],
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            verbose=False,
        )
    except Exception as error:  # noqa: BLE001 (any build failure: report it and go on)
        partial = failed.with_suffix(".partial")
        partial.write_text(f"{error}\n")
        os.replace(partial, failed)
        _warn(f"could not build its CPU kernel {kernel!r} ({error})", kernel, failed)
        return None


def _warn(what: str, kernel: str, failed: Path) -> None:
    """The one warning of a kernel that is not built: what happened, what runs instead,
    where the error is kept, what to do."""
    warnings.warn(
        f"longswap {what}; {KERNELS[kernel]} (same results, slower). The error is kept in "
        f"{failed}: no process tries this build again until its inputs change (sources, "
        "compiler, ninja, torch, Python) or that file is deleted. Install a C++ compiler "
        f"(g++) and ninja to get the kernel, or set {SWITCH}=0 to silence this.",
        RuntimeWarning,
        stacklevel=4,
    )


def build_all() -> dict[str, bool]:
    """Build (or load from the cache) every kernel now, so that no later call, timed or not,
    pays for a build; whether each is available."""
    return {kernel: compiled(kernel) is not None for kernel in KERNELS}


def kernel_status() -> dict[str, str]:
    """Each kernel's state, found without building or creating anything: ``off`` (switched
    off by ``LONGSWAP_CPU_KERNEL=0``), ``cached`` (built before: loads without compiling),
    ``failed before`` (its kept error names the file to delete to try again),
    ``builds on first use``, or ``unavailable`` (no C++ compiler or no ninja: the
    pure-PyTorch paths run)."""
    if os.environ.get(SWITCH, "1") == "0":
        return dict.fromkeys(KERNELS, f"off ({SWITCH}=0)")
    isa = torch.backends.cpu.get_cpu_capability()
    tools = [("C++ compiler", os.environ.get("CXX", "c++")), ("ninja", "ninja")]
    missing = [what for what, tool in tools if shutil.which(tool) is None]
    status = {}
    for kernel in KERNELS:
        name = extension_name(kernel, isa, torch.__version__, abi_tag())
        folder = _build_folder(name)
        if (folder / f"{name}.so").is_file():
            status[kernel] = "cached"
        elif (folder / FAILED).is_file():
            status[kernel] = f"failed before (see {folder / FAILED}; delete it to try again)"
        elif missing:
            status[kernel] = f"unavailable (no {' and no '.join(missing)})"
        else:
            status[kernel] = "builds on first use"
    return status


def _compiler() -> str:
    """The C++ compiler a build runs (``CXX``, else ``c++``): its file and that file's
    modification time (a reinstalled compiler is a new input), or its name and ``missing``."""
    command = os.environ.get("CXX", "c++")
    found = shutil.which(command)
    if found is None:
        return f"{command} missing"
    real = os.path.realpath(found)
    return f"{real} {os.stat(real).st_mtime_ns}"


def _build_folder(name: str) -> Path:
    """The cache folder of the build named ``name`` (``TORCH_EXTENSIONS_DIR`` or torch's
    default root, then ``name``), created by nothing here."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / name


def _import(name: str, path: Path) -> ModuleType:
    """Load a built module without running the build: its sources may sit in another
    checkout, whose paths would make ninja compile everything again."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a loadable module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
