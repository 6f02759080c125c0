"""What a job's durable record says about its money, when Redis lost its run and `resume` rebuilds
the run from storage alone (jobs/recovery.py).

The state machine (workers/steps.py) writes a record before each POST and at each ending, so the
stored state decides the job's fate: a prediction with an id is never sent again (it may be paid
for), a record stored as `submitting` may have left (it counts at its reservation), and only a
job whose POST never left runs again. The rules sit here, beside the states, so the state machine
and resume cannot drift apart.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from typing import Any

from jobs.records import FAILED, FINAL, SKIPPED, SUBMITTING, SUCCEEDED

# The endings that close a job's attempt with the service: its poll gave its verdict, or it was
# never let through. Any other state holding a prediction id still waits for a verdict.
VERDICTS = (SUCCEEDED, FAILED, SKIPPED)


class Restore(enum.Enum):
    """How a stored job comes back into Redis."""

    POLL_AGAIN = "poll_again"
    """A prediction without a verdict (in flight, fetching, overdue, or adopted after being
    uncertain): `submitted` again with its reservation held, polled, never resubmitted."""

    ENDED = "ended"
    """A final job: kept as it ended, its stored cost settled (nothing held when it cost nothing)."""

    MAYBE_SENT = "maybe_sent"
    """Stored as `submitting` with no id: its POST was leaving, so the prediction may exist and be
    billed; `uncertain`, settled at its reservation, never resubmitted."""

    UNSENT = "unsent"
    """Never sent (pending, or a claim handed back): it runs again, nothing held for it yet."""


def restore_as(rec: Mapping[str, Any]) -> Restore:
    """The rule for a stored record (records/<id>.json)."""
    state = rec.get("state")
    if rec.get("prediction_id") and state not in VERDICTS:
        return Restore.POLL_AGAIN
    if state in FINAL:
        return Restore.ENDED
    if state == SUBMITTING:
        return Restore.MAYBE_SENT
    return Restore.UNSENT


def earlier_paid(history: Any) -> Iterator[tuple[int, int]]:
    """(attempt, cost) of each earlier attempt that was paid: they stay counted in the budget,
    each on its own ledger entry, as they were before Redis lost them."""
    for old in history or []:
        if isinstance(old, dict) and int(old.get("cost_micros") or 0):
            yield int(old.get("attempt") or 0), int(old["cost_micros"])
