"""``longswap demo``: the study of five arms (six with ``--learned``) on the embedded model
(``study``), judged and reported (``verdict``)."""

from longswap.demo.study import DEFAULT_PATTERN, EMBEDDED_MODEL, DemoConfig, run_demo
from longswap.demo.verdict import ARMS, report, sees_every_depth, verdict

__all__ = [
    "ARMS",
    "DEFAULT_PATTERN",
    "EMBEDDED_MODEL",
    "DemoConfig",
    "report",
    "run_demo",
    "sees_every_depth",
    "verdict",
]
