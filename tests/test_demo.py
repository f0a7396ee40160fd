"""``longswap demo``: the five-arm study end to end (quick), and its refusals."""

import json

import pytest
from safetensors.torch import load_file

from longswap.cli import main
from longswap.demo import ARMS, EMBEDDED_MODEL, sees_every_depth, verdict
from longswap.patterns import parse_pattern


def test_embedded_model_is_small_and_documented():
    weights = EMBEDDED_MODEL / "model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    assert sum(t.numel() for t in load_file(weights).values()) > 3_000_000
    record = json.loads((EMBEDDED_MODEL / "longswap_train.json").read_text())
    assert record["command"].startswith("longswap pretrain") and record["config"]["seed"] == 0
    assert "longswap pretrain" in (EMBEDDED_MODEL / "MODEL.md").read_text()


def test_quick_demo_runs_all_arms_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "demo.json").read_text())
    assert [v["holds"] for v in results["verdict"]].count(None) <= 1
    assert all(v["measured"] and "nan" not in v["measured"] for v in results["verdict"])
    assert set(results["cost"]) == set(ARMS[2:])
    assert all(c["peak_memory_mb"] > 0 and c["train_seconds"] > 0 for c in results["cost"].values())
    for arm in ARMS:
        assert (out / "arms" / arm / "config.json").is_file()
    assert not (out / "random-init").exists()  # a temporary start, removed
    assert not list(out.glob("arms/*/checkpoints"))  # resume state of finished runs
    records = json.loads((out / "eval" / "results.json").read_text())["records"]
    assert {r["model"].rsplit("/", 1)[-1] for r in records} == set(ARMS)
    assert not [r for r in records if "skipped" in r]
    report = (out / "report.md").read_text()
    assert "## Verdict" in report and "eval/perplexity.png" in report
    assert "smoke run" in report
    assert (out / "eval" / "perplexity.png").is_file()
    assert "longswap finetune --model" in report
    printed = capsys.readouterr().out
    assert "Arm 3 beats arm 4" in printed
    # The same folder again: refused, then replaced with --overwrite.
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_demo_refuses_bad_inputs_before_any_work(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    args = ["demo", "--out", str(mine), "--overwrite", "--pattern", "sliding_window(window=0)"]
    assert main([*args, "--steps", "-1", "--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "window must be an integer >= 1" in err
    assert "not a model folder" in err and "steps must be" in err
    assert "not an earlier demo's" in err
    assert (mine / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("sliding_window(window=512)", False),
        ("sliding_window(window=512, sinks=4)", False),
        ("dilated(window=600, dilation=8)", True),
        ("block_topk(block_size=128, top_k=4)", True),
        ("sliding_window(window=64) | dilated(window=65, dilation=64)", True),
    ],
)
def test_long_range_reach(pattern, expected):
    assert sees_every_depth(parse_pattern(pattern), 4096) is expected


def _records(ppl, keys):
    """Eval records for the five arms: perplexity at 512/4096 and passkey at 4096."""
    rows = []
    for arm, (short, long) in zip(ARMS, ppl, strict=True):
        for length, value in ((512, short), (4096, long)):
            rows.append({"model": f"x/{arm}", "task": "ppl", "length": length, "perplexity": value})
    for arm, accuracy in zip(ARMS, keys, strict=True):
        rows.append({"model": f"x/{arm}", "task": "passkey", "length": 4096, "accuracy": accuracy})
    return rows


@pytest.mark.parametrize(
    ("ppl", "seconds", "keys", "expected"),
    [
        # Everything as the method promises.
        ([(6, 300), (6, 7), (5, 5), (5, 20), (5, 4.8)], 50, [0, 0, 1, 0, 1], [True] * 5),
        # Random init as good; arm 3 worse than the base; slow; no degradation; no retrieval.
        ([(6, 6.2), (6, 7), (7, 7), (7, 7), (5, 4)], 95, [0, 0, 0.5, 0, 1], [False] * 5),
    ],
)
def test_verdict_follows_the_numbers(ppl, seconds, keys, expected):
    cost = {ARMS[2]: {"train_seconds": seconds}, ARMS[4]: {"train_seconds": 100}}
    rows = verdict(_records(ppl, keys), cost, parse_pattern("block_topk(128, 4)"), 512, 4096)
    assert [r["holds"] for r in rows] == expected
    window = verdict(_records(ppl, keys), cost, parse_pattern("sliding_window(512)"), 512, 4096)
    assert window[4]["holds"] is None  # a window cannot reach 4096 tokens back
