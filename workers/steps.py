"""The job state machine: each call reads the job's state and does the next step.

A redelivered or duplicated task message continues where the last one stopped:
the submit is claimed atomically, by the message holding the job's token, once its
send time has come; the claim is marked as sent only at the last check before the
POST, so a claim that never left goes back to pending (never `uncertain`); the
prediction id is made durable before anything else; and every final transition (and
its cost, on the ledger entry of the job's attempt) happens once. `advance` returns
the countdown for the next message, None when the job is done, or STALE when this
message no longer drives the job.
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

log = logging.getLogger("seedream.jobs")
NEXT = -1.0  # the state changed: take the next step now
HOLD_MAX = 2.0  # the longest a send waits in its thread for its turn; longer, and it comes back later
STALE = -2.0  # this message does not drive the job (a duplicate, or the job was taken over)
REUSE_WAIT = 1.0  # how often a job waiting for another's identical edit looks again
REUSE_TRIES = 20  # storage failures while copying a stored edit (about 8 minutes) before the job pays


@dataclass(frozen=True)
class Outcome:
    """The countdown for the job's next message (see `advance`), and whether this call sent the
    job's submit: a place in the run's ready part opened, for the caller to let the next job in."""

    countdown: float | None
    submitted: bool = False


def advance(ctx: Context, run_id: str, job_id: str, token: str, *, due_at: float) -> float | None:
    """Drive the job as far as it goes now; `due_at` is when the watchdog may take it over."""
    return drive(ctx, run_id, job_id, token, due_at=due_at).countdown


def drive(ctx: Context, run_id: str, job_id: str, token: str, *, due_at: float) -> Outcome:
    rec = ctx.runs.begin(run_id, job_id, token, due_at)
    for _ in range(8):
        if rec is None or rec.token != token:
            return Outcome(STALE)
        meta = ctx.meta(run_id)
        if rec.final:
            return Outcome(_final(ctx, meta, rec))
        asleep = (rec.wake_at or 0.0) - time.time()
        if asleep > 0.05:  # a wait longer than one message may hold: another hop
            return Outcome(asleep)
        began = rec.state
        step = {PENDING: _pending, SUBMITTING: _submitting, SUBMITTED: _submitted, FETCHING: _fetching}[began]
        started = time.monotonic()
        wait = step(ctx, meta, rec)
        STEP_SECONDS.labels(began).observe(time.monotonic() - started)
        if wait != NEXT:
            return Outcome(wait, submitted=began == PENDING and rec.state == SUBMITTED)
        rec = ctx.runs.get(run_id, job_id)
    return Outcome(0.0)


# -- helpers -------------------------------------------------------------------------------


def _list_price(meta: dict[str, Any], rec: JobRecord) -> int:
    return int(meta["prices"][rec.spec.model])


def reservation(meta: dict[str, Any], rec: JobRecord) -> int:
    return worst_case(_list_price(meta, rec), rec.spec.params)


def entry(rec: JobRecord) -> str:
    """The job's current ledger entry."""
    return ledger_key(rec.run_id, rec.id, rec.charge)


def next_poll(ctx: Context, rec: JobRecord, elapsed: float | None = None) -> float:
    """Seconds to the job's next poll, on the schedule its run's poll budget allows now."""
    lim, slots = ctx.settings.limits, ctx.slots
    est = ctx.polls.estimate(rec.run_id, rec.spec.model)
    spend = poll_budget(
        submit_rate=lim.submit_rate, poll_rate=lim.poll_rate, scarce=slots.scarce(), slots=slots.capacity(), est=est
    )
    if elapsed is None:
        return ctx.polls.first(rec.run_id, rec.spec.model, spend)
    return ctx.polls.again(rec.run_id, rec.spec.model, elapsed, spend)


def send_settle(ctx: Context) -> float:
    """How long after its POST left a job found `submitting` may still be getting its answer
    recorded by the worker that sent it: the POST's own time-outs and the in-process retries."""
    t = ctx.settings.atlas.timeouts
    return t.connect + t.write + t.read + ctx.settings.id_hold + 5.0


def _move(ctx: Context, rec: JobRecord, expect: JobState, to: JobState, **fields: Any) -> str:
    """A transition (see RunStore.transition), logged and counted when it is made."""
    moved = ctx.runs.transition(rec.run_id, rec.id, expect, to, **fields)
    if moved == "ok":
        events.moved(
            rec,
            expect,
            to,
            cost_micros=int(fields.get("cost_micros") or 0),
            reason=str(fields.get("reason") or ""),
            error=str(fields.get("error") or ""),
        )
    return moved


