"""The job state machine: each call reads the job's state and does the next step.

A redelivered or duplicated task message continues where the last one stopped:
the submit is claimed atomically, by the message holding the job's token, once its
send time has come; the claim is marked as sent only at the last check before the
POST, so a claim that never left goes back to pending (never `uncertain`); the
prediction id is made durable before anything else; and every final transition (and
its cost, on the ledger entry of the job's attempt) happens once. Each step is given the
job's `Turn` and answers what its next message should be (workers/turn.py).

The submit (pending, submitting) is here, beside the loop that picks each step; the steps
after it (workers/poll.py, workers/fetch.py), reuse (workers/reuse.py) and a job's end
(workers/ending.py) each have a module of their own.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from jobs.control import AUTH, PAYMENT, refused_by
from jobs.records import FAILED, FETCHING, PENDING, SKIPPED, SUBMITTED, SUBMITTING, UNCERTAIN, JobRecord
from jobs.retry import backoff
from jobs.secret import redact_links
from manifests.errors import (
    AuthError,
    BadRequest,
    OutcomeUnknown,
    PaymentRequired,
    RateLimited,
    StateError,
    StorageError,
    TransientError,
)
from workers import events
from workers.context import Context
from workers.ending import end, entry, finish, move, reservation, uncertain
from workers.fetch import fetch
from workers.inputs import InputFailed, input_links, prepare_inputs
from workers.metrics import STEP_SECONDS
from workers.poll import next_poll, poll
from workers.reuse import reuse
from workers.turn import Done, Next, Stale, StepResult, Turn, Wait

log = logging.getLogger("seedream.jobs")
HOLD_MAX = 2.0  # the longest a send waits in its thread for its turn; longer, and it comes back later
HAND_BACK_PATIENCE = 30.0  # seconds a refused or unsent submit's hand-back outlasts a Redis outage


@dataclass(frozen=True)
class Outcome:
    """What the job's next message should be (never `Next`: `drive` takes that step itself), and
    whether this call sent the job's submit: a place in the run's ready part opened, for the
    caller to let the next job in."""

    result: Wait | Done | Stale
    submitted: bool = False


def advance(ctx: Context, run_id: str, job_id: str, token: str, *, due_at: float) -> Wait | Done | Stale:
    """Drive the job as far as it goes now; `due_at` is when the watchdog may take it over."""
    return drive(ctx, run_id, job_id, token, due_at=due_at).result


def drive(ctx: Context, run_id: str, job_id: str, token: str, *, due_at: float) -> Outcome:
    rec = ctx.runs.begin(run_id, job_id, token, due_at)
    for _ in range(8):
        if rec is None or rec.token != token:
            return Outcome(Stale())
        t = Turn(ctx, ctx.meta(run_id), rec)
        if rec.final:
            return Outcome(finish(t))
        asleep = (rec.wake_at or 0.0) - time.time()
        if asleep > 0.05:  # a wait longer than one message may hold: another hop
            return Outcome(Wait(asleep))
        began = rec.state
        step = {PENDING: _pending, SUBMITTING: _submitting, SUBMITTED: poll, FETCHING: fetch}[began]
        started = time.monotonic()
        result = step(t)
        STEP_SECONDS.labels(began).observe(time.monotonic() - started)
        if not isinstance(result, Next):
            return Outcome(result, submitted=began == PENDING and rec.state == SUBMITTED)
        rec = ctx.runs.get(run_id, job_id)
    return Outcome(Wait(0.0))


# -- helpers -------------------------------------------------------------------------------


def send_settle(ctx: Context) -> float:
    """How long after its POST left a job found `submitting` may still be getting its answer
    recorded by the worker that sent it: the POST's own time-outs and the in-process retries."""
    t = ctx.settings.atlas.timeouts
    return t.connect + t.write + t.read + ctx.settings.id_hold + 5.0


def _unsent(t: Turn, *, refused: bool = False, uncount: bool = True, rewrite: bool = False) -> bool:
    """The submit did not leave (or the service refused it): the job is pending again, in Redis
    and then, if its record was stored as sent (`refused`, `rewrite`), in its durable record,
    so neither the watchdog nor a resume from storage takes it for a sent one. False when it
    had left and `refused` does not say otherwise. A job Redis lost meanwhile is pending in
    its record: a resume from storage must not take a refused POST for a sent one."""
    got = _hand_back(t, refused=refused, uncount=uncount)
    if got == "kept":
        return False
    t.job.state, t.job.posted_at = PENDING, None
    if refused or rewrite:
        _write_record(t.ctx, t.job, tries=3)
    return True


