"""One trained arm of the demo: its ``longswap finetune`` run in a child process, with its
progress on the console, and its cost (CPU and wall seconds, peak memory) from the child's
resource usage; a child that fails says how (its exit status, or the signal that ended it,
and whether that was most likely the kernel's out-of-memory killer)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from longswap.train.budget import machine_gb

#: A Trainer progress bar in a fine-tuning log: ``n/total [``.
_BAR = re.compile(r"(\d+)/(\d+) \[")
#: The line of a fine-tuning log with its budget's estimate (memory and time of a step).
_BUDGET = re.compile(r"^budget: .*$", re.MULTILINE)
#: Seconds between two progress lines of a fine-tuning arm on the console.
PROGRESS_EVERY = 15.0
#: A child killed by SIGKILL whose peak memory reached this share of the machine's was most
#: likely killed for memory.
NEAR_THE_LIMIT = 0.8


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _steps_done(log: Path, steps: int) -> int:
    """Steps done according to the Trainer's progress bar (``n/steps [``) in ``log``: the
    most any bar of ``steps`` shows (a later bar of that total, such as the writing of one
    model shard at 0/1 after one step, does not take the count back)."""
    done = [
        int(n) for n, total in _BAR.findall(log.read_text(errors="replace")) if int(total) == steps
    ]
    return max(done, default=0)


def _progress(arm: str, done: int, steps: int, rate: float | None, log: Path) -> str:
    """A console line: steps done of ``steps``, time left at ``rate`` seconds a step, the log."""
    if done == steps:
        state = "validating and saving"
    elif rate is None:
        state = "starting" if done == 0 else "estimating the time left"
    else:
        state = f"about {rate * (steps - done):.0f} s left"
    return f"{arm}: step {done}/{steps}, {state} (log: {log})"


def _run_child(argv: list[str], log: Path, arm: str, steps: int) -> tuple[int, Any, float]:
    """Run ``argv`` (one arm's fine-tuning), printing its progress and its budget line;
    returns status, rusage, wall seconds."""
    began = time.perf_counter()
    with log.open("w") as sink:
        child = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
        shown, said, first = -1, began, None  # first: (time, steps) when a step was first seen
        budget_shown = False
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                return status, usage, time.perf_counter() - began
            time.sleep(0.5)
            if not budget_shown and (budget := _BUDGET.search(log.read_text(errors="replace"))):
                _say(f"{arm}: {budget.group(0)}")
                budget_shown = True
            done, now = _steps_done(log, steps), time.perf_counter()
            if done and first is None:
                first = (now, done)
            if done != shown and (now - said >= PROGRESS_EVERY or done in (0, steps)):
                rate = (now - first[0]) / (done - first[1]) if first and done > first[1] else None
                _say(_progress(arm, done, steps, rate, log))
                shown, said = done, now


def _oom_kills() -> int | None:
    """The kernel's count of processes it killed for memory (``oom_kill`` in /proc/vmstat)."""
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def how_it_ended(status: int, peak_mb: float, oom_kills: int | None = None) -> str:
    """What a child's wait ``status`` says, for a failure message: its exit status, or the
    signal that killed it; for SIGKILL, whether the kernel most likely killed it for memory
    (its peak ``peak_mb`` near the machine's memory, or ``oom_kills`` more kills for memory
    since it started)."""
    if not os.WIFSIGNALED(status):
        return f"exit status {os.waitstatus_to_exitcode(status)}"
    number = os.WTERMSIG(status)
    name = signal.Signals(number).name if number in signal.valid_signals() else str(number)
    said = f"killed by signal {name}"
    if number != signal.SIGKILL:
        return said
    machine = machine_gb(torch.device("cpu"))
    near = machine is not None and peak_mb / 1024 >= NEAR_THE_LIMIT * machine
    if near or oom_kills:
        of = f" of the machine's {machine:.1f} GB" if machine is not None else ""
        said += (
            f", most likely for memory (the kernel's out-of-memory killer): its peak was "
            f"{peak_mb / 1024:.1f} GB{of}; a shorter --seq-len needs less"
        )
    return said


def run_arm(
    argv: list[str], shown: list[str], log: Path, steps: int, failed_log: Path
) -> dict[str, Any]:
    """Run one arm's fine-tuning (``argv``: the process's command line, a ``longswap
    finetune`` run) in its own process; its wall and CPU time and peak memory.

    ``shown`` is the command as the report prints it (with the final output folder); a
    failure raises RuntimeError saying how the child ended, with the end of its log, and
    copies the log to ``failed_log``, since the staging folder goes away.
    """
    kills = _oom_kills()
    status, usage, wall = _run_child(argv, log, log.stem, steps)
    peak_mb = usage.ru_maxrss / 1024  # kilobytes on Linux
    if os.waitstatus_to_exitcode(status) != 0:
        shutil.copy2(log, failed_log)
        after = _oom_kills()
        ended = how_it_ended(status, peak_mb, after - kills if None not in (kills, after) else None)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(
            f"fine-tuning failed ({ended}): {shlex.join(shown)}\n"
            f"{tail or '(the log is empty)'}\n(log: {failed_log})"
        )
    record = json.loads((Path(argv[argv.index("--out") + 1]) / "longswap_train.json").read_text())
    return {
        "command": shlex.join(shown),
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "wall_seconds": wall,
        "train_seconds": record["train_seconds"],
        "tokens_per_second": record["train_tokens_per_second"],
        "tokens": record["config"]["steps"] * record["config"]["seq_len"],
        "peak_memory_mb": peak_mb,
        "validation_loss": record["eval_loss"],
        "notes": record["notes"],
    }


def _combined(stages: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm's cost from its stages' (a selector warm-up, then the fine-tuning): times
    added, the largest peak memory, the last stage's speed and validation loss."""
    last = stages[-1]
    return last | {
        "command": "\n".join(s["command"] for s in stages),
        "cpu_seconds": sum(s["cpu_seconds"] for s in stages),
        "wall_seconds": sum(s["wall_seconds"] for s in stages),
        "train_seconds": sum(s["train_seconds"] for s in stages),
        "peak_memory_mb": max(s["peak_memory_mb"] for s in stages),
        "notes": [n for s in stages for n in s["notes"]],
    }