def _end(
    ctx: Context,
    meta: dict[str, Any],
    rec: JobRecord,
    expect: JobState,
    to: JobState,
    *,
    error: str = "",
    reason: str = "",
    cost: int = 0,
    **fields: Any,
) -> float:
    """Move to a final state once; then, and only if this call made the move, settle or release
    the budget and the slot to match. A message that lost the job (a stale copy, one taken over)
    must not give back what the job's live submit holds. A worker that dies between the move and
    the settlement leaves the reservation held (the cap stays safe); `_final` settles it. The error
    may be the service's, echoing an input's presigned link: its signature never reaches a record."""
    error = redact_links(error)
    moved = _move(
        ctx,
        rec,
        expect,
        to,
        error=error[:2000],
        reason=reason,
        cost_micros=str(cost),
        finished_at=repr(time.time()),
        **fields,
    )
    if moved == "ok":
        _settle(ctx, meta, rec, cost)
        if expect != FETCHING:  # a job fetching gave its slot back when its prediction ended
            ctx.slots.release(f"{rec.run_id}:{rec.id}")
    return NEXT  # the loop in `advance` reads the state the job is really in


def _end_claim(ctx: Context, meta: dict[str, Any], rec: JobRecord, state: JobState) -> None:
    if meta.get("reuse") and rec.spec.fingerprint:
        holder = f"{rec.run_id}:{rec.id}"
        ctx.claims.end(meta["reuse_claims"], rec.spec.fingerprint, holder, succeeded=state == SUCCEEDED)


def _settle(ctx: Context, meta: dict[str, Any], rec: JobRecord, cost: int) -> None:
    """The ledger entry of the job's attempt at its final cost (idempotent)."""
    budget = ctx.budget(meta["budget_scope"])
    if cost:
        budget.settle(entry(rec), cost)
    else:
        budget.release(entry(rec))


def _uncertain(ctx: Context, meta: dict[str, Any], rec: JobRecord, expect: JobState, **why: str) -> float:
    """The POST left and nothing proves what happened: it may have been billed, so it is counted
    at its reservation, never resubmitted."""
    return _end(ctx, meta, rec, expect, UNCERTAIN, cost=reservation(meta, rec), **why)


def _overdue(ctx: Context, meta: dict[str, Any], rec: JobRecord, **why: str) -> float:
    """A prediction with an id and no verdict yet: the run ends with it counted at its reservation;
    `resume` and `reconcile` poll it again and settle its real cost."""
    return _end(ctx, meta, rec, SUBMITTED, OVERDUE, cost=reservation(meta, rec), **why)


def _final(ctx: Context, meta: dict[str, Any], rec: JobRecord) -> float | None:
    """A final job: make sure its settlement, its claim's end (the rows waiting on its edit go on)
    and its durable record are written (its worker may have died right after the move), then
    tell the run. `_end` leads here at once, so the claim is let go once, here."""
    if not rec.record_written:
        _settle(ctx, meta, rec, rec.cost_micros)
        _end_claim(ctx, meta, rec, rec.state)
        try:
            ctx.storage(rec.run_id).put_json(f"records/{rec.id}.json", rec.to_json())
        except StorageError as exc:
            n = ctx.runs.incr(rec.run_id, rec.id, "store_attempts")
            events.retry(rec, "store_record", n, str(exc))
            return backoff(n, 1.0, 60.0) if n < ctx.settings.max_store_attempts else None
        finished = ctx.runs.record_stored(rec.run_id, rec.id, succeeded=rec.state == SUCCEEDED)
        maybe_finalize(ctx, rec.run_id, finished)
    return None


def _unsent(
    ctx: Context, rec: JobRecord, *, refused: bool = False, uncount: bool = True, rewrite: bool = False
) -> bool:
    """The submit did not leave (or the service refused it): the job is pending again, in Redis
    and then, if its record was stored as sent (`refused`, `rewrite`), in its durable record,
    so neither the watchdog nor a resume from storage takes it for a sent one. False when it
    had left and `refused` does not say otherwise."""
    if not ctx.runs.hand_back(rec.run_id, rec.id, refused=refused, uncount=uncount):
        return False
    rec.state, rec.posted_at = PENDING, None
    if refused or rewrite:
        _write_record(ctx, rec, tries=3)
    return True


