"""The rules `resume` applies to a job's durable record when Redis lost its run (jobs/restore.py):
a prediction with an id is polled again, never resubmitted; a POST that may have left counts at
its reservation; only a job never sent runs again."""

from __future__ import annotations

import pytest

from jobs.records import FAILED, FETCHING, OVERDUE, PENDING, SKIPPED, SUBMITTED, SUBMITTING, SUCCEEDED, UNCERTAIN
from jobs.restore import Restore, earlier_paid, restore_as


@pytest.mark.parametrize(
    ("state", "prediction_id", "kind"),
    [
        (SUBMITTED, "p1", Restore.POLL_AGAIN),
        (FETCHING, "p1", Restore.POLL_AGAIN),
        (OVERDUE, "p1", Restore.POLL_AGAIN),
        (UNCERTAIN, "p1", Restore.POLL_AGAIN),  # adopted: the prediction exists
        (SUBMITTING, "p1", Restore.POLL_AGAIN),  # the answer reached storage, not Redis
        (SUCCEEDED, "p1", Restore.ENDED),
        (FAILED, "p1", Restore.ENDED),
        (SKIPPED, "", Restore.ENDED),
        (FAILED, "", Restore.ENDED),
        (UNCERTAIN, "", Restore.ENDED),
        (OVERDUE, "", Restore.ENDED),
        (SUBMITTING, "", Restore.MAYBE_SENT),
        (PENDING, "", Restore.UNSENT),
        (None, "", Restore.UNSENT),
    ],
)
def test_each_stored_state_is_restored_by_its_rule(state: str | None, prediction_id: str, kind: Restore) -> None:
    assert restore_as({"state": state, "prediction_id": prediction_id}) is kind


def test_earlier_paid_attempts_are_the_ones_that_cost_something() -> None:
    history = [
        {"attempt": 1, "state": FAILED, "cost_micros": 27_000},
        {"attempt": 2, "state": SKIPPED, "cost_micros": 0},
        "not an attempt",
        {"attempt": 3, "state": UNCERTAIN, "cost_micros": "54000"},
    ]
    assert list(earlier_paid(history)) == [(1, 27_000), (3, 54_000)]
    assert list(earlier_paid(None)) == []
