"""The ``longswap`` command line: one table of subcommands, each a typed function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from longswap.cli_flags import (
    BASE_HELP,
    Deferred,
    config_flags,
    flat,
    generate_flags,
    harness_flags,
    plain,
    serve_flags,
    swap_flags,
)


def cmd_patterns(plot: Path | None = None, length: int = 2048) -> int:
    """List the pattern catalogue; with ``--plot DIR``, write one PNG per pattern there."""
    from longswap.patterns.catalogue import CATALOGUE

    if plot is not None:
        problem = _plot_folder_problem(plot, length)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    for name, (example, about) in CATALOGUE.items():
        print(f"{name:16s} {about}\n{'':16s} e.g. {example}")
    if plot is not None:
        from longswap.plots import plot_pattern

        for name, (example, _) in CATALOGUE.items():
            written = plot_pattern(example, plot / f"{name}.png", length=length)
            print(f"wrote {written}")
    return 0


def _plot_folder_problem(plot: Path, length: int) -> str | None:
    """What keeps ``patterns --plot`` from writing into ``plot`` (created here), or None."""
    if length < 1:
        return f"--length must be a positive token count, got {length}"
    if plot.exists() and not plot.is_dir():
        return f"--plot {plot} exists and is not a directory"
    try:
        plot.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"--plot {plot} cannot be created ({err.strerror}); give a folder you can write"
    return None


def cmd_swap(
    model: Path,
    pattern: str,
    out: Path,
    max_length: int | None = None,
    rope: str = "auto",
    backend: str = "auto",
    layers: list[int] | None = None,
    full_layers: list[int] | None = None,
    block_size: int = 128,
    overwrite: bool = False,
) -> int:
    """Swap a checkpoint's attention and write the converted checkpoint to ``--out``."""
    from longswap.checkpoint import model_problem
    from longswap.io import (
        check_output_dir,
        leftover_problems,
        output_problem,
        overlap_problems,
        save_checkpoint,
    )
    from longswap.patterns import parse_pattern
    from longswap.swap import load, swap_attention

    # A bad pattern, model or output folder fails before the model is read.
    found = [problem] if (problem := model_problem(model)) else []
    found += overlap_problems(out, [("--model", model)])
    found += [problem] if (problem := output_problem(out)) else []
    found += leftover_problems(out)
    try:
        parse_pattern(pattern)
        check_output_dir(out, overwrite)
    except ValueError as err:
        found.append(str(err))
    if found:
        raise ValueError("cannot swap:\n- " + "\n- ".join(found))
    loaded = load(model)
    report = swap_attention(
        loaded,
        pattern,
        backend=backend,
        layers=layers,
        full_layers=full_layers or (),
        max_length=max_length,
        rope=rope,
        block_size=block_size,
    )
    save_checkpoint(loaded, out, source=model, overwrite=overwrite)
    print(report)
    print(f"wrote {out}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Pre-train a small byte-level Llama with full attention (the dense base)."""
    from longswap.config import from_arguments
    from longswap.train import PretrainConfig, pretrain

    record = pretrain(from_arguments(PretrainConfig, args))
    print(
        f"trained {record['parameters']:,} parameters; held-out loss {record['eval_loss']:.3f} "
        f"({record['eval_bits_per_byte']:.3f} bits per byte); wrote {record['config']['out']}"
    )
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a (swapped) model on long sequences; --pattern swaps first."""
    from longswap.config import from_arguments
    from longswap.train import FinetuneConfig, finetune

    record = finetune(from_arguments(FinetuneConfig, args))
    for note in record["notes"]:
        print(note)
    print(
        f"trained {record['trainable_parameters']:,} of {record['parameters']:,} parameters; "
        f"held-out loss {record['eval_loss']:.3f}; wrote {record['config']['out']}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate models: perplexity vs length, passkey, recall, speed; results.json + report."""
    from longswap.config import from_arguments
    from longswap.evaluate.run import EvalConfig, evaluate

    config = from_arguments(EvalConfig, args)
    records = evaluate(config)
    skipped = sum("skipped" in r for r in records)
    print(
        f"{len(records)} records ({skipped} skipped) in {config.out}/results.json; "
        f"report: {config.out}/report.md"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo study on the embedded model or ``--model`` (five arms, six with --learned):
    swap, fine-tune, evaluate, report."""
    from longswap.config import from_arguments
    from longswap.demo import DemoConfig, run_demo
    from longswap.demo.report import outcome

    results = run_demo(from_arguments(DemoConfig, args))
    for v in results["verdict"]:
        print(f"- {v['claim']}: {outcome(v['holds'], emphasis='')}\n    {v['measured']}")
    if results["config"]["quick"]:
        print("(a --quick smoke run: its verdict says little; `longswap demo` runs the study)")
    return 0


def cmd_generate(
    model: Path,
    prompt_file: Path | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int,
    device: str = "auto",
    dtype: str = "auto",
    base: Path | None = None,
) -> int:
    """Continue a prompt (--prompt-file, else standard input) with a model folder, a LoRA
    output of finetune or a .gguf file, streaming the text to stdout; a swapped model
    decodes through its sparse cache. Speeds and the cache's size go to stderr."""
    from longswap.generate import Sampling, generate, load_for_generation, read_prompt

    sampling = Sampling(max_new_tokens, temperature, top_p, top_k, seed)
    prompt = read_prompt(model, prompt_file, sampling)
    loaded, tokenizer = load_for_generation(model, device, dtype, base)
    result = generate(loaded, tokenizer, prompt, sampling, write=_write)
    _write("" if result.text.endswith("\n") else "\n")
    print(result.summary(), file=sys.stderr)
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_merge(model: Path, out: Path, overwrite: bool = False, base: Path | None = None) -> int:
    """Merge the LoRA(+) adapter of a finetune output into a plain checkpoint that
    longswap.load reads as the same swapped model."""
    from longswap.merge import merge

    print(f"wrote {merge(model, out, overwrite, base)}")
    return 0


def cmd_harness(args: argparse.Namespace) -> int:
    """Run lm-evaluation-harness on a swapped model, a LoRA output, a .gguf file or a dense
    model, offline, with longswap's attention registered; --tasks long-context runs RULER's
    offline synthetic tasks and longswap's passkey at --lengths. Needs longswap[harness]."""
    from longswap.harness import HarnessConfig, run_harness

    fields = vars(args).keys() & HarnessConfig.__dataclass_fields__.keys()
    record = run_harness(HarnessConfig(**{name: getattr(args, name) for name in fields}))
    for task, metrics in record["results"].items():
        shown = ", ".join(
            f"{name.split(',')[0]} {value:.3f}"
            for name, value in metrics.items()
            if isinstance(value, float) and "stderr" not in name and value >= 0
        )
        print(f"{task}: {shown}")
    print(f"wrote {args.out} (pattern: {record['pattern']})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a swapped model, a LoRA output, a .gguf file or a dense model through
    transformers' OpenAI-compatible server (/v1/completions, /v1/chat/completions), every
    request attending through the model's pattern. Needs longswap[serve]."""
    from longswap.serve import serve

    serve(args.model, args.host, args.port, args.device, args.dtype, args.base)
    return 0


def cmd_env() -> int:
    """Print what a bug report needs: versions, device, CPU capability, threads, and the
    state of the C++ kernels."""
    from longswap.environment import bug_report

    report = bug_report()
    width = max(map(len, report))
    for name, value in report.items():
        print(f"{name:{width}s}  {value}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from longswap import __version__

    parser = argparse.ArgumentParser(
        prog="longswap",
        description="Swap dense attention for sparse attention, fine-tune, and measure.",
    )
    parser.add_argument("--version", action="version", version=f"longswap {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Deferred
    )
    p = sub.add_parser("patterns", help=plain(cmd_patterns), description=plain(cmd_patterns))
    p.add_argument("--plot", type=Path, metavar="DIR", help="write one PNG per pattern into DIR")
    p.add_argument(
        "--length", type=int, default=2048, help="tokens shown in each picture (default: 2048)"
    )
    p.set_defaults(run=lambda a: cmd_patterns(a.plot, a.length))

    p = sub.add_parser("swap", help=plain(cmd_swap), description=plain(cmd_swap), flags=swap_flags)
    p.set_defaults(
        run=lambda a: cmd_swap(
            a.model,
            a.pattern,
            a.out,
            a.max_length,
            a.rope,
            a.backend,
            flat(a.layers),
            flat(a.full_layers),
            a.block_size,
            a.overwrite,
        )
    )

    for name, command, module, config in (
        ("pretrain", cmd_pretrain, "longswap.train.config", "PretrainConfig"),
        ("finetune", cmd_finetune, "longswap.train.config", "FinetuneConfig"),
        ("eval", cmd_eval, "longswap.evaluate.run", "EvalConfig"),
        ("demo", cmd_demo, "longswap.demo", "DemoConfig"),
    ):
        p = sub.add_parser(name, help=command.__doc__, flags=config_flags(module, config))
        p.set_defaults(run=command)

    p = sub.add_parser(
        "generate",
        help=plain(cmd_generate),
        description=plain(cmd_generate),
        flags=generate_flags,
    )
    p.set_defaults(
        run=lambda a: cmd_generate(
            a.model,
            a.prompt_file,
            a.max_new_tokens,
            a.temperature,
            a.top_p,
            a.top_k,
            a.seed,
            a.device,
            a.dtype,
            a.base,
        )
    )
    p = sub.add_parser("merge", help=plain(cmd_merge), description=plain(cmd_merge))
    p.add_argument("--model", type=Path, required=True, help="output folder of a LoRA finetune")
    p.add_argument("--out", type=Path, required=True, help="folder for the merged checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--base", type=Path, help=BASE_HELP)
    p.set_defaults(run=lambda a: cmd_merge(a.model, a.out, a.overwrite, a.base))
    p = sub.add_parser(
        "harness", help=plain(cmd_harness), description=plain(cmd_harness), flags=harness_flags
    )
    p.set_defaults(run=cmd_harness)
    p = sub.add_parser(
        "serve", help=plain(cmd_serve), description=plain(cmd_serve), flags=serve_flags
    )
    p.set_defaults(run=cmd_serve)
    p = sub.add_parser("env", help=plain(cmd_env), description=plain(cmd_env))
    p.set_defaults(run=lambda a: cmd_env())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``longswap`` command."""
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
