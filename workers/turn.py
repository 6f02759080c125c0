"""A turn at a job: what one step of the state machine (workers/steps.py) is given, and what it
hands back to the task that drives the job (workers/tasks.py).

A step's answer is a type rather than a countdown with reserved negative values, so "come back
in n seconds", "take the next step now", "nothing more to do" and "this message lost the job"
cannot be mistaken for one another, and the task must say what it does with each.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs.records import JobRecord, RunRecord
from workers.context import Context


@dataclass(frozen=True)
class Wait:
    """The job's next message comes this many seconds from now (0: at once, on the queue for the
    job's new state)."""

    seconds: float


@dataclass(frozen=True)
class Next:
    """The job's state changed: the same call reads it again and takes the next step."""


@dataclass(frozen=True)
class Done:
    """No further message: the job ended and its record is stored, or it waits for an operator
    (`resume`, `reconcile`)."""


@dataclass(frozen=True)
class Stale:
    """This message does not drive the job (a duplicate, or the job was taken over): it stops
    without publishing, so the job keeps exactly one chain of messages."""


StepResult = Wait | Next | Done | Stale


@dataclass(frozen=True)
class Turn:
    """The worker's connections, the job's run and the job, which every step needs together. The
    job record is the one this message read; steps update it as they move the job."""

    ctx: Context
    run: RunRecord
    job: JobRecord

    @property
    def holder(self) -> str:
        """The job's name in the run-wide structures: slots, claims."""
        return f"{self.job.run_id}:{self.job.id}"
