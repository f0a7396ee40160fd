"""``longswap eval``: records, skips, resume, report, and errors before any work."""

import json

import pytest

import longswap
from longswap.cli import main
from longswap.data import byte_tokenizer

from ..swap.conftest import make_model


@pytest.fixture
def models(tmp_path):
    base = make_model("llama", vocab_size=257, max_position_embeddings=512)
    base.save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    longswap.swap_attention(base, "sliding_window(window=64)", max_length=1024)
    base.save_pretrained(tmp_path / "swapped")
    return tmp_path / "base", tmp_path / "swapped"


def test_eval_grid_report_and_resume(models, tmp_path, capsys):
    base, swapped = models
    out = tmp_path / "eval"
    args = [
        "eval",
        "--model",
        str(base),
        str(swapped),
        "--tasks",
        "ppl",
        "passkey",
        "needles",
        "speed",
        "--lengths",
        "256",
        "1024",
        "--depths",
        "0.0",
        "1.0",
        "--trials",
        "1",
        "--targets",
        "64",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert len(records) == 2 * (2 + 4 + 2 + 2)
    assert not [r for r in records if "skipped" in r]
    # Rotary positions: 1024 > 512 trained positions is measured, and marked.
    beyond = [r for r in records if "beyond_trained" in r]
    assert {(r["model"], r["length"], r["beyond_trained"]) for r in beyond} == {
        (str(base), 1024, 512)
    }
    ppl = [r for r in records if r["task"] == "ppl" and "perplexity" in r]
    assert all(r["target_tokens"] == 64 and "bits_per_byte" in r for r in ppl)
    assert all("torch" in r["environment"] for r in records)
    report = (out / "report.md").read_text()
    assert "| 1024 (beyond its 512) |" in report
    assert "perplexity.png" in report and (out / "perplexity.png").is_file()
    assert (out / "passkey-swapped.png").is_file() and (out / "speed.png").is_file()
    assert (out / "speed-decode_tokens_per_s.png").is_file()
    assert main(args) == 2  # results.json exists: refuse without --resume
    assert "--resume" in capsys.readouterr().err
    # An interrupted run: drop the last records, resume computes only those.
    kept = records[:-3]
    (out / "results.json").write_text(json.dumps({"records": kept}))
    assert main([*args, "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())["records"]
    assert [r["key"] for r in again[:-3]] == [r["key"] for r in kept]
    assert len(again) == len(records)


def test_eval_fails_before_work_on_bad_models(models, tmp_path, capsys):
    base, _ = models
    other = tmp_path / "mismatch"
    make_model("llama").save_pretrained(other)  # 97-token vocabulary
    byte_tokenizer().save_pretrained(other)  # 257 tokens
    code = main(
        [
            "eval",
            "--model",
            str(base),
            str(other),
            str(tmp_path / "missing"),
            "--tasks",
            "ppl",
            "magic",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and "do not belong together" in err
    assert "unknown task 'magic'" in err
    assert not (tmp_path / "o").exists()


def test_api_returns_the_records(models, tmp_path):
    from longswap.evaluate.run import EvalConfig, evaluate

    base, _ = models
    records = evaluate(
        EvalConfig(
            model=[str(base)], tasks=["recall"], lengths=[256], trials=1, out=str(tmp_path / "api")
        )
    )
    saved = json.loads((tmp_path / "api" / "results.json").read_text())["records"]
    assert records == saved and records[0]["accuracy"] in (0.0, 1.0)


def test_flags_take_commas_and_repeats(models, tmp_path):
    import argparse

    from longswap.evaluate.run import EvalConfig
    from longswap.train.config import add_arguments, from_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser, EvalConfig)
    base, swapped = models
    args = parser.parse_args(
        [
            "--model",
            str(base),
            "--model",
            str(swapped),
            "--tasks",
            "ppl,passkey",
            "--lengths",
            "1024,2048",
            "4096",
            "--out",
            "x",
        ]
    )
    config = from_arguments(EvalConfig, args)
    assert config.model == [str(base), str(swapped)]
    assert config.tasks == ["ppl", "passkey"] and config.lengths == [1024, 2048, 4096]


def test_learned_positions_end_at_their_table(tmp_path):
    model = make_model("gpt2", vocab_size=257)  # 64 learned positions
    model.save_pretrained(tmp_path / "gpt2")
    byte_tokenizer().save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "eval"
    args = ["eval", "--model", str(tmp_path / "gpt2"), "--tasks", "ppl", "--lengths", "32", "128"]
    assert main([*args, "--targets", "16", "--out", str(out)]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert "perplexity" in records[0]
    assert "beyond the 64 learned positions" in records[1]["skipped"]
