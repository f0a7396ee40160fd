"""Fine-tuning spread over processes equals one process with the same global batch.

On CPU: data parallelism (gloo) through ``accelerate launch``, which is also what an FSDP
configuration gives there (accelerate runs FSDP on accelerators only; the run says so);
DeepSpeed ZeRO-3, parameters sharded; DeepSpeed Ulysses sequence parallelism, each
sequence split over 2 processes, for every pattern kind.
On a GPU: FSDP2 through the same launch, parameters sharded (skipped without CUDA).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longswap
from longswap.io import mark_written

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
CPU_ENV = {**ENV, "CUDA_VISIBLE_DEVICES": ""}  # the gloo runs, also on a machine with a GPU


def longswap_cli(*args, launch=(), timeout=300, env=ENV):
    done = subprocess.run(
        [*launch, "-m", "longswap", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
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


WINDOW = "sliding_window(window=16, sinks=2)"


def finetune(base, corpus, out, method, batch, launch, pattern=WINDOW, extra=(), env=ENV):
    longswap_cli(
        "finetune",
        *("--model", base, "--seq-len", 64, "--steps", 3, "--eval-steps", 3),
        *("--pattern", pattern, "--method", method, *extra),
        *("--out", out, "--data", corpus, "--batch-size", batch, "--warmup-steps", 1),
        launch=launch,
        env=env,
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


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2")
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed"
)


def test_two_processes_overwrite_their_out_once(base, corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mark_written(out)  # an earlier longswap output
    (out / "precious.txt").write_text("old run")
    record = finetune(base, corpus, out, "full", 2, TORCHRUN, extra=("--overwrite",), env=CPU_ENV)
    assert record["world_size"] == 2
    assert not (out / "precious.txt").exists()
    # Both processes wrote into the one folder that became --out (each its random state).
    saved = {p.name for p in (out / "checkpoints" / "checkpoint-3").iterdir()}
    assert {"model.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left
    assert longswap.load(out).config.longswap is not None


#: ZeRO-3 that partitions every parameter, however small (by default, DeepSpeed keeps
#: parameters under 100k values whole on every process).
EVERY_PARAMETER_SHARDED = {
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "zero_allow_untested_optimizer": True,
    **dict.fromkeys(
        ["train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"],
        "auto",
    ),
    "gradient_clipping": "auto",
}


@needs_deepspeed
@pytest.mark.parametrize("choice", ["zero3", "every-parameter-sharded"])
@pytest.mark.parametrize("method", ["lora-plus"])  # full: the sequence-parallel test below
def test_zero3_on_two_cpu_processes_shards_and_equals_one(base, corpus, tmp_path, method, choice):
    if choice != "zero3":
        choice = tmp_path / "zero3.json"
        choice.write_text(json.dumps(EVERY_PARAMETER_SHARDED))
    zero3 = ("--deepspeed", choice)
    spread = finetune(
        base, corpus, tmp_path / "zero3", method, 2, TORCHRUN, extra=zero3, env=CPU_ENV
    )
    alone = finetune(base, corpus, tmp_path / "one", method, 4, (sys.executable,), env=CPU_ENV)
    assert spread["parallelism"]["engine"] == "DEEPSPEED" and spread["world_size"] == 2
    assert spread["first_loss"] == pytest.approx(alone["first_loss"], rel=1e-6)
    assert spread["parallelism"]["zero_stage"] == 3 and spread["parallelism"]["processes"] == 2
    assert spread["parallelism"]["sharded_parameters"] > 0
    for counted in ("trainable_parameters", "parameters"):  # whole, not one shard's
        assert spread[counted] == alone[counted]
    # Saved whole (gathered from the shards), it loads as the same swapped model.
    assert_same_model(tmp_path / "zero3", tmp_path / "one", atol=1e-5)


@needs_deepspeed
@pytest.mark.parametrize(
    "method,pattern",
    [
        ("full", "shifted_groups(group_size=16)"),  # rules differ between heads
        # learned selectors train along (LM loss + their distillation loss): DSA's stage 2
        ("lora-plus", "sliding_window(window=16, sinks=2) | learned_topk(block_size=8, top_k=2)"),
    ],
)
def test_sequence_parallel_fine_tune_equals_one_process(base, corpus, tmp_path, method, pattern):
    split = ("--sequence-parallel", 2)
    spread = finetune(base, corpus, tmp_path / "sp", method, 1, TORCHRUN, pattern, split, CPU_ENV)
    alone = finetune(
        base, corpus, tmp_path / "one", method, 1, (sys.executable,), pattern, env=CPU_ENV
    )
    assert spread["parallelism"]["sequence_parallel"] == 2
    assert spread["parallelism"]["engine"] == "DEEPSPEED"
    assert spread["parallelism"]["zero_stage"] == 3
    assert spread["parallelism"]["sharded_parameters"] > 0
    assert spread["first_loss"] == pytest.approx(alone["first_loss"], rel=1e-6)
    assert_same_model(tmp_path / "sp", tmp_path / "one", atol=1e-5)


@needs_deepspeed
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_ulysses_attention_equals_one_process_for_every_pattern_kind(kv_heads):
    # Each process holds half of the sequence (two packed documents, told only by
    # position_ids: Ulysses drops the mask) and attends with half of the heads.
    script = Path(__file__).with_name("ulysses_check.py")
    done = subprocess.run(
        [*TORCHRUN, str(script), str(kv_heads)], capture_output=True, text=True, env=CPU_ENV
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cases = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(cases) == (11 if kv_heads == 2 else 8)
    for case in cases:
        assert case["processes"] == 2
        assert case["logits"] < 1e-5, case
        assert case["grads"] < 1e-6 * max(1.0, case["scale"] * 100), case


def test_a_head_dependent_pattern_refuses_a_share_of_heads_it_is_not_told_about():
    from transformers import LlamaConfig, LlamaForCausalLM

    from longswap.swap import shard_heads
    from longswap.swap.attention import longswap_attention

    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    longswap.swap_attention(model, "shifted_groups(group_size=8)")
    module = model.model.layers[0].self_attn
    q, k = torch.randn(1, 2, 20, 8), torch.randn(1, 1, 20, 8)
    with pytest.raises(ValueError, match="holds 2 of the model's 4 query heads"):
        longswap_attention(module, q, k, k, None)
    with shard_heads(model, 1, 2):  # heads 2 and 3: both shifted
        shifted, _ = longswap_attention(module, q, k, k, None)
    assert not hasattr(module, "longswap_head_shard")
    # Of two heads, the second is the shifted one: both of this share's heads must be it.
    for head in (0, 1):
        pair = q[:, [head, head]]
        expected = longswap.sparse_attention(pair, k, k, "shifted_groups(group_size=8)")
        torch.testing.assert_close(shifted.transpose(1, 2)[:, head], expected[:, 1])
        assert not torch.allclose(expected[:, 0], expected[:, 1])


@pytest.mark.parametrize(
    "extra,env,message",
    [
        (("--sequence-parallel", "2"), {}, "must divide the number of processes"),
        (("--sequence-parallel", "2", "--deepspeed", "zero2"), {"WORLD_SIZE": "2"}, "stage 2"),
        (("--sequence-parallel", "3"), {"WORLD_SIZE": "3"}, "multiple of --sequence-parallel 3"),
        (("--deepspeed", "zero9"), {}, "neither a ZeRO stage"),
        (("--deepspeed", __file__), {}, "the config file is unreadable"),
        (("--deepspeed", "zero3", "--transfer-steps", "1"), {}, "--transfer-steps on ZeRO"),
        (("--sequence-parallel", "2", "--method", "selector"), {"WORLD_SIZE": "2"}, "warm-up"),
        (
            ("--sequence-parallel", "2", "--pattern", "sliding_window(window=16)"),
            {"WORLD_SIZE": "2"},
            "RANK is not, so no launcher",
        ),
    ],
)
def test_distributed_settings_that_cannot_run_are_refused_first(
    base, tmp_path, monkeypatch, capsys, extra, env, message
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from longswap.cli import main

    out = tmp_path / "out"
    args = ["finetune", "--model", str(base), "--out", str(out), "--seq-len", "64", *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "content",
    ['[{"stage": 3}]', '{"zero_optimization": [3]}', '{"zero_optimization": {"stage": 4}}'],
)
def test_a_deepspeed_file_that_is_no_config_is_named_first(base, tmp_path, capsys, content):
    from longswap.cli import main

    config = tmp_path / "ds.json"
    config.write_text(content)
    out = tmp_path / "out"
    args = ["finetune", "--model", str(base), "--out", str(out), "--deepspeed", str(config)]
    assert main([*args, "--pattern", WINDOW]) == 2
    err = capsys.readouterr().err
    assert f"--deepspeed {config}: the config file is " in err and "no attribute" not in err
    assert "not a DeepSpeed config" in err or "DeepSpeed has stages 0, 1, 2 and 3" in err
    assert not out.exists()
