"""Fine-tuning spread over processes equals one process with the same global batch.

On CPU: data parallelism (gloo) through ``accelerate launch``, which is also what an FSDP
configuration gives there (accelerate runs FSDP on accelerators only; the run says so).
On a GPU: FSDP2 through the same launch, parameters sharded (skipped without CUDA).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import longswap

FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: {processes}
num_machines: 1
machine_rank: 0
mixed_precision: 'no'
use_cpu: {cpu}
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def longswap_cli(*args, launch=(), timeout=300):
    done = subprocess.run(
        [*launch, "-m", "longswap", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "base"
    longswap_cli(
        "pretrain",
        *("--out", out, "--seq-len", 32, "--steps", 2, "--eval-steps", 2),
        *("--data", corpus, "--batch-size", 2, "--warmup-steps", 1),
        launch=(sys.executable,),
    )
    return out


def finetune(base, corpus, out, method, batch, launch):
    longswap_cli(
        "finetune",
        *("--model", base, "--seq-len", 64, "--steps", 3, "--eval-steps", 3),
        *("--pattern", "sliding_window(window=16, sinks=2)", "--method", method),
        *("--out", out, "--data", corpus, "--batch-size", batch, "--warmup-steps", 1),
        launch=launch,
    )
    return json.loads((out / "longswap_train.json").read_text())


def assert_same_model(a, b, atol):
    one, two = longswap.load(a), longswap.load(b)
    assert one.config.to_dict().get("longswap") is not None
    pairs = zip(one.named_parameters(), two.named_parameters(), strict=True)
    for (name, p), (_, q) in pairs:
        torch.testing.assert_close(p, q, atol=atol, rtol=atol, msg=name)


def accelerate_launch(config_file):
    return (sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file))


@pytest.mark.parametrize("method", ["full", "lora-plus"])
def test_two_cpu_processes_equal_one_with_the_same_global_batch(base, corpus, tmp_path, method):
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_CONFIG.format(processes=2, cpu="true"))
    spread = finetune(base, corpus, tmp_path / "two", method, 2, accelerate_launch(config))
    alone = finetune(base, corpus, tmp_path / "one", method, 4, (sys.executable,))
    assert spread["parallelism"]["engine"] == "MULTI_CPU"
    assert spread["parallelism"]["processes"] == 2 and spread["world_size"] == 2
    assert any("accelerate runs FSDP on GPUs" in note for note in spread["notes"])
    assert alone["parallelism"]["engine"] == "NO" and "note" not in alone["parallelism"]
    # The same samples per step, the same seeded adapters: the same model, to rounding.
    assert_same_model(tmp_path / "two", tmp_path / "one", atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate runs FSDP on GPUs only")
@pytest.mark.parametrize("method", ["full", "lora-plus"])
def test_fsdp2_on_gpus_shards_and_equals_one_process(base, corpus, tmp_path, method):
    processes = torch.cuda.device_count()
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_CONFIG.format(processes=processes, cpu="false"))
    spread = finetune(base, corpus, tmp_path / "fsdp", method, 2, accelerate_launch(config))
    alone = finetune(base, corpus, tmp_path / "one", method, 2 * processes, (sys.executable,))
    assert spread["parallelism"]["engine"] == "FSDP"
    assert spread["parallelism"]["fsdp_version"] == 2
    assert spread["parallelism"]["sharded_parameters"] > 0
    assert alone["parallelism"]["engine"] in ("NO", "MULTI_GPU")
    assert_same_model(tmp_path / "fsdp", tmp_path / "one", atol=1e-4)