def _hand_back(t: Turn, *, refused: bool, uncount: bool) -> str:
    """Hand the claim back ('ok', 'kept' or 'gone', as RunStore.hand_back), trying again through
    a Redis outage of up to HAND_BACK_PATIENCE seconds: only this worker knows the submit did not
    leave (or was refused), and a job left `submitting` is taken on its next message for one that
    may have been paid: uncertain, never sent again. A try whose answer was lost may have gone
    through: a job then pending counts as handed back; one another message has claimed since
    (and may have sent) is kept, its claim untouched (the script checks the POST's mark)."""
    deadline = time.monotonic() + HAND_BACK_PATIENCE
    posted_at = t.job.posted_at if refused else None
    failed = 0
    while True:
        try:
            got = t.ctx.runs.hand_back(t.job.run_id, t.job.id, refused=refused, uncount=uncount, posted_at=posted_at)
            if got != "kept" or not failed:
                return got
            cur = t.ctx.runs.get(t.job.run_id, t.job.id)
            return "ok" if cur is not None and cur.state == PENDING else "kept"
        except StateError as exc:
            failed += 1
            if time.monotonic() >= deadline:
                raise
            log.warning("handing %s back failed (%s); trying again", t.job.id, exc)
            time.sleep(backoff(failed, 0.2, 2.0))


def _write_record(ctx: Context, rec: JobRecord, tries: int = 1) -> bool:
    for n in range(tries):
        try:
            ctx.storage(rec.run_id).put_json(f"records/{rec.id}.json", rec.to_json())
            return True
        except StorageError as exc:  # written again when the job ends
            log.warning("record of %s not stored (%s)", rec.id, exc)
            if n + 1 < tries:
                time.sleep(backoff(n + 1, 0.2, 2.0))
    return False


# -- pending: prepare, reserve, take a slot and a send time, claim, POST once ---------------


