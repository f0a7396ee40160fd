"""Using a converted model through the command line: generate, merge, --version, env."""

import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import longswap
from longswap import generate as generate_module
from longswap.cli import main
from longswap.demo import EMBEDDED_MODEL
from longswap.io import mark_written
from tests.conftest import SWAPPED_WINDOW as WINDOW

PROMPT = "import os\n\n\ndef read_config(path):\n    " + "# settings\n" * 40


class Recorder:
    """A stand-in for stdout that keeps each write apart."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass

    @property
    def text(self):
        return "".join(self.writes)


@pytest.fixture
def prompt(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text(PROMPT)
    return path


def generate(monkeypatch, capsys, model, prompt, *flags):
    """Run ``longswap generate``; its stdout writes, and its stderr."""
    recorder = Recorder()
    monkeypatch.setattr(sys, "stdout", recorder)
    code = main(["generate", "--model", str(model), "--prompt-file", str(prompt), *flags])
    monkeypatch.undo()
    assert code == 0, capsys.readouterr().err
    return recorder, capsys.readouterr().err


def cache_mib(err):
    return float(err.split("MiB")[0].split()[-1])


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A LoRA+ output of a two-step fine-tune of the swapped embedded model."""
    root = tmp_path_factory.mktemp("lora")
    data = root / "data"
    data.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "dataclasses.py"):
        shutil.copy(stdlib / name, data / name)
    out = root / "lora"
    flags = ["--model", str(EMBEDDED_MODEL), "--pattern", WINDOW, "--data", str(data)]
    flags += ["--seq-len", "64", "--steps", "2", "--batch-size", "2", "--eval-steps", "2"]
    assert main(["finetune", *flags, "--learning-rate", "1e-2", "--out", str(out)]) == 0
    assert (out / "adapter_config.json").is_file()
    return out


def test_generate_streams_the_continuation_and_greedy_repeats(monkeypatch, capsys, prompt):
    first, err = generate(monkeypatch, capsys, EMBEDDED_MODEL, prompt, "--temperature", "0")
    assert len(first.writes) > 10  # piece by piece, not once at the end
    assert first.text.strip()
    assert "tokens/s" in err and "KV cache (dynamic)" in err
    again, _ = generate(monkeypatch, capsys, EMBEDDED_MODEL, prompt, "--temperature", "0")
    assert again.text == first.text
    sampled = [
        generate(monkeypatch, capsys, EMBEDDED_MODEL, prompt, "--seed", seed)[0].text
        for seed in ("1", "1", "2")
    ]
    assert sampled[0] == sampled[1] != sampled[2]


def test_generate_stops_at_max_new_tokens(monkeypatch, capsys, prompt):
    out, err = generate(monkeypatch, capsys, EMBEDDED_MODEL, prompt, "--max-new-tokens", "5")
    assert "decode 5 tokens" in err
    assert len(out.text.rstrip("\n").encode()) <= 5  # the byte tokenizer: a token per byte


def test_generate_decodes_a_swapped_model_through_its_sparse_cache(
    monkeypatch, capsys, prompt, swapped
):
    built = []
    make = generate_module.sparse_cache
    monkeypatch.setattr(generate_module, "sparse_cache", lambda m: built.append(m) or make(m))
    flags = ("--temperature", "0", "--max-new-tokens", "200")
    out, err = generate(monkeypatch, capsys, swapped, prompt, *flags)
    assert built and out.text.strip()
    assert "KV cache (sparse)" in err
    _, dense = generate(monkeypatch, capsys, EMBEDDED_MODEL, prompt, *flags)
    # about 640 tokens in all; the window keeps sinks + 31 + spare room of 64 per layer
    assert cache_mib(err) < cache_mib(dense) / 3


def test_generate_and_merge_a_lora_output(monkeypatch, capsys, prompt, lora, tmp_path):
    out, err = generate(monkeypatch, capsys, lora, prompt, "--max-new-tokens", "20")
    assert out.text.strip() and "KV cache (sparse)" in err
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(lora), "--out", str(merged)]) == 0
    assert not (merged / "adapter_config.json").exists()
    assert (merged / "tokenizer.json").is_file()
    tokens = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = longswap.load(lora).eval()(tokens).logits
        plain = longswap.load(merged).eval()
        got = plain(tokens).logits
    assert plain.config.longswap["layers"][0] == "sliding_window(window=32, sinks=4)"
    # float32 rounding: W x + B (A x) against (W + B A) x
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    _, err = generate(monkeypatch, capsys, merged, prompt, "--max-new-tokens", "5")
    assert "KV cache (sparse)" in err


def test_merge_refuses_a_folder_without_adapter(capsys, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(EMBEDDED_MODEL), "--out", str(out)]) == 2
    assert "holds no LoRA adapter" in capsys.readouterr().err
    assert not out.exists()