def _write_record(ctx: Context, rec: JobRecord, tries: int = 1) -> bool:
    for n in range(tries):
        try:
            ctx.storage(rec.run_id).put_json(f"records/{rec.id}.json", rec.to_json())
            return True
        except StorageError as exc:  # written again when the job ends
            log.warning("record of %s not stored (%s)", rec.id, exc)
            if n + 1 < tries:
                time.sleep(min(2.0, 0.2 * 2**n))
    return False


# -- reuse: an edit already stored is copied, not paid again ----------------------------------


def _reuse(ctx: Context, meta: dict[str, Any], rec: JobRecord) -> float | None:
    """Take the claim on the job's edit (jobs/claims.py) and, where the edit may be stored, copy
    its outputs: the job then succeeds at no cost, nothing reserved, no slot or send taken. A
    countdown while another job makes the same edit or storage fails; None: this job pays for it."""
    root, fp, me = meta["reuse_claims"], rec.spec.fingerprint, f"{rec.run_id}:{rec.id}"
    got = ctx.claims.take(root, fp, me)
    if got == HELD:
        holder = ctx.claims.holder(root, fp)
        if holder is None or not _holder_gone(ctx, holder) or not ctx.claims.take_from(root, fp, holder, me):
            if not rec.reuse_look:  # once it is made, look for it
                ctx.runs.update(rec.run_id, rec.id, reuse_look="1")
            return REUSE_WAIT
        got, rec.reuse_look = FRESH, True  # the holder may have stored it before it went
    if got != DONE and not rec.reuse_look:
        return None
    try:
        found = _copy_stored(ctx, rec)
    except StorageError as exc:  # a few tries, then the edit is paid for: a copy must not stall a row
        k = ctx.runs.incr(rec.run_id, rec.id, "reuse_attempts")
        events.retry(rec, "reuse", k, str(exc))
        if k < REUSE_TRIES:
            return backoff(k, 1.0, 30.0)
        found = None
    if found is not None:
        entry, uris, foreign = found
        if foreign:  # copied in from another output (--reuse-from): later runs into this one find it here
            _index_copy(ctx, rec, entry, uris)
        return _end(ctx, meta, rec, PENDING, SUCCEEDED, bump="reused", outputs=uris,
                    reused_from=f"{entry.run_id}/{entry.job_id}", saved_micros=str(entry.cost_micros))  # fmt: skip
    ctx.runs.update(rec.run_id, rec.id, reuse_look="")  # not stored (or its outputs are gone): pay for it
    rec.reuse_look = False
    if got == DONE and ctx.claims.take(root, fp, me, over_done=True) not in (FRESH, MINE):
        return REUSE_WAIT
    return None


def _copy_stored(ctx: Context, rec: JobRecord) -> tuple[Entry, list[str], bool] | None:
    """The entry copied, the copies, and whether it came from another output than the run's."""
    indexes = ctx.indexes(rec.run_id)
    for index, entry in find(indexes, rec.spec.fingerprint):
        if entry.run_id == rec.run_id and entry.job_id == rec.id:
            continue  # its own earlier edit, whose outputs are its own already: a stale entry
        metadata = {"job-id": rec.id, "run-id": rec.run_id, "model": entry.model,
                    "prediction-id": entry.prediction_id, "reused-from": f"{entry.run_id}/{entry.job_id}"}  # fmt: skip
        uris = index.copy_outputs(entry, ctx.storage(rec.run_id), rec.id, metadata)
        if uris is not None:
            return entry, uris, index is not indexes[0]
    return None


def _index_copy(ctx: Context, rec: JobRecord, entry: Entry, uris: list[str]) -> None:
    copy = new_entry(entry.fingerprint, rec.run_id, rec.id, entry.prediction_id, entry.model, uris, entry.cost_micros)
    try:
        ctx.indexes(rec.run_id)[0].put(copy)
    except StorageError as exc:  # the copy stands; a later run may pay for this edit again
        log.warning("results index entry for %s not stored (%s)", rec.id, exc)


