"""``--smoke``, shared by every benchmark: a tiny run that checks the script still works.

Sizes shrink to seconds and repeats to one; the record goes to ``--out``, which must lie
outside ``benchmarks/results`` so that the committed measurements are never overwritten.
``tests/test_benchmarks.py`` runs each benchmark this way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def add_smoke_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--smoke`` to a benchmark's arguments."""
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes and one repeat, to check that the script runs (needs an --out "
        "outside benchmarks/results)",
    )


def apply_smoke(
    parser: argparse.ArgumentParser, args: argparse.Namespace, **tiny: object
) -> argparse.Namespace:
    """``args`` with the ``tiny`` settings when ``--smoke`` is given, else unchanged.

    Stops with a usage error when a smoke run would write into ``benchmarks/results``.
    """
    if not args.smoke:
        return args
    if args.out.resolve().is_relative_to(RESULTS):
        parser.error(
            f"--smoke would overwrite {args.out}; give --out a path outside {RESULTS} "
            "(for instance /tmp/smoke.json)"
        )
    return argparse.Namespace(**(vars(args) | tiny))
