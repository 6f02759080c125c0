"""How a person or a script follows a run: a bar redrawn in place on a terminal, calm plain
lines in a log or CI (a 20,000-row run must not scroll thousands of lines), or one JSON
object per change for scripts. Every view takes the same `Progress` snapshots from `Runs.wait`.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import IO, Any

from jobs.estimate import format_duration
from jobs.runs import Progress
from manifests.models import micros_to_usd

PLAIN_INTERVAL = 5.0  # seconds between plain lines: a log stays readable over a night
RATE_WINDOW = 10.0  # seconds of submits the shown rate is averaged over
MIN_SPAN = 2.0

Show = Callable[[Progress], None]


def line(p: Progress) -> str:
    """The one-line summary `status` prints and plain views repeat."""
    c = p.counts
    eta = f", ETA {format_duration(p.eta)}" if p.eta is not None and not p.done else ""
    halted = f" [halted: {p.halted}]" if p.halted else ""
    if p.budget_stopped:
        halted += f" [budget stopped: {p.budget_stopped}]"
    overdue = f", {c.get('overdue', 0):,} overdue (`reconcile` polls them again)" if c.get("overdue") else ""
    reused = f" ({c['reused']:,} reused)" if c.get("reused") else ""
    return (
        f"{p.finished:,}/{p.total:,} done: {c.get('succeeded', 0):,} ok{reused}, {c.get('failed', 0):,} failed, "
        f"{c.get('skipped', 0):,} skipped, {c.get('uncertain', 0):,} uncertain{overdue}; "
        f"${micros_to_usd(p.cost_micros)} spent; {p.rate:.2f} jobs/s{eta}{halted}"
    )


class SubmitRate:
    """Submits per second over the last few seconds, from the run's cumulative submit count:
    the figure to hold against the key's limit (the run's average hides a stall)."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, submitted: int, now: float | None = None) -> float | None:
        """None until two seconds are seen: a first burst would read as several times the limit."""
        now = time.monotonic() if now is None else now
        self.samples.append((now, submitted))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()
        t0, n0 = self.samples[0]
        return (submitted - n0) / (now - t0) if now - t0 >= MIN_SPAN else None


def _counts(p: Progress) -> str:
    c = p.counts
    text = (
        f"{c.get('succeeded', 0):,} ok · {c.get('failed', 0):,} failed · "
        f"{c.get('skipped', 0):,} skipped · {c.get('uncertain', 0):,} uncertain"
    )
    return text + (f" · {c['overdue']:,} overdue" if c.get("overdue") else "")


def _money(p: Progress) -> str:
    spent = f"${micros_to_usd(p.cost_micros)} spent"
    if p.budget_cap is None:
        return spent
    return f"{spent} · budget ${micros_to_usd(p.budget_spent)} of ${micros_to_usd(p.budget_cap)}"


def _eta(p: Progress) -> str:
    if p.done:
        return f"done in {format_duration(p.elapsed)}"
    return f"ETA {format_duration(p.eta)}" if p.eta is not None else "ETA --"


class PlainView:
    """Not a terminal: the summary line at a calm interval, and always the last one."""

    def __init__(self, out: IO[str], interval: float = PLAIN_INTERVAL) -> None:
        self.out, self.interval, self.last = out, interval, float("-inf")

    def __call__(self, p: Progress) -> None:
        if p.done or time.monotonic() - self.last >= self.interval:
            self.out.write(line(p) + "\n")
            self.out.flush()
            self.last = time.monotonic()


class JsonView:
    """`watch --json`: one object per change (and the last), for scripts; never a partial line."""

    def __init__(self, out: IO[str], limit: float) -> None:
        self.out, self.limit, self.rate, self.last = out, limit, SubmitRate(), ""

    def __call__(self, p: Progress) -> None:
        rate = self.rate.add(p.counts.get("submitted", 0))
        doc = p.to_json()
        moving = {k: v for k, v in doc.items() if k not in ("elapsed_seconds", "jobs_per_second", "eta_seconds")}
        key = json.dumps(moving, sort_keys=True)
        if key == self.last and not p.done:
            return
        self.last = key
        doc.update(submits_per_second=None if rate is None else round(rate, 3), submit_rate_limit=self.limit)
        self.out.write(json.dumps(doc) + "\n")
        self.out.flush()


class BarView:
    """A terminal: one rich bar redrawn in place (done/total, counts, dollars, submit rate, ETA)."""

    def __init__(self, out: IO[str], limit: float) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        self.limit, self.rate = limit, SubmitRate()
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
            TextColumn("{task.fields[counts]}"),
            TextColumn("{task.fields[money]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[eta]}"),
            console=Console(file=out),
            auto_refresh=False,  # redrawn on each snapshot: no thread of its own
        )
        self.task: Any = None

    def __call__(self, p: Progress) -> None:
        rate = self.rate.add(p.counts.get("submitted", 0))
        limit = f" of {self.limit:g}/s" if self.limit else ""
        description = p.run_id + (f" [halted: {p.halted}]" if p.halted else "")
        if p.budget_stopped:
            description += f" [budget stopped: {p.budget_stopped}]"
        shown = "--" if rate is None else f"{rate:.1f}"
        fields: dict[str, Any] = {"counts": _counts(p), "money": _money(p), "rate": f"submits {shown}/s{limit}"}
        fields["eta"] = _eta(p)
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task(description, total=p.total, completed=p.finished, **fields)
        else:
            self.bar.update(self.task, description=description, total=p.total, completed=p.finished, **fields)
        self.bar.refresh()

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()


@contextlib.contextmanager
def view(*, as_json: bool = False, limit: float = 0.0, out: IO[str] | None = None) -> Iterator[Show]:
    """The view that fits where the output goes: a bar on a terminal, plain lines elsewhere."""
    out = out or sys.stdout
    if as_json:
        yield JsonView(out, limit)
    elif out.isatty():
        bar = BarView(out, limit)
        try:
            yield bar
        finally:
            bar.close()
    else:
        yield PlainView(out)
