"""The job state machine: each call reads the job's state and does the next step.

A redelivered or duplicated task message continues where the last one stopped:
the submit is claimed atomically, by the message holding the job's token, once its
send time has come; the claim is marked as sent only at the last check before the
POST, so a claim that never left goes back to pending (never `uncertain`); the
prediction id is made durable before anything else; and every final transition (and
its cost, on the ledger entry of the job's attempt) happens once. Each step is given the
job's `Turn` and answers what its next message should be (workers/turn.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from jobs.budget import ledger_key, worst_case
from jobs.claims import DONE, FRESH, HELD, MINE
from jobs.control import AUTH, PAYMENT, refused_by
from jobs.records import (
    FAILED,
    FETCHING,
    OVERDUE,
    PENDING,
    SKIPPED,
    SUBMITTED,
    SUBMITTING,
    SUCCEEDED,
    UNCERTAIN,
    JobRecord,
    JobState,
    RunRecord,
)
from jobs.results import Entry, find, new_entry
from jobs.retry import backoff
from jobs.secret import redact_links
from jobs.thumbs import store_output_thumbnail
from manifests.errors import (
    AuthError,
    BadOutput,
    BadRequest,
    OutcomeUnknown,
    PaymentRequired,
    RateLimited,
    ServiceError,
    StateError,
    StorageError,
    TransientError,
)
from manifests.images import NotAnImage, inspect
from workers import events
from workers.context import Context
from workers.dispatch import maybe_finalize
from workers.inputs import InputFailed, input_links, prepare_inputs
from workers.metrics import STEP_SECONDS
from workers.polling import budget as poll_budget
from workers.prediction import State
from workers.turn import Done, Next, Stale, StepResult, Turn, Wait

log = logging.getLogger("seedream.jobs")
HOLD_MAX = 2.0  # the longest a send waits in its thread for its turn; longer, and it comes back later
REUSE_WAIT = 1.0  # how often a job waiting for another's identical edit looks again
REUSE_TRIES = 20  # storage failures while copying a stored edit (about 8 minutes) before the job pays


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
            return Outcome(_final(t))
        asleep = (rec.wake_at or 0.0) - time.time()
        if asleep > 0.05:  # a wait longer than one message may hold: another hop
            return Outcome(Wait(asleep))
        began = rec.state
        step = {PENDING: _pending, SUBMITTING: _submitting, SUBMITTED: _submitted, FETCHING: _fetching}[began]
        started = time.monotonic()
        result = step(t)
        STEP_SECONDS.labels(began).observe(time.monotonic() - started)
        if not isinstance(result, Next):
            return Outcome(result, submitted=began == PENDING and rec.state == SUBMITTED)
        rec = ctx.runs.get(run_id, job_id)
    return Outcome(Wait(0.0))


# -- helpers -------------------------------------------------------------------------------


def reservation(run: RunRecord, rec: JobRecord) -> int:
    return worst_case(run.list_price(rec.spec.model), rec.spec.params)


def entry(rec: JobRecord) -> str:
    """The job's current ledger entry."""
    return ledger_key(rec.run_id, rec.id, rec.charge)


def next_poll(t: Turn, elapsed: float | None = None) -> float:
    """Seconds to the job's next poll, on the schedule its run's poll budget allows now."""
    lim, slots = t.ctx.settings.limits, t.ctx.slots
    est = t.ctx.polls.estimate(t.job.run_id, t.job.spec.model)
    spend = poll_budget(
        submit_rate=lim.submit_rate, poll_rate=lim.poll_rate, scarce=slots.scarce(), slots=slots.capacity(), est=est
    )
    if elapsed is None:
        return t.ctx.polls.first(t.job.run_id, t.job.spec.model, spend)
    return t.ctx.polls.again(t.job.run_id, t.job.spec.model, elapsed, spend)


def send_settle(ctx: Context) -> float:
    """How long after its POST left a job found `submitting` may still be getting its answer
    recorded by the worker that sent it: the POST's own time-outs and the in-process retries."""
    t = ctx.settings.atlas.timeouts
    return t.connect + t.write + t.read + ctx.settings.id_hold + 5.0


def _move(t: Turn, expect: JobState, to: JobState, **fields: Any) -> str:
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