def _holder_gone(ctx: Context, holder: str) -> bool:
    """The job holding a claim has ended (its worker died before ending the claim). A holder Redis
    no longer knows is not taken over: its run may be resumed from storage with its prediction
    still running, and would then hold the claim again; if it never is, the lease runs out."""
    run_id, _, job_id = holder.partition(":")
    held = ctx.runs.get(run_id, job_id) if job_id else None
    return held is not None and held.final


def _renew_claim(ctx: Context, meta: dict[str, Any], rec: JobRecord) -> None:
    if meta.get("reuse") and rec.spec.fingerprint:
        ctx.claims.take(meta["reuse_claims"], rec.spec.fingerprint, f"{rec.run_id}:{rec.id}")


# -- pending: prepare, reserve, take a slot and a send time, claim, POST once ---------------


def _pending(ctx: Context, meta: dict[str, Any], rec: JobRecord) -> float | None:
    run_id, key = rec.run_id, f"{rec.run_id}:{rec.id}"
    halted = ctx.control.halted(run_id)
    if halted:
        return _end(ctx, meta, rec, PENDING, SKIPPED, reason=halted)
    if meta.get("reuse") and rec.spec.fingerprint:
        reused = _reuse(ctx, meta, rec)
        if reused is not None:
            return reused
    if not rec.input_urls:
        urls = prepare_inputs(ctx, meta, rec)
        if isinstance(urls, InputFailed):
            return _end(ctx, meta, rec, PENDING, FAILED, error=urls.error, reason=urls.reason)
        if isinstance(urls, float):
            return urls
        ctx.runs.update(run_id, rec.id, input_urls=urls)
        rec.input_urls = urls
    budget = ctx.budget(meta["budget_scope"])
    if not budget.reserve(entry(rec), reservation(meta, rec)):
        return _end(ctx, meta, rec, PENDING, SKIPPED, reason="budget", error=budget.state().stopped or "")
    wait = ctx.slots.acquire(key)
    if wait > 0:  # the service's limit binds: a slot freed by a poll is soon taken again
        return min(wait, 0.5)
    later, send_at = ctx.limiter.book("submit")
    if later:
        return later
    # Every wait comes before the claim, so a worker killed in one leaves the job pending: first
    # the wait for the booked send time, then the pacing check (the last word on when a send may
    # leave: the time between it and the POST is the jitter the service's small burst absorbs).
    time.sleep(max(0.0, send_at - time.monotonic()))
    paced = ctx.limiter.pace("submit")
    if not paced.go or paced.wait > HOLD_MAX:  # a 429 since this send was booked, or sends piled up
        return max(paced.wait, 0.001)
    time.sleep(paced.wait)
    try:  # signed now, the last moment before the claim: fresh however long the job waited
        links = input_links(ctx, rec.input_urls)
    except StorageError as exc:
        n = ctx.runs.incr(run_id, rec.id, "attempts")
        if n >= ctx.settings.max_attempts:
            return _end(ctx, meta, rec, PENDING, FAILED, error=str(exc), reason="input")
        events.retry(rec, "presign", n, str(exc))
        return backoff(n)
    claimed = ctx.runs.claim(run_id, rec.id, rec.token)
    if claimed == "stale":
        return STALE
    if claimed != "ok":
        return NEXT
    events.moved(rec, PENDING, SUBMITTING)
    rec.state, rec.attempts = SUBMITTING, rec.attempts + 1
    params: dict[str, Any] = {"prompt": rec.spec.prompt, "images": links, **rec.spec.params}
    if rec.spec.size:
        params["size"] = rec.spec.size
    client = ctx.client(meta["api_base"])
    # Durable before the POST: a run resumed from storage never resubmits a job whose record says
    # `submitting`. It is written just before the last check, so that only the send itself stands
    # between the check that marks the POST as leaving and the POST, and nothing but these two
    # steps between the record saying "sent" and the mark.
    rec.posted_at = time.time()
    if not _write_record(ctx, rec):
        _unsent(ctx, rec)
        n = ctx.runs.incr(run_id, rec.id, "store_attempts")
        events.retry(rec, "store_record", n, "the record could not be stored before the submit")
        return backoff(n, 1.0, 30.0)
    verdict = ctx.runs.mark_posted(run_id, rec.id, rec.token, ctx.control.key(run_id), budget.keys[0])
    if verdict == "lost":
        # Taken over while this worker stood still: never POST for it, and if the job ended
        # meanwhile, make sure its final record is the one in storage (its new driver writes
        # any other state it reaches; until then the record errs on the side of "sent").
        cur = ctx.runs.get(run_id, rec.id)
        if cur is not None and cur.settled:
            _write_record(ctx, cur)
        return STALE
    if verdict != "ok":
        _unsent(ctx, rec, rewrite=True)
        kind, _, why = verdict.partition(":")
        if kind == "budget":
            return _end(ctx, meta, rec, PENDING, SKIPPED, reason="budget", error=why)
        return _end(ctx, meta, rec, PENDING, SKIPPED, reason=why)
    try:
        sub = client.submit(rec.spec.model, params)
    except OutcomeUnknown as exc:
        events.submitted(rec, "unknown")
        return _uncertain(ctx, meta, rec, SUBMITTING, error=exc.message, reason="submit_outcome_unknown")
    except RateLimited as exc:
        ctx.limiter.cool_down("submit", exc.retry_after)
        events.rate_limited(rec, "submit", exc.retry_after)
        ctx.runs.bump(run_id, "http_429")
        _unsent(ctx, rec, refused=True)
        if not names_a_rate(exc.message):  # the service wants fewer in flight: give the slot back
            ctx.slots.release(key)
            _tell_slots(ctx, None)
        return exc.retry_after if exc.retry_after is not None else 1.0
    except PaymentRequired as exc:
        events.submitted(rec, "refused")
        ctx.control.halt(run_id, PAYMENT)
        return _end(ctx, meta, rec, SUBMITTING, SKIPPED, error=exc.message, reason=PAYMENT)
    except AuthError as exc:
        events.submitted(rec, "refused")
        ctx.control.halt(run_id, refused_by(exc))
        return _end(ctx, meta, rec, SUBMITTING, FAILED, error=exc.message, reason=AUTH)
    except BadRequest as exc:
        events.submitted(rec, "refused")
        return _end(ctx, meta, rec, SUBMITTING, FAILED, error=exc.message, reason="bad_request")
    except TransientError as exc:  # never left this machine: nothing was created
        _unsent(ctx, rec, refused=True, uncount=False)
        ctx.runs.update(run_id, rec.id, error=redact_links(exc.message))
        ctx.runs.bump(run_id, "retries")
        events.retry(rec, "submit", rec.attempts, exc.message)
        if rec.attempts >= ctx.settings.max_attempts:
            return _end(ctx, meta, rec, PENDING, FAILED, error=exc.message, reason="unreachable")
        return backoff(rec.attempts)
    events.submitted(rec, "accepted", sub.id)
    countdown = _hold_id(ctx, meta, rec, sub.id, time.time())
    _tell_slots(ctx, key)
    return countdown


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


