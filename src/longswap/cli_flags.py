"""Flags of the ``longswap`` subcommands, added only when a subcommand is used, so that
``longswap --help`` imports neither the stages nor torch."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any


def plain(command: Callable[..., int]) -> str:
    """A command's docstring as help text: reStructuredText's double backticks dropped."""
    return (command.__doc__ or "").replace("``", "")


def flat(lists: list[list[int]] | None) -> list[int] | None:
    """The values of a list flag given as words and comma lists (``-1 -2`` or ``-1,-2``)."""
    return None if lists is None else [x for part in lists for x in part]


class Deferred(argparse.ArgumentParser):
    """A subcommand's parser that adds its flags when it is used (``flags``), so that
    ``longswap --help`` imports neither the stages nor torch."""

    def __init__(
        self,
        *args: Any,
        flags: Callable[[argparse.ArgumentParser], None] | None = None,
        **kwargs: Any,
    ) -> None:
        # No abbreviations: `--prompt` must not silently mean `--prompt-file`.
        super().__init__(*args, allow_abbrev=False, **kwargs)
        self._flags = flags

    def _ready(self) -> None:
        if self._flags is not None:
            add, self._flags = self._flags, None
            add(self)

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        """Parse, the flags added first."""
        self._ready()
        return super().parse_known_args(*args, **kwargs)

    def format_help(self) -> str:
        """The help text, the flags added first."""
        self._ready()
        return super().format_help()


def config_flags(module: str, name: str) -> Callable[[argparse.ArgumentParser], None]:
    """Flags (and description) from the config dataclass ``module.name``, imported when its
    command is used."""
    from longswap.config import add_arguments

    def add(parser: argparse.ArgumentParser) -> None:
        config = getattr(importlib.import_module(module), name)
        parser.description = config.__doc__
        add_arguments(parser, config)

    return add


def swap_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``longswap swap``."""
    from longswap.config import comma_list
    from longswap.kernels import BACKENDS
    from longswap.positions import ROPE_KINDS

    p.add_argument("--model", type=Path, required=True, help="local model folder or .gguf file")
    p.add_argument(
        "--pattern",
        required=True,
        help='pattern string, e.g. "sliding_window(window=4096, sinks=4)"',
    )
    p.add_argument("--out", type=Path, required=True, help="folder for the swapped checkpoint")
    p.add_argument(
        "--max-length",
        type=int,
        help="longest sequence to support (extends positions; default: the trained length)",
    )
    p.add_argument(
        "--rope",
        default="auto",
        choices=ROPE_KINDS,
        help="position extension beyond the trained length (default: auto)",
    )
    p.add_argument(
        "--backend", default="auto", choices=BACKENDS, help="attention backend (default: auto)"
    )
    # Lists as everywhere else: space- or comma-separated, the flag may repeat.
    p.add_argument(
        "--layers",
        type=comma_list(int),
        nargs="+",
        action="extend",
        help="swap only these layers (default: every layer)",
    )
    p.add_argument(
        "--full-layers",
        type=comma_list(int),
        nargs="+",
        action="extend",
        help="keep these layers dense (e.g. -1 -2, or --full-layers=-1,-2)",
    )
    p.add_argument("--block-size", type=int, default=128, help="kernel block size (default: 128)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


#: Help of ``--base``, of the commands that load a LoRA output.
BASE_HELP = (
    "where the base model of a LoRA output --model is now, if it moved since training (it "
    "must be the same model: its fingerprint is checked)"
)


def loaded_model_flags(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--dtype`` and ``--base``: the flags of every command that
    loads a model as ``longswap generate`` does (``generate.load_for_generation``)."""
    p.add_argument(
        "--model", type=Path, required=True, help="model folder, LoRA output folder or .gguf file"
    )
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:N, or auto: cuda when there is one (default: auto)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights' dtype; auto: float32 on CPU, bfloat16 on GPU (default: auto)",
    )
    p.add_argument("--base", type=Path, help=BASE_HELP)


def serve_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``longswap serve``."""
    loaded_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")


def generate_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``longswap generate`` (sampling defaults from ``Sampling``)."""
    from longswap.generate import Sampling

    loaded_model_flags(p)
    p.add_argument(
        "--prompt-file", type=Path, metavar="FILE", help="the prompt (default: standard input)"
    )
    defaults = Sampling()
    for flag, kind, text in (
        ("--max-new-tokens", int, "tokens to generate at most"),
        ("--temperature", float, "sampling temperature; 0 decodes greedily"),
        ("--top-p", float, "sample from the smallest set of tokens holding this probability"),
        ("--top-k", int, "sample among this many most likely tokens (0: no limit)"),
        ("--seed", int, "random seed of the sampling"),
    ):
        default = getattr(defaults, flag[2:].replace("-", "_"))
        p.add_argument(flag, type=kind, default=default, help=f"{text} (default: {default})")


def harness_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``longswap harness`` (lm-eval's own names where it has them)."""
    from longswap.config import comma_list
    from longswap.harness import PRESETS, HarnessConfig

    defaults = HarnessConfig(Path())
    loaded_model_flags(p)
    p.add_argument(
        "--tasks",
        type=comma_list(str),
        default=defaults.tasks,
        help=f"lm-eval tasks, or the preset {', '.join(PRESETS)} (RULER's offline synthetic "
        "tasks and longswap's passkey); comma-separated (default: long-context)",
    )
    p.add_argument(
        "--lengths",
        type=comma_list(int),
        default=defaults.lengths,
        help="prompt lengths in tokens of the long-context tasks, lm-eval's max_seq_lengths "
        "(default: 4096)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=defaults.out,
        help="JSON record to write (default: harness.json)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier record at --out")
    p.add_argument(
        "--limit", type=float, help="samples per task at most (below 1: a share), as in lm-eval"
    )
    p.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="prompts per batch (default: 1)"
    )
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (lm-eval's)")
    p.add_argument("--gen-kwargs", help="generation arguments, e.g. max_gen_toks=32 (lm-eval's)")
    p.add_argument("--include-path", type=Path, help="a folder of your own task YAML files")
    p.add_argument("--seed", type=int, default=defaults.seed, help="every seed lm-eval takes")