def test_merge_keeps_an_existing_out_until_the_merged_model_is_written(
    monkeypatch, capsys, lora, tmp_path
):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("keep me")
    assert main(["merge", "--model", str(lora), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", "--model", str(lora), "--out", str(out), "--overwrite"]) == 2
    assert "longswap did not write (keep.txt)" in capsys.readouterr().err
    mark_written(out)  # an earlier longswap output: --overwrite may replace it

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("longswap.io.save_weights", fail)
    assert main(["merge", "--model", str(lora), "--out", str(out), "--overwrite"]) == 2
    assert "full" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging folder left
    assert (out / "keep.txt").read_text() == "keep me"


def test_merge_refuses_to_write_over_the_adapters_base(capsys, tmp_path):
    base, data, lora = tmp_path / "base", tmp_path / "data", tmp_path / "lora"
    swap = ["swap", "--model", str(EMBEDDED_MODEL), "--pattern", WINDOW, "--out", str(base)]
    assert main(swap) == 0
    data.mkdir()
    shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / "argparse.py", data)
    flags = ["--model", str(base), "--data", str(data), "--seq-len", "64", "--steps", "1"]
    flags += ["--batch-size", "2", "--eval-steps", "1", "--out", str(lora)]
    assert main(["finetune", *flags]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in base.iterdir()}
    for out in (base, base / "merged"):
        assert main(["merge", "--model", str(lora), "--out", str(out), "--overwrite"]) == 2
        assert f"--out {out} " in (err := capsys.readouterr().err) and "base model" in err
    assert {p.name: p.stat().st_mtime_ns for p in base.iterdir()} == before
    assert longswap.load(lora) is not None  # its base is as it was


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prompt-file", "missing.txt"], "missing.txt does not exist"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--temperature", "-0.5"], "--temperature must be 0"),
        (["--temperature", "nan"], "--temperature must be 0 (greedy) or a positive number"),
        (["--seed", "-1"], "--seed must lie in [0, 2**32)"),
        (["--top-p", "0"], "--top-p must lie in (0, 1]"),
        (["--top-p", "1.01"], "--top-p must lie in (0, 1]"),
        (["--top-k", "-1"], "--top-k must be 0"),
        (["--device", "banana"], "--device 'banana' is not a device"),
        *([(["--device", "cuda"], "torch finds no CUDA device")] * (not torch.cuda.is_available())),
    ],
)
def test_generate_refuses_bad_inputs_before_loading(monkeypatch, capsys, prompt, flags, message):
    monkeypatch.setattr(generate_module, "load", pytest.fail)  # nothing may be loaded
    monkeypatch.chdir(prompt.parent)
    base = ["generate", "--model", str(EMBEDDED_MODEL), "--prompt-file", prompt.name]
    assert main([*base, *flags]) == 2
    assert message in capsys.readouterr().err


def test_generate_refuses_an_empty_prompt(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(generate_module, "load", pytest.fail)
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    assert main(["generate", "--model", str(EMBEDDED_MODEL), "--prompt-file", str(empty)]) == 2
    assert "the prompt is empty" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", open(empty))  # noqa: SIM115 (closed by the test's end)
    assert main(["generate", "--model", str(EMBEDDED_MODEL)]) == 2
    assert "standard input holds no text" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"longswap {longswap.__version__}"


def test_env_names_versions_device_and_kernels_without_building(monkeypatch, capsys):
    from torch.utils import cpp_extension

    from longswap.kernels.cpp import KERNELS

    monkeypatch.setattr(cpp_extension, "load", pytest.fail)  # reporting builds nothing
    assert main(["env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    report = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in lines)
    assert report["longswap"] == longswap.__version__
    assert report["torch"] == torch.__version__ and report["python"] == platform.python_version()
    assert {"transformers", "peft", "accelerate", "deepspeed", "device", "threads"} <= set(report)
    assert report["cpu capability"] == torch.backends.cpu.get_cpu_capability()
    for kernel in KERNELS:
        state = report[f"kernel {kernel}"]
        assert state.startswith(
            ("cached", "builds on first use", "unavailable", "failed before")
        ), state


def test_help_imports_no_torch():
    code = (
        "import sys\nfrom longswap.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "generate" in done.stdout and "merge" in done.stdout and "env" in done.stdout


def test_help_texts_of_the_new_commands(capsys):
    for command in ("generate", "merge", "env"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "``" not in capsys.readouterr().out, command


def test_generate_warms_up_where_the_pattern_is_sparse(monkeypatch):
    """The default pattern attends densely over 256 tokens: the warm-up runs where it skips
    keys, so that the prompt's prefill finds its kernels built."""
    from longswap.data.tokenizer import tokenizer_for
    from longswap.demo.config import DEFAULT_PATTERN
    from longswap.kernels import cpp

    model = longswap.load(EMBEDDED_MODEL).eval()
    longswap.swap_attention(model, DEFAULT_PATTERN, max_length=4096)
    tokenizer = tokenizer_for(EMBEDDED_MODEL)
    pattern, calls, real = longswap.parse_pattern(DEFAULT_PATTERN), [], model.generate

    def recorded(**kwargs):
        calls.append((kwargs["input_ids"].shape[1], cpp.compiled.cache_info().currsize))
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", recorded)
    cpp.compiled.cache_clear()
    sampling = generate_module.Sampling(max_new_tokens=2, temperature=0)
    generate_module.generate(model, tokenizer, "x = 1\n" * 500, sampling)
    (warm, _), (prompt, built) = calls
    assert not pattern.covers(warm) and pattern.covers(warm - 1) and warm < prompt == 3000
    assert built  # the selection kernels were built (or found unbuildable) by the warm-up
    # A prompt inside the dense stretch warms up on its first 256 tokens, as before.
    calls.clear()
    generate_module.generate(model, tokenizer, "x = 1\n" * 100, sampling)
    assert [n for n, _ in calls] == [256, 600]
