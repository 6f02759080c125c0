"""A job's end: the one way every step moves a job to a final state, so that its cost is
settled (or its reservation released) and its slot given back exactly once, by the call that
made the move, however many messages race for the job."""

from __future__ import annotations

import time
from typing import Any

from jobs.budget import ledger_key, worst_case
from jobs.records import FETCHING, OVERDUE, SUBMITTED, SUCCEEDED, UNCERTAIN, JobRecord, JobState, RunRecord
from jobs.retry import backoff
from jobs.secret import redact_links
from manifests.errors import StorageError
from workers import events
from workers.dispatch import maybe_finalize
from workers.turn import Done, Next, Turn, Wait


def reservation(run: RunRecord, rec: JobRecord) -> int:
    return worst_case(run.list_price(rec.spec.model), rec.spec.params)


def entry(rec: JobRecord) -> str:
    """The job's current ledger entry."""
    return ledger_key(rec.run_id, rec.id, rec.charge)


def move(t: Turn, expect: JobState, to: JobState, **fields: Any) -> str:
    """A transition (see RunStore.transition), logged and counted when it is made."""
    moved = t.ctx.runs.transition(t.job.run_id, t.job.id, expect, to, **fields)
    if moved == "ok":
        events.moved(
            t.job,
            expect,
            to,
            cost_micros=int(fields.get("cost_micros") or 0),
            reason=str(fields.get("reason") or ""),
            error=str(fields.get("error") or ""),
        )
    return moved


def end(
    t: Turn,
    expect: JobState,
    to: JobState,
    *,
    error: str = "",
    reason: str = "",
    cost: int = 0,
    **fields: Any,
) -> Next:
    """Move to a final state once; then, and only if this call made the move, settle or release
    the budget and the slot to match. A message that lost the job (a stale copy, one taken over)
    must not give back what the job's live submit holds. A worker that dies between the move and
    the settlement leaves the reservation held (the cap stays safe); `finish` settles it. The error
    may be the service's, echoing an input's presigned link: its signature never reaches a record."""
    error = redact_links(error)
    moved = move(
        t,
        expect,
        to,
        error=error[:2000],
        reason=reason,
        cost_micros=str(cost),
        finished_at=repr(time.time()),
        **fields,
    )
    if moved == "ok":
        settle(t, cost)
        if expect != FETCHING:  # a job fetching gave its slot back when its prediction ended
            t.ctx.slots.release(t.holder)
    return Next()  # the loop in `advance` reads the state the job is really in


def end_claim(t: Turn, state: JobState) -> None:
    if t.run.reuse and t.job.spec.fingerprint:
        t.ctx.claims.end(t.run.reuse_claims, t.job.spec.fingerprint, t.holder, succeeded=state == SUCCEEDED)


def settle(t: Turn, cost: int) -> None:
    """The ledger entry of the job's attempt at its final cost (idempotent)."""
    budget = t.ctx.budget(t.run.budget_scope)
    if cost:
        budget.settle(entry(t.job), cost)
    else:
        budget.release(entry(t.job))


def uncertain(t: Turn, expect: JobState, **why: str) -> Next:
    """The POST left and nothing proves what happened: it may have been billed, so it is counted
    at its reservation, never resubmitted."""
    return end(t, expect, UNCERTAIN, cost=reservation(t.run, t.job), **why)


def overdue(t: Turn, **why: str) -> Next:
    """A prediction with an id and no verdict yet: the run ends with it counted at its reservation;
    `resume` and `reconcile` poll it again and settle its real cost."""
    return end(t, SUBMITTED, OVERDUE, cost=reservation(t.run, t.job), **why)


def finish(t: Turn) -> Wait | Done:
    """A final job: make sure its settlement, its claim's end (the rows waiting on its edit go on)
    and its durable record are written (its worker may have died right after the move), then
    tell the run. `end` leads here at once, so the claim is let go once, here."""
    if not t.job.record_written:
        settle(t, t.job.cost_micros)
        end_claim(t, t.job.state)
        try:
            t.ctx.storage(t.job.run_id).put_json(f"records/{t.job.id}.json", t.job.to_json())
        except StorageError as exc:
            n = t.ctx.runs.incr(t.job.run_id, t.job.id, "store_attempts")
            events.retry(t.job, "store_record", n, str(exc))
            return Wait(backoff(n, 1.0, 60.0)) if n < t.ctx.settings.max_store_attempts else Done()
        finished = t.ctx.runs.record_stored(t.job.run_id, t.job.id, succeeded=t.job.state == SUCCEEDED)
        maybe_finalize(t.ctx, t.job.run_id, finished)
    return Done()
