"""Time budgets: each part gets a share of the suite's budget, checks it between items
(cooperative cut), and is interrupted by a timer a few seconds after its deadline if one item
overruns (hard cut). A part that runs out of time is reported as ``cut`` with what it finished,
never as failed."""

from __future__ import annotations

import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: seconds past its deadline after which a part that has not stopped by itself is interrupted
GRACE_S = 5.0


class Cut(BaseException):
    """A part's time is up. A ``BaseException``, so that code catching ``Exception`` (the
    benchmark's per-variant error handling) does not swallow it."""


@dataclass
class PartContext:
    """What a part runs with and what it records."""

    key: str
    device: torch.device
    tiny: bool
    root: Path  # the repository
    out_dir: Path  # what comes back: the report files
    work_dir: Path  # scratch (run directories), removed afterwards
    deadline: float  # time.monotonic() value
    #: part options from the command line (``--steptime-modes``)
    options: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def remaining(self) -> float:
        """Seconds left of this part's budget."""
        return self.deadline - time.monotonic()

    def check(self, what: str = "") -> None:
        """Raise :class:`Cut` when the budget is spent (call between items)."""
        if self.remaining() <= 0:
            raise Cut(f"budget spent before {what}" if what else "budget spent")

    def fail(self, message: str) -> None:
        """Record a correctness failure (the suite then exits non-zero)."""
        self.failures.append(message)

    def note(self, message: str) -> None:
        self.notes.append(message)


@dataclass(frozen=True)
class Part:
    """One part of the suite: report key, title, share of the budget, and its function."""

    key: str
    title: str
    share: float
    run: Callable[[PartContext], None]
    #: whether the part checks correctness (its failures fail the suite) or only measures
    checks: bool


def _alarm(_signum, _frame):
    raise Cut("interrupted at the budget (an item overran)")


def run_part(part: Part, ctx: PartContext) -> dict:
    """Run ``part`` under its budget; returns its report record: ``status`` is ``passed``
    (a checking part without failures), ``measured``, ``failed``, ``cut`` or ``error``."""
    started = time.monotonic()
    budget = ctx.remaining()
    status, detail = None, None
    use_alarm = hasattr(signal, "setitimer")
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, max(budget, 0) + GRACE_S)
    try:
        ctx.check("the part started")
        part.run(ctx)
    except Cut as cut:
        status, detail = "cut", str(cut)
    except Exception as exc:  # a crash of the part itself, reported with its traceback
        status = "error"
        detail = "".join(traceback.format_exception(exc)).strip()[-4000:]
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    if status is None:
        status = ("failed" if ctx.failures else "passed") if part.checks else "measured"
        if not part.checks and ctx.failures:
            status = "failed"
    return {
        "key": part.key, "title": part.title, "status": status, "detail": detail,
        "budget_s": round(budget, 1), "wall_s": round(time.monotonic() - started, 1),
        "failures": ctx.failures, "notes": ctx.notes, "figures": ctx.figures,
        "table": ctx.lines,
    }


def plan_deadlines(parts: list[Part], now: float, end: float) -> Callable[[int], float]:
    """Deadline of part ``i`` when it starts: everything left up to ``end`` except the shares
    the later parts are guaranteed. Time an earlier part did not use goes to the next."""
    total = sum(p.share for p in parts)

    def deadline(i: int) -> float:
        later = sum(p.share for p in parts[i + 1:]) / total * (end - now)
        return end - later

    return deadline
