"""The ``longswap`` command line: one table of subcommands, each a typed function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def cmd_patterns(plot: Path | None = None, length: int = 2048) -> int:
    """List the pattern catalogue; with ``--plot DIR``, write one PNG per pattern there."""
    from longswap.patterns.catalogue import CATALOGUE

    for name, (example, about) in CATALOGUE.items():
        print(f"{name:16s} {about}\n{'':16s} e.g. {example}")
    if plot is not None:
        from longswap.plots import plot_pattern

        if plot.exists() and not plot.is_dir():
            print(f"error: --plot {plot} exists and is not a directory", file=sys.stderr)
            return 2
        for name, (example, _) in CATALOGUE.items():
            written = plot_pattern(example, plot / f"{name}.png", length=length)
            print(f"wrote {written}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longswap",
        description="Swap dense attention for sparse attention, fine-tune, and measure.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("patterns", help=cmd_patterns.__doc__, description=cmd_patterns.__doc__)
    p.add_argument("--plot", type=Path, metavar="DIR", help="write one PNG per pattern into DIR")
    p.add_argument("--length", type=int, default=2048, help="tokens shown in each picture")
    p.set_defaults(run=lambda a: cmd_patterns(a.plot, a.length))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``longswap`` command."""
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
