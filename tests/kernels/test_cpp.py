"""Building the C++ kernels: what a build is keyed by, failed builds kept on disk, and a
status report that builds and creates nothing."""

import re
import shutil
import warnings
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from longswap.cli import main
from longswap.kernels import cpp

KERNEL = "window_attention"
ISA, TORCH, ABI = "AVX2", "2.13.0+cpu", "cpython-311-x86_64-linux-gnu"


@pytest.fixture
def sources(monkeypatch, tmp_path):
    """A copy of ``csrc/`` that a test may change, and an empty build cache."""
    copy = tmp_path / "csrc"
    shutil.copytree(cpp._SOURCES, copy)
    monkeypatch.setattr(cpp, "_SOURCES", copy)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    cpp.compiled.cache_clear()
    yield copy
    cpp.compiled.cache_clear()


def test_every_file_under_csrc_keys_the_build(sources):
    name = cpp.extension_name(KERNEL, ISA, TORCH, ABI)
    (sources / "new_helpers.h").write_text("#pragma once\n")
    added = cpp.extension_name(KERNEL, ISA, TORCH, ABI)
    (sources / "new_helpers.h").write_text("#pragma once\ninline int one() { return 1; }\n")
    changed = cpp.extension_name(KERNEL, ISA, TORCH, ABI)
    assert len({name, added, changed}) == 3
    (sources / "new_helpers.h").unlink()
    assert cpp.extension_name(KERNEL, ISA, TORCH, ABI) == name  # same inputs, same build


def test_python_abi_and_compiler_key_the_build(sources, monkeypatch):
    name = cpp.extension_name(KERNEL, ISA, TORCH, ABI)
    assert cpp.extension_name(KERNEL, ISA, TORCH, "cpython-312-x86_64-linux-gnu") != name
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert cpp.extension_name(KERNEL, ISA, TORCH, ABI) != name
    assert cpp.abi_tag()  # this interpreter's


def counted_load(monkeypatch):
    """Calls to torch's build, each failing as a missing compiler does."""
    calls = []

    def fail(**kwargs):
        calls.append(kwargs["name"])
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", fail)
    return calls


def test_a_failed_build_is_not_tried_again_until_its_inputs_change(sources, monkeypatch):
    calls = counted_load(monkeypatch)
    with pytest.warns(RuntimeWarning, match="command not found") as first:
        assert cpp.compiled(KERNEL) is None
    assert len(calls) == 1
    marker = re.search(r"kept in (\S+?): ", str(first[0].message)).group(1)
    assert "command not found" in Path(marker).read_text()
    cpp.compiled.cache_clear()  # as a new process would start
    with pytest.warns(RuntimeWarning, match="failed before") as again:
        assert cpp.compiled(KERNEL) is None
    assert len(calls) == 1  # remembered: no second attempt
    assert f"kept in {marker}: no process tries" in str(again[0].message)
    assert cpp.kernel_status()[KERNEL].startswith(f"failed before (see {marker}")
    (sources / "attention_rows.h").write_text("// changed\n")  # new inputs: try again
    cpp.compiled.cache_clear()
    with pytest.warns(RuntimeWarning, match="command not found"):
        assert cpp.compiled(KERNEL) is None
    assert len(calls) == 2


def test_deleting_the_kept_error_tries_the_build_again(sources, monkeypatch):
    calls = counted_load(monkeypatch)
    with pytest.warns(RuntimeWarning) as first:
        cpp.compiled(KERNEL)
    marker = re.search(r"kept in (\S+?): ", str(first[0].message)).group(1)
    cpp.compiled.cache_clear()
    Path(marker).unlink()
    with pytest.warns(RuntimeWarning, match="command not found"):
        cpp.compiled(KERNEL)
    assert len(calls) == 2


def test_a_missing_compiler_fails_its_build_once(sources, monkeypatch):
    """A real build with a compiler that fails at once (``CXX=false``)."""
    monkeypatch.setenv("CXX", "false")
    with pytest.warns(RuntimeWarning, match="could not build"):
        assert cpp.compiled(KERNEL) is None
    cpp.compiled.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", pytest.fail)
    with pytest.warns(RuntimeWarning, match="failed before"):
        assert cpp.compiled(KERNEL) is None


def test_env_reports_kernels_without_creating_the_build_cache(sources, capsys):
    cache = sources.parent / "cache"
    assert main(["env"]) == 0
    assert not cache.exists()
    assert f"kernel {KERNEL}" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        status = cpp.kernel_status()
    assert not cache.exists()
    assert set(status) == set(cpp.KERNELS)