def _hold_id(ctx: Context, meta: dict[str, Any], rec: JobRecord, prediction_id: str, now: float) -> float | None:
    """The POST answered with an id: make it durable before anything else can fail, first in the
    job's record in storage, then in Redis (retried here for a while: this frame may be the only
    place the id exists). Until Redis has it the job stays `submitting` with its POST marked sent,
    and a message that finds it so reads the id back from storage (`_submitting`)."""
    rec.prediction_id, rec.submitted_at, rec.state = prediction_id, now, SUBMITTED
    _write_record(ctx, rec, tries=3)
    deadline = time.monotonic() + ctx.settings.id_hold
    while True:
        try:
            moved = _move(
                ctx, rec, SUBMITTING, SUBMITTED, bump="submitted", prediction_id=prediction_id, submitted_at=repr(now)
            )
            break
        except StateError as exc:
            if time.monotonic() > deadline:
                log.error("job %s/%s: prediction %s not recorded in Redis (%s); its stored record holds it",
                          rec.run_id, rec.id, prediction_id, exc)  # fmt: skip
                raise
            time.sleep(0.5)
    if moved == "ok":
        return next_poll(ctx, rec)
    return _adopt(ctx, meta, rec, moved)


def _adopt(ctx: Context, meta: dict[str, Any], rec: JobRecord, state: str) -> float | None:
    """The job was ended (as uncertain) while its POST was being answered: the prediction exists,
    so it is taken back, polled and settled at its real cost, never left final without a verdict."""
    run_id = rec.run_id
    cur = ctx.runs.get(run_id, rec.id)
    if cur is None or cur.prediction_id or state != UNCERTAIN:
        log.warning("job %s/%s is %s while its submit answered with prediction %s", run_id, rec.id, state,
                    rec.prediction_id)  # fmt: skip
        if cur is not None and not cur.prediction_id:
            ctx.runs.update(run_id, rec.id, prediction_id=rec.prediction_id)
        return STALE
    if not ctx.runs.reopen(run_id, rec.id, UNCERTAIN, SUBMITTED, rec.token):
        return STALE
    ctx.budget(meta["budget_scope"]).unsettle(entry(rec))
    ctx.runs.update(run_id, rec.id, prediction_id=rec.prediction_id, submitted_at=repr(rec.submitted_at),
                    record_written="0")  # fmt: skip
    ctx.runs.bump(run_id, "submitted")
    ctx.runs.reopen_run(run_id)  # its report, if written, is written again when the job ends
    ctx.slots.acquire(f"{run_id}:{rec.id}")
    _write_record(ctx, rec)
    return next_poll(ctx, rec)