def _pending(t: Turn) -> StepResult:
    run_id, key = t.job.run_id, t.holder
    halted = t.ctx.control.halted(run_id)
    if halted:
        return end(t, PENDING, SKIPPED, reason=halted)
    if t.run.reuse and t.job.spec.fingerprint:
        reused = reuse(t)
        if reused is not None:
            return reused
    if not t.job.input_urls:
        urls = prepare_inputs(t)
        if isinstance(urls, InputFailed):
            return end(t, PENDING, FAILED, error=urls.error, reason=urls.reason)
        if isinstance(urls, Wait):
            return urls
        t.ctx.runs.update(run_id, t.job.id, input_urls=urls)
        t.job.input_urls = urls
    budget = t.ctx.budget(t.run.budget_scope)
    if not budget.reserve(entry(t.job), reservation(t.run, t.job)):
        return end(t, PENDING, SKIPPED, reason="budget", error=budget.state().stopped or "")
    wait = t.ctx.slots.acquire(key)
    if wait > 0:  # the service's limit binds: a slot freed by a poll is soon taken again
        return Wait(min(wait, 0.5))
    later, send_at = t.ctx.limiter.book("submit")
    if later:
        return Wait(later)
    # Every wait comes before the claim, so a worker killed in one leaves the job pending: first
    # the wait for the booked send time, then the pacing check (the last word on when a send may
    # leave: the time between it and the POST is the jitter the service's small burst absorbs).
    time.sleep(max(0.0, send_at - time.monotonic()))
    paced = t.ctx.limiter.pace("submit")
    if not paced.go or paced.wait > HOLD_MAX:  # a 429 since this send was booked, or sends piled up
        return Wait(max(paced.wait, 0.001))
    time.sleep(paced.wait)
    try:  # signed now, the last moment before the claim: fresh however long the job waited
        links = input_links(t.ctx, t.job.input_urls)
    except StorageError as exc:
        n = t.ctx.runs.incr(run_id, t.job.id, "attempts")
        if n >= t.ctx.settings.max_attempts:
            return end(t, PENDING, FAILED, error=str(exc), reason="input")
        events.retry(t.job, "presign", n, str(exc))
        return Wait(backoff(n))
    claim = uuid.uuid4().hex  # this claim's own name: a copy of the message holds the same token
    claimed = t.ctx.runs.claim(run_id, t.job.id, t.job.token, claim)
    if claimed == "stale":
        return Stale()
    if claimed != "ok":
        return Next()
    events.moved(t.job, PENDING, SUBMITTING)
    t.job.state, t.job.attempts = SUBMITTING, t.job.attempts + 1
    params: dict[str, Any] = {"prompt": t.job.spec.prompt, "images": links, **t.job.spec.params}
    if t.job.spec.size:
        params["size"] = t.job.spec.size
    client = t.ctx.client(t.run.api_base)
    # Durable before the POST: a run resumed from storage never resubmits a job whose record says
    # `submitting`. It is written just before the last check, so that only the send itself stands
    # between the check that marks the POST as leaving and the POST, and nothing but these two
    # steps between the record saying "sent" and the mark.
    t.job.posted_at = posted_at = time.time()
    if not _write_record(t.ctx, t.job):
        _unsent(t)
        n = t.ctx.runs.incr(run_id, t.job.id, "store_attempts")
        events.retry(t.job, "store_record", n, "the record could not be stored before the submit")
        return Wait(backoff(n, 1.0, 30.0))
    verdict = t.ctx.runs.mark_posted(
        run_id, t.job.id, t.job.token, t.ctx.control.key(run_id), budget.keys[0], claim=claim, posted_at=posted_at
    )
    if verdict == "lost":
        # Taken over while this worker stood still: never POST for it, and if the job ended
        # meanwhile, make sure its final record is the one in storage (its new driver writes
        # any other state it reaches; until then the record errs on the side of "sent").
        cur = t.ctx.runs.get(run_id, t.job.id)
        if cur is not None and cur.settled:
            _write_record(t.ctx, cur)
        return Stale()
    if verdict != "ok":
        _unsent(t, rewrite=True)
        kind, _, why = verdict.partition(":")
        if kind == "budget":
            return end(t, PENDING, SKIPPED, reason="budget", error=why)
        return end(t, PENDING, SKIPPED, reason=why)
    try:
        sub = client.submit(t.job.spec.model, params)
    except OutcomeUnknown as exc:
        events.submitted(t.job, "unknown")
        return uncertain(t, SUBMITTING, error=exc.message, reason="submit_outcome_unknown")
    except RateLimited as exc:
        _unsent(t, refused=True)  # first: nothing was created, and the job must not look sent
        t.ctx.limiter.cool_down("submit", exc.retry_after)
        events.rate_limited(t.job, "submit", exc.retry_after)
        t.ctx.runs.bump(run_id, "http_429")
        if not names_a_rate(exc.message):  # the service wants fewer in flight: give the slot back
            t.ctx.slots.release(key)
            _tell_slots(t.ctx, None)
        return Wait(exc.retry_after if exc.retry_after is not None else 1.0)
    except PaymentRequired as exc:
        events.submitted(t.job, "refused")
        t.ctx.control.halt(run_id, PAYMENT)
        return end(t, SUBMITTING, SKIPPED, error=exc.message, reason=PAYMENT)
    except AuthError as exc:
        events.submitted(t.job, "refused")
        t.ctx.control.halt(run_id, refused_by(exc))
        return end(t, SUBMITTING, FAILED, error=exc.message, reason=AUTH)
    except BadRequest as exc:
        events.submitted(t.job, "refused")
        return end(t, SUBMITTING, FAILED, error=exc.message, reason="bad_request")
    except TransientError as exc:  # never left this machine: nothing was created
        _unsent(t, refused=True, uncount=False)
        t.ctx.runs.update(run_id, t.job.id, error=redact_links(exc.message))
        t.ctx.runs.bump(run_id, "retries")
        events.retry(t.job, "submit", t.job.attempts, exc.message)
        if t.job.attempts >= t.ctx.settings.max_attempts:
            return end(t, PENDING, FAILED, error=exc.message, reason="unreachable")
        return Wait(backoff(t.job.attempts))
    events.submitted(t.job, "accepted", sub.id)
    result = _hold_id(t, sub.id, time.time())
    _tell_slots(t.ctx, key)
    return result


def names_a_rate(message: str) -> bool:
    """A 429 that says it is about the rate. The project's own pacing keeps submits inside the rate
    it was given, so any other 429 on a submit is the service refusing more work at once."""
    return "rate" in message.lower()


