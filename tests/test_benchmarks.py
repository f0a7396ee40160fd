"""Every benchmark script runs end to end in its ``--smoke`` mode and writes its record."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ATTENTION_PATTERNS = [
    "full",
    "sliding_window",
    "dilated",
    "local_global",
    "bigbird",
    "shifted_groups",
    "block_topk",
    "learned_topk",
    "learned_topk_pieces",
]


def smoke(script: str, out: Path, *extra: str) -> dict:
    """Run ``benchmarks/<script>.py --smoke`` and return the JSON record it wrote."""
    # One thread: two threads spin against each other on a busy machine (50x slower
    # decoding); no first-use compilation of the window kernel in a subprocess.
    env = os.environ | {"OMP_NUM_THREADS": "1", "LONGSWAP_CPU_KERNEL": "0"}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), "--smoke", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_attention(tmp_path):
    record = smoke("attention", tmp_path / "attention.json", "--backends", "blocks")
    rows = record["results"]
    assert [r["name"] for r in rows] == ["sdpa_causal", "sdpa_dense_mask", *ATTENTION_PATTERNS]
    assert {r["length"] for r in rows} == {256}
    for row in rows:
        assert row["fwd"]["s"] > 0 and row["fwd_bwd"]["s"] > 0 and row["fwd_speedup"] > 0
        assert len(row["fwd"]["runs"]) == 1
    assert [b["pattern"] for b in record["build"]] == ATTENTION_PATTERNS


def test_decode(tmp_path):
    record = smoke("decode", tmp_path / "decode.json")
    assert record["complete"]  # written after every context, marked complete at the end
    rows = record["results"]
    assert [r["arm"] for r in rows] == [
        "dense",
        "window-1024",
        "moba-64x16",
        "learned-64x16",
        "window-512+learned-64x16",
    ]
    assert all(r["context"] == 1100 and r["decode_tokens_per_s"] > 0 for r in rows)
    dense, window, *selections = (r["cache_mb"] for r in rows)
    # sinks + window - 1, plus 64 entries of spare room, of 1099
    assert window == pytest.approx(dense * (4 + 1023 + 64) / 1099)
    assert all(c > dense for c in selections)  # every key, plus one summary per block


def test_finetune(tmp_path):
    rows = smoke("finetune", tmp_path / "finetune.json")["results"]
    assert [r["arm"] for r in rows] == ["full (SDPA)", "sliding_window(512)", "block_topk(128, 4)"]
    assert all(r["length"] == 256 and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["speedup"] == 1.0


def test_memory(tmp_path):
    record = smoke("memory", tmp_path / "memory.json")
    rows = {r["arm"]: r for r in record["results"]}
    assert list(rows)[0] == "dense (SDPA)" and len(rows) == 4
    for row in rows.values():
        small, large = row["saved_bytes"]
        assert 0 < small < large and row["per_token"] == (large - small) / 1024
    estimate = record["estimate_7b"]["gib_per_gpu"]
    one, eight = estimate["dense (SDPA) on 1"], estimate["dense (SDPA) on 8"]
    assert one["layer checkpoints"] == 65536 * 4096 * 2 * 32 / 2**30  # 16 GiB
    assert eight["full fine-tune states"] == pytest.approx(one["full fine-tune states"] / 8)


def test_small_calls(tmp_path):
    rows = smoke("small_calls", tmp_path / "small_calls.json")["results"]
    assert [(r["q_len"], r["kv_len"]) for r in rows] == [(1, 512)] * 4 + [(64, 64)] * 4
    for row in rows:
        assert row["reference"] > 0 and row["blocks"] > 0
        assert row["faster"] in ("reference", "blocks") and row["auto"] in ("reference", "blocks")


def test_smoke_never_overwrites_committed_results(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("smoke", BENCHMARKS / "smoke.py")
    smoke_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke_module)
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "results" / "attention.json")
    parser.add_argument("--repeats", type=int, default=3)
    smoke_module.add_smoke_flag(parser)
    with pytest.raises(SystemExit):
        smoke_module.apply_smoke(parser, parser.parse_args(["--smoke"]), repeats=1)
    assert "give --out a path outside" in capsys.readouterr().err
    args = parser.parse_args(["--smoke", "--out", str(tmp_path / "a.json")])
    assert smoke_module.apply_smoke(parser, args, repeats=1).repeats == 1
    assert smoke_module.apply_smoke(parser, parser.parse_args([]), repeats=1).repeats == 3