# -- submitting: found after a crash between the claim and the answer --------------------------


def _submitting(ctx: Context, meta: dict[str, Any], rec: JobRecord) -> float | None:
    if rec.posted_at is None:
        # Claimed, never sent: its worker stopped before the POST, or this is a second copy of the
        # message that claimed it. It waits again, in storage too (its record may say
        # `submitting`); the claimant's last check now fails.
        _unsent(ctx, rec, rewrite=True)
        return NEXT
    left = send_settle(ctx) - (time.time() - rec.posted_at)
    if left > 0:  # its sender may still be recording the answer
        return left
    stored = _stored_record(ctx, rec)
    if stored.get("prediction_id"):  # the answer reached storage but not Redis
        moved = _move(ctx, rec, SUBMITTING, SUBMITTED, bump="submitted", prediction_id=stored["prediction_id"],
                      submitted_at=repr(stored.get("submitted_at") or rec.posted_at))  # fmt: skip
        return NEXT if moved == "ok" else STALE
    return _uncertain(
        ctx,
        meta,
        rec,
        SUBMITTING,
        reason="worker_lost_during_submit",
        error="the worker stopped while its submit was sent; the prediction may exist (see the account's usage)",
    )


def _stored_record(ctx: Context, rec: JobRecord) -> dict[str, Any]:
    try:
        got = ctx.storage(rec.run_id).get_json(f"records/{rec.id}.json")
    except StorageError as exc:
        raise TransientStorage(str(exc)) from None
    return got if isinstance(got, dict) else {}


class TransientStorage(StateError):
    """Storage could not be read to decide a job's fate: try the message again later."""


# -- submitted: poll, adaptively ----------------------------------------------------------------


def _submitted(ctx: Context, meta: dict[str, Any], rec: JobRecord) -> float | None:
    run_id = rec.run_id
    ctx.slots.renew(f"{run_id}:{rec.id}")
    _renew_claim(ctx, meta, rec)
    later = ctx.limiter.take("poll")
    if later:
        return later
    polls = ctx.runs.count_poll(run_id, rec.id)
    events.polled()
    elapsed = time.time() - (rec.submitted_at or time.time())
    try:
        pred = ctx.client(meta["api_base"]).get_prediction(rec.prediction_id)
    except RateLimited as exc:
        ctx.limiter.cool_down("poll", exc.retry_after)
        events.rate_limited(rec, "poll", exc.retry_after)
        return exc.retry_after or 1.0
    except AuthError as exc:
        ctx.control.halt(run_id, refused_by(exc))
        ctx.runs.update(run_id, rec.id, error=exc.message)
        return None  # left submitted: `resume` polls it again
    except BadRequest as exc:  # 400/404 for an id the service gave us
        if elapsed < ctx.settings.warmup_grace:  # the service is still warming the prediction up
            return next_poll(ctx, rec, elapsed)
        return _overdue(
            ctx, meta, rec, error=f"the service lost the prediction: {exc.message}", reason="prediction_lost"
        )
    except ServiceError as exc:
        ctx.runs.bump(run_id, "retries")
        events.retry(rec, "poll", polls, exc.message)
        if elapsed > ctx.settings.poll_deadline:
            return _overdue(
                ctx, meta, rec, error=f"no answer before the deadline: {exc.message}", reason="poll_deadline"
            )
        return backoff(polls, 1.0, 30.0)
    if pred.state is State.RUNNING:
        if elapsed > ctx.settings.poll_deadline:
            return _overdue(
                ctx, meta, rec, reason="poll_deadline", error=f"still {pred.status or 'running'} after {int(elapsed)} s"
            )
        if polls == 1:  # each job teaches the run's poll times once, at its first poll
            ctx.polls.still_running(run_id, rec.spec.model, elapsed)
        return next_poll(ctx, rec, elapsed)
    if polls == 1:
        ctx.polls.learn(run_id, rec.spec.model, elapsed if pred.predict_time is None else pred.predict_time)
    if pred.state is State.FAILED:
        error = pred.error or f"the prediction ended '{pred.status}'"
        return _end(ctx, meta, rec, SUBMITTED, FAILED, error=error, reason=pred.status or "failed")
    price = pred.price_micros if pred.price_micros is not None else _list_price(meta, rec)
    if not pred.outputs:
        return _end(
            ctx, meta, rec, SUBMITTED, FAILED, error="completed without outputs", reason="no_outputs", cost=price
        )
    ctx.slots.release(f"{run_id}:{rec.id}")
    _move(
        ctx, rec, SUBMITTED, FETCHING, service_outputs=list(pred.outputs), nsfw=list(pred.nsfw), price_micros=str(price)
    )
    # With a fetch queue of its own (hosts near the bucket) the download goes there, now.
    return 0.0 if meta.get("fetch_queue") and meta["fetch_queue"] != meta.get("queue") else NEXT