def _tell_slots(ctx: Context, accepted: str | None) -> None:
    """Teach the in-flight capacity (workers/slots.py) that the submit holding slot `accepted` was
    taken, or (None) that one was pushed back; a failure to do so costs nothing."""
    try:
        cap = ctx.slots.accepted(accepted) if accepted else ctx.slots.pushed_back()
    except StateError as exc:
        log.warning("in-flight capacity not updated (%s)", exc)
        return
    if not accepted:
        log.info("the service pushed back: %d predictions in flight at most for now", int(cap),
                 extra={"event": "in_flight", "status": "pushed_back"})  # fmt: skip


def _hold_id(t: Turn, prediction_id: str, now: float) -> StepResult:
    """The POST answered with an id: make it durable before anything else can fail, first in the
    job's record in storage, then in Redis (retried here for a while: this frame may be the only
    place the id exists). Until Redis has it the job stays `submitting` with its POST marked sent,
    and a message that finds it so reads the id back from storage (`_submitting`)."""
    t.job.prediction_id, t.job.submitted_at, t.job.state = prediction_id, now, SUBMITTED
    _write_record(t.ctx, t.job, tries=3)
    deadline = time.monotonic() + t.ctx.settings.id_hold
    while True:
        try:
            moved = move(
                t, SUBMITTING, SUBMITTED, bump="submitted", prediction_id=prediction_id, submitted_at=repr(now)
            )
            break
        except StateError as exc:
            if time.monotonic() > deadline:
                log.error("job %s/%s: prediction %s not recorded in Redis (%s); its stored record holds it",
                          t.job.run_id, t.job.id, prediction_id, exc)  # fmt: skip
                raise
            time.sleep(0.5)
    if moved == "ok":
        return Wait(next_poll(t))
    return _adopt(t, moved)


def _adopt(t: Turn, state: str) -> StepResult:
    """The job was ended (as uncertain) while its POST was being answered: the prediction exists,
    so it is taken back, polled and settled at its real cost, never left final without a verdict."""
    run_id = t.job.run_id
    cur = t.ctx.runs.get(run_id, t.job.id)
    if cur is None or cur.prediction_id or state != UNCERTAIN:
        log.warning("job %s/%s is %s while its submit answered with prediction %s", run_id, t.job.id, state,
                    t.job.prediction_id)  # fmt: skip
        if cur is not None and not cur.prediction_id:
            t.ctx.runs.update(run_id, t.job.id, prediction_id=t.job.prediction_id)
        return Stale()
    if not t.ctx.runs.reopen(run_id, t.job.id, UNCERTAIN, SUBMITTED, t.job.token):
        return Stale()
    t.ctx.budget(t.run.budget_scope).unsettle(entry(t.job))
    t.ctx.runs.update(run_id, t.job.id, prediction_id=t.job.prediction_id, submitted_at=repr(t.job.submitted_at),
                    record_written="0")  # fmt: skip
    t.ctx.runs.bump(run_id, "submitted")
    t.ctx.runs.reopen_run(run_id)  # its report, if written, is written again when the job ends
    t.ctx.slots.acquire(t.holder)
    _write_record(t.ctx, t.job)
    return Wait(next_poll(t))


# -- submitting: found after a crash between the claim and the answer --------------------------


def _submitting(t: Turn) -> StepResult:
    if t.job.posted_at is None:
        # Claimed, never sent: its worker stopped before the POST, or this is a second copy of the
        # message that claimed it. It waits again, in storage too (its record may say
        # `submitting`); the claimant's last check now fails.
        _unsent(t, rewrite=True)
        return Next()
    left = send_settle(t.ctx) - (time.time() - t.job.posted_at)
    if left > 0:  # its sender may still be recording the answer
        return Wait(left)
    stored = _stored_record(t)
    if stored.get("prediction_id"):  # the answer reached storage but not Redis
        moved = move(t, SUBMITTING, SUBMITTED, bump="submitted", prediction_id=stored["prediction_id"],
                      submitted_at=repr(stored.get("submitted_at") or t.job.posted_at))  # fmt: skip
        return Next() if moved == "ok" else Stale()
    return uncertain(
        t,
        SUBMITTING,
        reason="worker_lost_during_submit",
        error="the worker stopped while its submit was sent; the prediction may exist (see the account's usage)",
    )


def _stored_record(t: Turn) -> dict[str, Any]:
    try:
        got = t.ctx.storage(t.job.run_id).get_json(f"records/{t.job.id}.json")
    except StorageError as exc:
        raise TransientStorage(str(exc)) from None
    return got if isinstance(got, dict) else {}


class TransientStorage(StateError):
    """Storage could not be read to decide a job's fate: try the message again later."""
