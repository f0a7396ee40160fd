"""``longswap eval``: records, skips, resume, report, and errors before any work."""

import json
import os
import resource
import signal
import subprocess
import sys

import pytest

import longswap
from longswap.cli import main
from longswap.data import byte_tokenizer
from longswap.evaluate.speed import decode_speed

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
    # Four needles and their question do not fit in 256 tokens: skipped, saying so.
    skipped = [r for r in records if "skipped" in r]
    assert {(r["task"], r["length"]) for r in skipped} == {("needles", 256)}
    assert all("shortest prompt of this task" in r["skipped"] for r in skipped)
    # Rotary positions: 1024 > 512 trained positions is measured, and marked.
    beyond = [r for r in records if "beyond_trained" in r]
    assert {(r["model"], r["length"], r["beyond_trained"]) for r in beyond} == {
        (str(base), 1024, 512)
    }
    ppl = [r for r in records if r["task"] == "ppl" and "perplexity" in r]
    assert all(r["target_tokens"] == 64 and "bits_per_byte" in r for r in ppl)
    assert all(r["documents"] == 8 and r["context"] == 512 for r in ppl)  # same targets
    assert all(lo < r["perplexity"] < hi for r in ppl for lo, hi in [r["perplexity_ci"]])
    assert all("torch" in r["environment"] for r in records)
    report = (out / "report.md").read_text()
    assert "| 1024 (beyond its 512) |" in report
    assert "perplexity.png" in report and (out / "perplexity.png").is_file()
    assert (out / "passkey-swapped.png").is_file() and (out / "speed.png").is_file()
    assert (out / "speed-decode_tokens_per_s.png").is_file() and (
        out / "speed-cache_mb.png"
    ).is_file()
    # Tables, not Python dicts; passkey as a table beside its heatmaps.
    assert "{" not in report and "| model | length | depth 0 | depth 1 |" in report
    assert "| model | length | prefill tokens/s | decode tokens/s |" in report
    assert "| model | length | accuracy | trials |" in report
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
    config = tmp_path / "tasks.yaml"
    config.write_text("tasks: [ppl, magic]\n")  # on the command line, argparse refuses magic
    code = main(
        [
            "eval",
            "--config",
            str(config),
            "--model",
            str(base),
            str(other),
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "missing does not exist" in err and "do not belong together" in err
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


def test_calls_that_share_a_dict_load_each_model_once_with_the_same_records(
    models, tmp_path, monkeypatch
):
    from longswap.evaluate import run

    def config(out, tasks, lengths):
        paths = [str(m) for m in models]
        return run.EvalConfig(
            model=paths,
            tasks=tasks,
            lengths=lengths,
            trials=1,
            targets=64,
            out=str(out),
            resume=True,
        )

    fresh = [
        run.evaluate(config(tmp_path / "fresh", ["ppl"], [128, 256])),
        run.evaluate(config(tmp_path / "fresh", ["passkey"], [256]), {}),
    ]
    loaded = {}
    shared = [run.evaluate(config(tmp_path / "shared", ["ppl"], [128, 256]), loaded)]
    assert set(loaded) == set(models)

    def refuse(path):
        raise AssertionError(f"{path} loaded again")

    monkeypatch.setattr(run, "load", refuse)
    shared.append(run.evaluate(config(tmp_path / "shared", ["passkey"], [256]), loaded))

    def measured(records):
        keep = ("task", "length", "perplexity", "accuracy")
        return [{k: r.get(k) for k in keep} for r in records]

    assert [measured(r) for r in shared] == [measured(r) for r in fresh]


def test_flags_take_commas_and_repeats(models, tmp_path):
    import argparse

    from longswap.config import add_arguments, from_arguments
    from longswap.evaluate.run import EvalConfig

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


def test_a_report_of_skipped_records_only(tmp_path):
    """Every record skipped (beyond a learned table): results.json and report.md, no plots."""
    model = make_model("gpt2", vocab_size=257)  # 64 learned positions
    model.save_pretrained(tmp_path / "gpt2")
    byte_tokenizer().save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "eval"
    args = ["eval", "--model", str(tmp_path / "gpt2"), "--tasks", "passkey", "ppl", "speed"]
    assert main([*args, "--lengths", "128", "--out", str(out)]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert records and all("skipped" in r for r in records)
    report = (out / "report.md").read_text()
    assert "Skipped: gpt2 at 128: length 128 is beyond the 64 learned positions" in report
    assert "![]" not in report and not list(out.glob("*.png"))


def test_speed_times_each_decode_step_with_the_cache(models):
    base, _ = models
    model = longswap.load(base).eval()
    record = decode_speed(model, 256)
    assert record["decode_steps"] == 16 and record["prefill_tokens"] == 256 - 17
    assert record["decode_tokens_per_s"] == pytest.approx(1e3 / record["decode_step_ms"])
    # The cache holds keys and values of every layer for the whole context but the last token.
    c = model.config
    per_token = (
        2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    )
    assert record["cache_mb"] * 2**20 == per_token * 255 * 4  # float32


def test_eval_builds_the_kernels_before_any_timed_call(models, tmp_path, monkeypatch):
    from transformers import GenerationMixin

    from longswap.evaluate import run, speed

    _, swapped = models
    events = []
    monkeypatch.setattr(run, "build_all", lambda: events.append("build"))
    monkeypatch.setattr(speed, "build_all", lambda: events.append("build"))
    generate = GenerationMixin.generate

    def recorded(self, *args, **kwargs):
        events.append("generate")
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recorded)
    args = ["eval", "--model", str(swapped), "--tasks", "speed", "--lengths", "64"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    # once for the run, once more (cached) in the task; a warm-up, then the timed call
    assert events == ["build", "build", "generate", "generate"]


def test_speed_decodes_a_swapped_model_with_its_sparse_cache():
    model = make_model("llama", vocab_size=257, max_position_embeddings=512)
    dense = decode_speed(model, 256)
    longswap.swap_attention(model, "sliding_window(window=32, sinks=4)")
    window = decode_speed(model, 256)
    # sinks + window - 1 entries, plus 64 of spare room, of 255
    assert window["cache_mb"] == pytest.approx(dense["cache_mb"] * (4 + 31 + 64) / 255)


def test_speed_stays_within_extended_positions_without_a_length_warning():
    import logging

    from transformers.utils import logging as hf_logging

    model = make_model("llama", vocab_size=257, max_position_embeddings=512)
    longswap.swap_attention(model, "block_topk(block_size=64, top_k=2)", max_length=1024)
    assert model.config.max_position_embeddings == 1024  # RoPE extended from 512
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    root = hf_logging.get_logger("transformers")
    root.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # transformers says each warning once per process
    try:
        decode_speed(model, 1024)
    finally:
        root.removeHandler(handler)
    assert not [m for m in seen if "predefined maximum length" in m]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--trials", "0"], "--trials must be at least 1, got 0"),
        (["--depths", "1.5"], "--depths must lie within [0, 1]"),
        (["--depths", "-0.1"], "--depths must lie within [0, 1]"),
        (["--lengths", "0"], "--lengths must be positive token counts, got [0]"),
        (["--lengths", "-64"], "--lengths must be positive token counts, got [-64]"),
        (["--targets", "0"], "--targets must be at least 1, got 0"),
        (["--spread", "0"], "--spread must be at least 1, got 0"),
    ],
)
def test_eval_refuses_bad_settings_before_any_work(models, tmp_path, capsys, flags, message):
    base, _ = models
    out = tmp_path / "o"
    assert main(["eval", "--model", str(base), "--tasks", "ppl", "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("out", "message"), [("", "is the same path as --model"), ("eval", "lies inside --model")]
)
def test_eval_refuses_to_write_into_a_model_folder(models, capsys, out, message):
    base, _ = models
    before = sorted(p.name for p in base.iterdir())
    assert main(["eval", "--model", str(base), "--tasks", "ppl", "--out", str(base / out)]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in base.iterdir()) == before


def test_eval_writes_beside_the_models_it_holds(models, tmp_path):
    base, _ = models
    args = ["eval", "--model", str(base), "--tasks", "ppl", "--lengths", "64"]
    assert main([*args, "--targets", "32", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.json").is_file()


def test_eval_refuses_too_little_text_for_the_targets(models, tmp_path, capsys):
    base, _ = models
    (tmp_path / "small.txt").write_text("x = 1\n" * 300)
    args = ["eval", "--model", str(base), "--tasks", "ppl", "--data", str(tmp_path / "small.txt")]
    assert main([*args, "--targets", "5000", "--out", str(tmp_path / "o")]) == 2
    assert "hold only 625 of the 5000 targets" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"text": "a b"}\n{"text": "c\n', "bad.jsonl, line 2: not valid JSON"),
        ("numbers.json", "[1, 2, 3]", "numbers.json, row 1 is 1, not an object"),
    ],
)
def test_eval_names_the_file_and_line_of_a_malformed_data_file(
    models, tmp_path, capsys, name, content, message
):
    base, _ = models
    (tmp_path / name).write_text(content)
    args = ["eval", "--model", str(base), "--tasks", "ppl", "--data", str(tmp_path / name)]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content", ["{}", "not json", '{"records": [1, 2]}'])
def test_resume_names_a_corrupted_results_file(models, tmp_path, capsys, content):
    base, _ = models
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.json").write_text(content)
    args = ["eval", "--model", str(base), "--tasks", "ppl", "--out", str(out), "--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{out / 'results.json'} is not a longswap results file" in err
    assert (out / "results.json").read_text() == content  # left as it was


def test_a_full_disk_while_recording_keeps_every_earlier_record(models, tmp_path, capsys):
    base, _ = models
    args = ["eval", "--model", str(base), "--tasks", "ppl", "--targets", "64", "--lengths", "64"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one_record = (tmp_path / "one" / "results.json").stat().st_size
    out = tmp_path / "two"

    def small_disk():  # no file may grow past one record and a little
        resource.setrlimit(resource.RLIMIT_FSIZE, (one_record + 200, one_record + 200))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails with EFBIG

    args += ["128", "--out", str(out)]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    cut = [sys.executable, "-m", "longswap", *args]
    assert subprocess.run(cut, env=env, preexec_fn=small_disk, capture_output=True).returncode
    records = json.loads((out / "results.json").read_text())["records"]  # whole, not cut
    assert [r["length"] for r in records] == [64]
    assert [p.name for p in out.iterdir()] == ["results.json"]  # no temporary file left
    assert main([*args, "--resume"]) == 0
    assert [r["length"] for r in json.loads((out / "results.json").read_text())["records"]] == [
        64,
        128,
    ]


def test_eval_refuses_an_unwritable_out(models, tmp_path, capsys):
    base, _ = models
    blocker = tmp_path / "file"
    blocker.write_text("")
    for out, message in (
        (blocker / "eval", f"{blocker} is a file, not a folder"),
        (blocker, f"{blocker} is a file, not a folder"),
        ("/proc/longswap-eval", "cannot be written (/proc"),
    ):
        assert main(["eval", "--model", str(base), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err


def test_memory_plot_keeps_zeros_on_a_linear_axis(tmp_path, monkeypatch):
    import matplotlib.axes

    from longswap.evaluate.report import line_plot

    scales = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_yscale", lambda self, s: scales.append(s))
    rows = [
        {"model": "m", "length": n, "peak_memory_mb": v} for n, v in ((512, 0.0), (4096, 900.0))
    ]
    line_plot(rows, "peak_memory_mb", "MB", tmp_path / "a.png")
    assert scales == []  # a log axis would drop the zero
    rows[0]["peak_memory_mb"] = 1.0
    line_plot(rows, "peak_memory_mb", "MB", tmp_path / "b.png")
    assert scales == ["log"]