def _end(
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
    the settlement leaves the reservation held (the cap stays safe); `_final` settles it. The error
    may be the service's, echoing an input's presigned link: its signature never reaches a record."""
    error = redact_links(error)
    moved = _move(
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
        _settle(t, cost)
        if expect != FETCHING:  # a job fetching gave its slot back when its prediction ended
            t.ctx.slots.release(t.holder)
    return Next()  # the loop in `advance` reads the state the job is really in


def _end_claim(t: Turn, state: JobState) -> None:
    if t.run.reuse and t.job.spec.fingerprint:
        t.ctx.claims.end(t.run.reuse_claims, t.job.spec.fingerprint, t.holder, succeeded=state == SUCCEEDED)


def _settle(t: Turn, cost: int) -> None:
    """The ledger entry of the job's attempt at its final cost (idempotent)."""
    budget = t.ctx.budget(t.run.budget_scope)
    if cost:
        budget.settle(entry(t.job), cost)
    else:
        budget.release(entry(t.job))


def _uncertain(t: Turn, expect: JobState, **why: str) -> Next:
    """The POST left and nothing proves what happened: it may have been billed, so it is counted
    at its reservation, never resubmitted."""
    return _end(t, expect, UNCERTAIN, cost=reservation(t.run, t.job), **why)


def _overdue(t: Turn, **why: str) -> Next:
    """A prediction with an id and no verdict yet: the run ends with it counted at its reservation;
    `resume` and `reconcile` poll it again and settle its real cost."""
    return _end(t, SUBMITTED, OVERDUE, cost=reservation(t.run, t.job), **why)


def _final(t: Turn) -> Wait | Done:
    """A final job: make sure its settlement, its claim's end (the rows waiting on its edit go on)
    and its durable record are written (its worker may have died right after the move), then
    tell the run. `_end` leads here at once, so the claim is let go once, here."""
    if not t.job.record_written:
        _settle(t, t.job.cost_micros)
        _end_claim(t, t.job.state)
        try:
            t.ctx.storage(t.job.run_id).put_json(f"records/{t.job.id}.json", t.job.to_json())
        except StorageError as exc:
            n = t.ctx.runs.incr(t.job.run_id, t.job.id, "store_attempts")
            events.retry(t.job, "store_record", n, str(exc))
            return Wait(backoff(n, 1.0, 60.0)) if n < t.ctx.settings.max_store_attempts else Done()
        finished = t.ctx.runs.record_stored(t.job.run_id, t.job.id, succeeded=t.job.state == SUCCEEDED)
        maybe_finalize(t.ctx, t.job.run_id, finished)
    return Done()


def _unsent(t: Turn, *, refused: bool = False, uncount: bool = True, rewrite: bool = False) -> bool:
    """The submit did not leave (or the service refused it): the job is pending again, in Redis
    and then, if its record was stored as sent (`refused`, `rewrite`), in its durable record,
    so neither the watchdog nor a resume from storage takes it for a sent one. False when it
    had left and `refused` does not say otherwise."""
    if not t.ctx.runs.hand_back(t.job.run_id, t.job.id, refused=refused, uncount=uncount):
        return False
    t.job.state, t.job.posted_at = PENDING, None
    if refused or rewrite:
        _write_record(t.ctx, t.job, tries=3)
    return True


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


# -- reuse: an edit already stored is copied, not paid again ----------------------------------


def _reuse(t: Turn) -> StepResult | None:
    """Take the claim on the job's edit (jobs/claims.py) and, where the edit may be stored, copy
    its outputs: the job then succeeds at no cost, nothing reserved, no slot or send taken. A
    countdown while another job makes the same edit or storage fails; None: this job pays for it."""
    root, fp, me = t.run.reuse_claims, t.job.spec.fingerprint, t.holder
    got = t.ctx.claims.take(root, fp, me)
    if got == HELD:
        holder = t.ctx.claims.holder(root, fp)
        if holder is None or not _holder_gone(t.ctx, holder) or not t.ctx.claims.take_from(root, fp, holder, me):
            if not t.job.reuse_look:  # once it is made, look for it
                t.ctx.runs.update(t.job.run_id, t.job.id, reuse_look="1")
            return Wait(REUSE_WAIT)
        got, t.job.reuse_look = FRESH, True  # the holder may have stored it before it went
    if got != DONE and not t.job.reuse_look:
        return None
    try:
        found = _copy_stored(t)
    except StorageError as exc:  # a few tries, then the edit is paid for: a copy must not stall a row
        k = t.ctx.runs.incr(t.job.run_id, t.job.id, "reuse_attempts")
        events.retry(t.job, "reuse", k, str(exc))
        if k < REUSE_TRIES:
            return Wait(backoff(k, 1.0, 30.0))
        found = None
    if found is not None:
        entry, uris, foreign = found
        if foreign:  # copied in from another output (--reuse-from): later runs into this one find it here
            _index_copy(t, entry, uris)
        return _end(t, PENDING, SUCCEEDED, bump="reused", outputs=uris,
                    reused_from=f"{entry.run_id}/{entry.job_id}", saved_micros=str(entry.cost_micros))  # fmt: skip
    t.ctx.runs.update(t.job.run_id, t.job.id, reuse_look="")  # not stored (or its outputs are gone): pay for it
    t.job.reuse_look = False
    if got == DONE and t.ctx.claims.take(root, fp, me, over_done=True) not in (FRESH, MINE):
        return Wait(REUSE_WAIT)
    return None


def _copy_stored(t: Turn) -> tuple[Entry, list[str], bool] | None:
    """The entry copied, the copies, and whether it came from another output than the run's."""
    indexes = t.ctx.indexes(t.job.run_id)
    for index, entry in find(indexes, t.job.spec.fingerprint):
        if entry.run_id == t.job.run_id and entry.job_id == t.job.id:
            continue  # its own earlier edit, whose outputs are its own already: a stale entry
        metadata = {"job-id": t.job.id, "run-id": t.job.run_id, "model": entry.model,
                    "prediction-id": entry.prediction_id, "reused-from": f"{entry.run_id}/{entry.job_id}"}  # fmt: skip
        uris = index.copy_outputs(entry, t.ctx.storage(t.job.run_id), t.job.id, metadata)
        if uris is not None:
            return entry, uris, index is not indexes[0]
    return None


def _index_copy(t: Turn, entry: Entry, uris: list[str]) -> None:
    copy = new_entry(
        entry.fingerprint, t.job.run_id, t.job.id, entry.prediction_id, entry.model, uris, entry.cost_micros
    )
    try:
        t.ctx.indexes(t.job.run_id)[0].put(copy)
    except StorageError as exc:  # the copy stands; a later run may pay for this edit again
        log.warning("results index entry for %s not stored (%s)", t.job.id, exc)


def _holder_gone(ctx: Context, holder: str) -> bool:
    """The job holding a claim has ended (its worker died before ending the claim). A holder Redis
    no longer knows is not taken over: its run may be resumed from storage with its prediction
    still running, and would then hold the claim again; if it never is, the lease runs out."""
    run_id, _, job_id = holder.partition(":")
    held = ctx.runs.get(run_id, job_id) if job_id else None
    return held is not None and held.final


def _renew_claim(t: Turn) -> None:
    if t.run.reuse and t.job.spec.fingerprint:
        t.ctx.claims.take(t.run.reuse_claims, t.job.spec.fingerprint, t.holder)


# -- pending: prepare, reserve, take a slot and a send time, claim, POST once ---------------


def _pending(t: Turn) -> StepResult:
    run_id, key = t.job.run_id, t.holder
    halted = t.ctx.control.halted(run_id)
    if halted:
        return _end(t, PENDING, SKIPPED, reason=halted)
    if t.run.reuse and t.job.spec.fingerprint:
        reused = _reuse(t)
        if reused is not None:
            return reused
    if not t.job.input_urls:
        urls = prepare_inputs(t)
        if isinstance(urls, InputFailed):
            return _end(t, PENDING, FAILED, error=urls.error, reason=urls.reason)
        if isinstance(urls, Wait):
            return urls
        t.ctx.runs.update(run_id, t.job.id, input_urls=urls)
        t.job.input_urls = urls
    budget = t.ctx.budget(t.run.budget_scope)
    if not budget.reserve(entry(t.job), reservation(t.run, t.job)):
        return _end(t, PENDING, SKIPPED, reason="budget", error=budget.state().stopped or "")
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
            return _end(t, PENDING, FAILED, error=str(exc), reason="input")
        events.retry(t.job, "presign", n, str(exc))
        return Wait(backoff(n))
    claimed = t.ctx.runs.claim(run_id, t.job.id, t.job.token)
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
    t.job.posted_at = time.time()
    if not _write_record(t.ctx, t.job):
        _unsent(t)
        n = t.ctx.runs.incr(run_id, t.job.id, "store_attempts")
        events.retry(t.job, "store_record", n, "the record could not be stored before the submit")
        return Wait(backoff(n, 1.0, 30.0))
    verdict = t.ctx.runs.mark_posted(run_id, t.job.id, t.job.token, t.ctx.control.key(run_id), budget.keys[0])
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
            return _end(t, PENDING, SKIPPED, reason="budget", error=why)
        return _end(t, PENDING, SKIPPED, reason=why)
    try:
        sub = client.submit(t.job.spec.model, params)
    except OutcomeUnknown as exc:
        events.submitted(t.job, "unknown")
        return _uncertain(t, SUBMITTING, error=exc.message, reason="submit_outcome_unknown")
    except RateLimited as exc:
        t.ctx.limiter.cool_down("submit", exc.retry_after)
        events.rate_limited(t.job, "submit", exc.retry_after)
        t.ctx.runs.bump(run_id, "http_429")
        _unsent(t, refused=True)
        if not names_a_rate(exc.message):  # the service wants fewer in flight: give the slot back
            t.ctx.slots.release(key)
            _tell_slots(t.ctx, None)
        return Wait(exc.retry_after if exc.retry_after is not None else 1.0)
    except PaymentRequired as exc:
        events.submitted(t.job, "refused")
        t.ctx.control.halt(run_id, PAYMENT)
        return _end(t, SUBMITTING, SKIPPED, error=exc.message, reason=PAYMENT)
    except AuthError as exc:
        events.submitted(t.job, "refused")
        t.ctx.control.halt(run_id, refused_by(exc))
        return _end(t, SUBMITTING, FAILED, error=exc.message, reason=AUTH)
    except BadRequest as exc:
        events.submitted(t.job, "refused")
        return _end(t, SUBMITTING, FAILED, error=exc.message, reason="bad_request")
    except TransientError as exc:  # never left this machine: nothing was created
        _unsent(t, refused=True, uncount=False)
        t.ctx.runs.update(run_id, t.job.id, error=redact_links(exc.message))
        t.ctx.runs.bump(run_id, "retries")
        events.retry(t.job, "submit", t.job.attempts, exc.message)
        if t.job.attempts >= t.ctx.settings.max_attempts:
            return _end(t, PENDING, FAILED, error=exc.message, reason="unreachable")
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
            moved = _move(
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
        moved = _move(t, SUBMITTING, SUBMITTED, bump="submitted", prediction_id=stored["prediction_id"],
                      submitted_at=repr(stored.get("submitted_at") or t.job.posted_at))  # fmt: skip
        return Next() if moved == "ok" else Stale()
    return _uncertain(
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


# -- submitted: poll, adaptively ----------------------------------------------------------------


def _submitted(t: Turn) -> StepResult:
    run_id = t.job.run_id
    t.ctx.slots.renew(t.holder)
    _renew_claim(t)
    later = t.ctx.limiter.take("poll")
    if later:
        return Wait(later)
    polls = t.ctx.runs.count_poll(run_id, t.job.id)
    events.polled()
    elapsed = time.time() - (t.job.submitted_at or time.time())
    try:
        pred = t.ctx.client(t.run.api_base).get_prediction(t.job.prediction_id)
    except RateLimited as exc:
        t.ctx.limiter.cool_down("poll", exc.retry_after)
        events.rate_limited(t.job, "poll", exc.retry_after)
        return Wait(exc.retry_after or 1.0)
    except AuthError as exc:
        t.ctx.control.halt(run_id, refused_by(exc))
        t.ctx.runs.update(run_id, t.job.id, error=exc.message)
        return Done()  # left submitted: `resume` polls it again
    except BadRequest as exc:  # 400/404 for an id the service gave us
        if elapsed < t.ctx.settings.warmup_grace:  # the service is still warming the prediction up
            return Wait(next_poll(t, elapsed))
        return _overdue(t, error=f"the service lost the prediction: {exc.message}", reason="prediction_lost")
    except ServiceError as exc:
        t.ctx.runs.bump(run_id, "retries")
        events.retry(t.job, "poll", polls, exc.message)
        if elapsed > t.ctx.settings.poll_deadline:
            return _overdue(t, error=f"no answer before the deadline: {exc.message}", reason="poll_deadline")
        return Wait(backoff(polls, 1.0, 30.0))
    if pred.state is State.RUNNING:
        if elapsed > t.ctx.settings.poll_deadline:
            return _overdue(t, reason="poll_deadline", error=f"still {pred.status or 'running'} after {int(elapsed)} s")
        if polls == 1:  # each job teaches the run's poll times once, at its first poll
            t.ctx.polls.still_running(run_id, t.job.spec.model, elapsed)
        return Wait(next_poll(t, elapsed))
    if polls == 1:
        t.ctx.polls.learn(run_id, t.job.spec.model, elapsed if pred.predict_time is None else pred.predict_time)
    if pred.state is State.FAILED:
        error = pred.error or f"the prediction ended '{pred.status}'"
        return _end(t, SUBMITTED, FAILED, error=error, reason=pred.status or "failed")
    price = pred.price_micros if pred.price_micros is not None else t.run.list_price(t.job.spec.model)
    if not pred.outputs:
        return _end(t, SUBMITTED, FAILED, error="completed without outputs", reason="no_outputs", cost=price)
    t.ctx.slots.release(t.holder)
    _move(t, SUBMITTED, FETCHING, service_outputs=list(pred.outputs), nsfw=list(pred.nsfw), price_micros=str(price))
    # With a fetch queue of its own (hosts near the bucket) the download goes there, now.
    return Wait(0.0) if t.run.fetch_queue and t.run.fetch_queue != t.run.queue else Next()


# -- fetching: stream each output, check it, store it -----------------------------------------


def _output_lost(t: Turn, error: str, reason: str, price: int, outputs: list[str]) -> Next:
    """A paid output that cannot be had: the job fails, and its cost still counts."""
    return _end(t, FETCHING, FAILED, error=error, reason=reason, cost=price, outputs=outputs)


def _fetching(t: Turn) -> StepResult:
    run_id = t.job.run_id
    price = t.job.price_micros if t.job.price_micros is not None else t.run.list_price(t.job.spec.model)
    outputs = list(t.job.outputs)
    client = t.ctx.client(t.run.api_base)
    storage = t.ctx.storage(run_id)
    _renew_claim(t)
    for n, url in enumerate(t.job.service_outputs):
        if n < len(outputs):
            continue
        try:
            data = client.download(url).content
            info = inspect(data)
        except (NotAnImage, BadOutput, BadRequest) as exc:
            return _output_lost(t, f"output {n}: {exc}", "bad_output", price, outputs)
        except ServiceError as exc:
            k = t.ctx.runs.incr(run_id, t.job.id, "fetch_attempts")
            t.ctx.runs.bump(run_id, "retries")
            if k >= t.ctx.settings.max_fetch_attempts:
                return _output_lost(t, f"output {n}: {exc}", "fetch", price, outputs)
            events.retry(t.job, "fetch", k, str(exc))
            return Wait(backoff(k, 1.0, 60.0))
        key = f"outputs/{t.job.id}/{n}.{info.extension}"
        try:
            uri = storage.put_bytes(
                key,
                data,
                info.content_type,
                metadata={
                    "job-id": t.job.id,
                    "model": t.job.spec.model,
                    "prediction-id": t.job.prediction_id,
                    "run-id": run_id,
                },
            )
        except StorageError as exc:
            k = t.ctx.runs.incr(run_id, t.job.id, "store_attempts")
            events.retry(t.job, "store_output", k, str(exc))
            return Wait(backoff(k, 1.0, 30.0))
        store_output_thumbnail(storage, t.job.id, n, data)
        outputs.append(uri)
        if len(outputs) < len(t.job.service_outputs):  # the last one is written with the final state
            t.ctx.runs.update(run_id, t.job.id, outputs=outputs)
    if t.job.spec.fingerprint and t.run.reuse_roots:  # every output is stored: later rows may reuse them
        entry = new_entry(
            t.job.spec.fingerprint, run_id, t.job.id, t.job.prediction_id, t.job.spec.model, outputs, price
        )
        try:
            t.ctx.indexes(run_id)[0].put(entry)
        except StorageError as exc:
            k = t.ctx.runs.incr(run_id, t.job.id, "store_attempts")
            events.retry(t.job, "store_index", k, str(exc))
            if k < t.ctx.settings.max_store_attempts:
                return Wait(backoff(k, 1.0, 30.0))
    return _end(t, FETCHING, SUCCEEDED, cost=price, outputs=outputs)
