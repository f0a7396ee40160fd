"""``longswap demo``: the study of five arms (six with ``--learned``) on the embedded model or
any dense checkpoint (``config``, ``study``), judged (``verdict``) and reported (``report``)."""

from longswap.demo.config import DEFAULT_PATTERN, EMBEDDED_MODEL, DemoConfig
from longswap.demo.report import report
from longswap.demo.study import run_demo
from longswap.demo.verdict import ARMS, sees_every_depth, verdict

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
