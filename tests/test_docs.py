"""The results tables of README.md and docs/ match the committed results files."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "render_docs.py"
SPEED = Path("benchmarks/results/real_model_speed.json")


def render_docs():
    spec = importlib.util.spec_from_file_location("render_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tables_in_readme_and_docs_are_rendered_from_the_results_files():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, (
        "a table in README.md or docs/ differs from benchmarks/results: run "
        f"`python benchmarks/render_docs.py`\n{done.stdout}{done.stderr}"
    )


def test_every_marked_table_is_known_and_every_page_has_one():
    module = render_docs()
    names = set()
    for page in module.documents(ROOT):
        text = page.read_text()
        names |= {part.split("-->")[0].strip() for part in text.split("<!-- render:")[1:]}
    assert names <= set(module.TABLES)
    assert {"real-model-summary", "demo-verdict", "real-model-speed"} <= names


@pytest.fixture
def copy(tmp_path):
    """README, docs and the inputs of the renderer, copied to a scratch root."""
    for name in ("README.md", "docs", "benchmarks/results", "benchmarks/real_model.py"):
        source, target = ROOT / name, tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy(source, target)
    return tmp_path


def test_check_fails_on_a_changed_cell_and_render_mends_it(copy):
    module = render_docs()
    readme = copy / "README.md"
    text = readme.read_text()
    start = text.index("<!-- render:real-model-summary -->")
    row = text.index("\n| ", text.index("|---", start)) + 1
    readme.write_text(text[:row] + "| drifted " + text[row + 1 :])
    assert module.render(copy, check=True) == ["README.md"]
    assert module.main(["--check", "--root", str(copy)]) == 1
    assert module.render(copy) == ["README.md"]
    assert readme.read_text() == text
    assert module.render(copy, check=True) == []


def test_the_speed_table_renders_with_and_without_its_results_file(copy):
    module = render_docs()
    (copy / SPEED).unlink(missing_ok=True)
    module.render(copy)
    assert module.render(copy, check=True) == []
    assert "Not measured yet" in module.render_real_model_speed(copy)
    rows = [
        {
            "arm": arm,
            "pattern": pattern,
            "dtype": dtype,
            "length": 8192,
            "pass": kind,
            "seconds": [seconds * slower],
            "min_seconds": seconds * slower,
            "median_seconds": seconds * slower,
            "max_seconds": seconds * slower,
            "peak_memory_mb": 1000.0,
        }
        for arm, pattern, seconds in (
            ("dense", "dense (SDPA)", 20.0),
            ("window-1024", "sliding_window(window=1024, sinks=4)", 10.0),
        )
        for dtype, slower in (("float32", 1.0), ("bfloat16", 0.5))
        for kind in ("forward", "train lora-plus")
    ]
    environment = {"torch": "2.13.0+cpu", "device": "Some CPU", "threads": 2, "time": "2027-01-01"}
    record = {"command": "python benchmarks/real_model_speed.py"}
    record |= {"environment": environment, "rows": rows}
    (copy / SPEED).write_text(json.dumps(record))
    assert module.render(copy, check=True)  # the placeholder no longer matches
    module.render(copy)
    assert module.render(copy, check=True) == []
    table = module.render_real_model_speed(copy)
    assert "| window-1024 | float32 |" in table and "Some CPU" in table
    # float32: 2x its dense, as fast as bfloat16's dense; bfloat16: 2x its dense, 2x the fastest
    assert "| 2.00x | 1.00x |" in table and "| 2.00x | 2.00x |" in table


def test_an_unknown_or_unclosed_marker_is_an_error(copy):
    module = render_docs()
    page = copy / "docs" / "extra.md"
    page.write_text("<!-- render:no-such-table -->\n<!-- /render:no-such-table -->\n")
    with pytest.raises(ValueError, match="unknown table"):
        module.render(copy, check=True)
    page.write_text("<!-- render:demo-verdict -->\n")
    with pytest.raises(ValueError, match="has no"):
        module.render(copy, check=True)


def test_the_renderer_knows_the_demos_defaults():
    """A committed demo's command names the fields that differ from the defaults, so the
    renderer's copy of them (it imports no torch) must be ``DemoConfig``'s."""
    from dataclasses import asdict

    from longswap.demo import DemoConfig

    defaults = {
        k: v for k, v in asdict(DemoConfig()).items() if k not in ("out", "overwrite", "restart")
    }
    assert defaults == render_docs().DEMO_DEFAULTS
    command = render_docs().demo_command(
        {"config": defaults | {"model": "/x/SmolLM2.gguf", "lengths": [4096, 8192], "quick": True}}
    )
    assert command == 'longswap demo --model "$SMOL" --quick --lengths 4096,8192'


def test_the_default_choice_paragraph_refuses_numbers_that_contradict_it(copy):
    """The README says why the default is the mean-key union from the SmolLM2 numbers; when
    they say the learned union is the cheaper one, rendering stops instead of rewriting a
    reason that no longer holds."""
    module = render_docs()
    assert "mean-key union" in module.render_default_choice(copy)
    demo = copy / "docs/demo-smollm2/demo.json"
    record = json.loads(demo.read_text())
    dense = record["cost"]["5-dense-finetune"]["cpu_seconds"]
    record["cost"]["6-learned-finetune"]["cpu_seconds"] = dense / 2
    demo.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="re-decide the default"):
        module.render_default_choice(copy)
    assert module.main(["--check", "--root", str(copy)]) == 2


def test_prose_says_where_an_arm_stands_at_each_length():
    module = render_docs()

    class Run:  # the two lengths beyond the fine-tuning length, and a perplexity per arm
        beyond = [8192, 16384]

        @staticmethod
        def ppl(arm, n):
            return {("a", 8192): 8.0, ("a", 16384): 9.5, ("b", 8192): 9.0}.get((arm, n), 9.0)

    assert module.standing(Run, "a", "b", "the base") == (
        "ahead of the base at 8k (8.00 against 9.00) and behind it at 16k (9.50 against 9.00)"
    )
    assert module.standing(Run, "b", "b", "itself").startswith("behind itself at 8k (9.00")