# -- fetching: stream each output, check it, store it -----------------------------------------


def _output_lost(
    ctx: Context, meta: dict[str, Any], rec: JobRecord, error: str, reason: str, price: int, outputs: list[str]
) -> float:
    """A paid output that cannot be had: the job fails, and its cost still counts."""
    return _end(ctx, meta, rec, FETCHING, FAILED, error=error, reason=reason, cost=price, outputs=outputs)


def _fetching(ctx: Context, meta: dict[str, Any], rec: JobRecord) -> float | None:
    run_id = rec.run_id
    price = rec.price_micros if rec.price_micros is not None else _list_price(meta, rec)
    outputs = list(rec.outputs)
    client = ctx.client(meta["api_base"])
    storage = ctx.storage(run_id)
    _renew_claim(ctx, meta, rec)
    for n, url in enumerate(rec.service_outputs):
        if n < len(outputs):
            continue
        try:
            data = client.download(url).content
            info = inspect(data)
        except (NotAnImage, BadOutput, BadRequest) as exc:
            return _output_lost(ctx, meta, rec, f"output {n}: {exc}", "bad_output", price, outputs)
        except ServiceError as exc:
            k = ctx.runs.incr(run_id, rec.id, "fetch_attempts")
            ctx.runs.bump(run_id, "retries")
            if k >= ctx.settings.max_fetch_attempts:
                return _output_lost(ctx, meta, rec, f"output {n}: {exc}", "fetch", price, outputs)
            events.retry(rec, "fetch", k, str(exc))
            return backoff(k, 1.0, 60.0)
        key = f"outputs/{rec.id}/{n}.{info.extension}"
        try:
            uri = storage.put_bytes(
                key,
                data,
                info.content_type,
                metadata={
                    "job-id": rec.id,
                    "model": rec.spec.model,
                    "prediction-id": rec.prediction_id,
                    "run-id": run_id,
                },
            )
        except StorageError as exc:
            k = ctx.runs.incr(run_id, rec.id, "store_attempts")
            events.retry(rec, "store_output", k, str(exc))
            return backoff(k, 1.0, 30.0)
        store_output_thumbnail(storage, rec.id, n, data)
        outputs.append(uri)
        if len(outputs) < len(rec.service_outputs):  # the last one is written with the final state
            ctx.runs.update(run_id, rec.id, outputs=outputs)
    if rec.spec.fingerprint and meta.get("reuse_roots"):  # every output is stored: later rows may reuse them
        entry = new_entry(rec.spec.fingerprint, run_id, rec.id, rec.prediction_id, rec.spec.model, outputs, price)
        try:
            ctx.indexes(run_id)[0].put(entry)
        except StorageError as exc:
            k = ctx.runs.incr(run_id, rec.id, "store_attempts")
            events.retry(rec, "store_index", k, str(exc))
            if k < ctx.settings.max_store_attempts:
                return backoff(k, 1.0, 30.0)
    return _end(ctx, meta, rec, FETCHING, SUCCEEDED, cost=price, outputs=outputs)
