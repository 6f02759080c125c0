"""The job state machine: each call reads the job's state and does the next step.

A redelivered or duplicated task message continues where the last one stopped:
the submit is claimed atomically before the POST, the prediction id is stored
before anything else, and every final transition (and its cost) happens once.
`advance` returns the countdown for the next message, None when the job is done, or STALE
when this message no longer drives the job.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from jobs.control import PAYMENT
from jobs.errors import (
    AuthError,
    BadOutput,
    BadRequest,
    OutcomeUnknown,
    PaymentRequired,
    RateLimited,
    ServiceError,
    StorageError,
    TransientError,
)
from jobs.images import NotAnImage, inspect
from jobs.records import (
    FAILED,
    FETCHING,
    PENDING,
    SKIPPED,
    SUBMITTED,
    SUBMITTING,
    SUCCEEDED,
    UNCERTAIN,
    JobRecord,
)
from jobs.thumbs import store_output_thumbnail
from workers import events
from workers.context import Context
from workers.metrics import STEP_SECONDS
from workers.prediction import State

log = logging.getLogger("seedream.jobs")
NEXT = -1.0  # the state changed: take the next step now
HOLD_MAX = 2.0  # the longest a send waits in its thread for its turn; longer, and it comes back later
RECHECK_AFTER = 0.05  # a pace wait longer than this is checked again for a cancel before the POST
STALE = -2.0  # this message does not drive the job (a duplicate, or the job was taken over)


def backoff(attempt: int, base: float = 1.0, cap: float = 60.0) -> float:
    return min(cap, base * 2 ** max(0, attempt - 1)) * (0.5 + random.random() / 2)


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


def _move(ctx: Context, rec: JobRecord, expect: str, to: str, **fields: Any) -> str:
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
    expect: str,
    to: str,
    *,
    error: str = "",
    reason: str = "",
    cost: int = 0,
    **fields: Any,
) -> float:
    """Move to a final state once; settle or release the budget and the slot to match."""
    budget = ctx.budget(meta["budget_scope"])
    if cost:
        budget.settle(rec.id, cost)
    else:
        budget.release(rec.id)
    if expect != FETCHING:  # a job fetching gave its slot back when its prediction ended
        ctx.slots.release(f"{rec.run_id}:{rec.id}")
    _move(
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
    return NEXT  # the loop in `advance` reads the state the job is really in


def _uncertain(ctx: Context, meta: dict[str, Any], rec: JobRecord, expect: str, **why: str) -> float:
    """The outcome is unknown: it may have been billed, so it is counted at list price, never resubmitted."""
    return _end(ctx, meta, rec, expect, UNCERTAIN, cost=_list_price(meta, rec), **why)


def _final(ctx: Context, meta: dict[str, Any], rec: JobRecord) -> float | None:
    """A final job: make sure its durable record is written, then tell the run."""
    if not rec.record_written:
        try:
            ctx.storage(rec.run_id).put_json(f"records/{rec.id}.json", rec.to_json())
        except StorageError as exc:
            n = ctx.runs.incr(rec.run_id, rec.id, "store_attempts")
            events.retry(rec, "store_record", n, str(exc))
            return backoff(n, 1.0, 60.0) if n < ctx.settings.max_store_attempts else None
        finished = ctx.runs.record_stored(rec.run_id, rec.id, succeeded=rec.state == SUCCEEDED)
        from workers.finish import maybe_finalize

        maybe_finalize(ctx, rec.run_id, finished)
    return None


def _unsent(ctx: Context, rec: JobRecord) -> None:
    """The submit did not leave: the job waits again, and the attempt does not count."""
    ctx.runs.incr(rec.run_id, rec.id, "attempts", -1)
    _move(ctx, rec, SUBMITTING, PENDING)


def _must_not_send(ctx: Context, meta: dict[str, Any], rec: JobRecord) -> float | None:
    """The last check before a POST: what to return instead if the job is no longer this
    message's (frozen, cut off, redelivered) or its run was cancelled; None to send."""
    mine, halted = ctx.runs.holds(rec.run_id, rec.id, SUBMITTING, rec.token, flag=ctx.control.key(rec.run_id))
    if not mine:
        # Taken over while this worker stood still: never POST for it, and if the job's final
        # record reached storage before this worker's `submitting` one, put the final one back.
        cur = ctx.runs.get(rec.run_id, rec.id)
        if cur is not None and cur.settled:
            _write_record(ctx, cur)
        return STALE
    if halted:
        return _end(ctx, meta, rec, SUBMITTING, SKIPPED, reason=halted)
    return None


def _write_record(ctx: Context, rec: JobRecord) -> None:
    try:
        ctx.storage(rec.run_id).put_json(f"records/{rec.id}.json", rec.to_json())
    except StorageError as exc:  # written again when the job ends
        log.warning("record of %s not stored at submit (%s)", rec.id, exc)


# -- pending: prepare, reserve, take a slot and a token, claim, POST once --------------------


def _pending(ctx: Context, meta: dict[str, Any], rec: JobRecord) -> float | None:
    run_id, key = rec.run_id, f"{rec.run_id}:{rec.id}"
    halted = ctx.control.halted(run_id)
    if halted:
        return _end(ctx, meta, rec, PENDING, SKIPPED, reason=halted)
    if not rec.input_urls:
        urls = _prepare_inputs(ctx, meta, rec)
        if isinstance(urls, float):
            return urls
        ctx.runs.update(run_id, rec.id, input_urls=urls)
        rec.input_urls = urls
    if not ctx.budget(meta["budget_scope"]).reserve(rec.id, _list_price(meta, rec)):
        return _end(ctx, meta, rec, PENDING, SKIPPED, reason="budget")
    wait = ctx.slots.acquire(key)
    if wait > 0:
        return min(wait, 2.0)
    later, send_at = ctx.limiter.book("submit")
    if later:
        return later
    attempts = rec.attempts + 1  # this message alone drives the job
    if _move(ctx, rec, PENDING, SUBMITTING, count="attempts") != "ok":
        return NEXT
    rec.state = SUBMITTING
    try:  # durable before the POST: a run resumed from storage never resubmits this job
        ctx.storage(run_id).put_json(f"records/{rec.id}.json", rec.to_json())
    except StorageError as exc:
        _move(ctx, rec, SUBMITTING, PENDING, error=str(exc))
        n = ctx.runs.incr(run_id, rec.id, "store_attempts")
        events.retry(rec, "store_record", n, str(exc))
        return backoff(n, 1.0, 30.0)
    params: dict[str, Any] = {"prompt": rec.spec.prompt, "images": rec.input_urls, **rec.spec.params}
    if rec.spec.size:
        params["size"] = rec.spec.size
    client = ctx.client(meta["api_base"])
    time.sleep(max(0.0, send_at - time.monotonic()))  # the rest of the wait for this send time
    stop = _must_not_send(ctx, meta, rec)
    if stop is not None:
        return stop
    # The pace check goes last, nearest the POST: the time between it and the send is the
    # jitter the service's small burst must absorb.
    paced = ctx.limiter.pace("submit")
    if not paced.go or paced.wait > HOLD_MAX:  # a 429 since this send was booked, or sends piled up
        _unsent(ctx, rec)
        return max(paced.wait, 0.001)
    time.sleep(paced.wait)
    if paced.wait > RECHECK_AFTER:  # a cancel during a longer wait must still stop the POST
        stop = _must_not_send(ctx, meta, rec)
        if stop is not None:
            return stop
    try:
        sub = client.submit(rec.spec.model, params)
    except OutcomeUnknown as exc:
        events.submitted(rec, "unknown")
        return _uncertain(ctx, meta, rec, SUBMITTING, error=exc.message, reason="submit_outcome_unknown")
    except RateLimited as exc:
        ctx.limiter.cool_down("submit", exc.retry_after)
        events.rate_limited(rec, "submit", exc.retry_after)
        ctx.runs.bump(run_id, "http_429")
        _unsent(ctx, rec)
        return exc.retry_after if exc.retry_after is not None else 1.0
    except PaymentRequired as exc:
        events.submitted(rec, "refused")
        ctx.control.halt(run_id, PAYMENT)
        return _end(ctx, meta, rec, SUBMITTING, SKIPPED, error=exc.message, reason=PAYMENT)
    except AuthError as exc:
        events.submitted(rec, "refused")
        ctx.control.halt(run_id, "auth")
        return _end(ctx, meta, rec, SUBMITTING, FAILED, error=exc.message, reason="auth")
    except BadRequest as exc:
        events.submitted(rec, "refused")
        return _end(ctx, meta, rec, SUBMITTING, FAILED, error=exc.message, reason="bad_request")
    except TransientError as exc:  # never left this machine: nothing was created
        _move(ctx, rec, SUBMITTING, PENDING, error=exc.message)
        ctx.runs.bump(run_id, "retries")
        events.retry(rec, "submit", attempts, exc.message)
        if attempts >= ctx.settings.max_attempts:
            return _end(ctx, meta, rec, PENDING, FAILED, error=exc.message, reason="unreachable")
        return backoff(attempts)
    now = time.time()
    events.submitted(rec, "accepted", sub.id)
    moved = _move(ctx, rec, SUBMITTING, SUBMITTED, bump="submitted", prediction_id=sub.id, submitted_at=repr(now))
    if moved != "ok":
        # Taken over (as uncertain, at list price) in the instant between the check and the POST:
        # its final record stands; the id is logged so the user can find this prediction.
        log.warning("job %s/%s ended %s while its submit was sent; prediction %s", run_id, rec.id, moved, sub.id)
        return STALE
    rec.prediction_id, rec.state, rec.submitted_at = sub.id, SUBMITTED, now
    _write_record(ctx, rec)
    return ctx.polls.first(run_id, rec.spec.model)


def _prepare_inputs(ctx: Context, meta: dict[str, Any], rec: JobRecord) -> list[str] | float:
    """Upload local and s3:// inputs once per content hash (shared by the run); URLs pass as they are."""
    urls: list[str] = []
    for ref in rec.spec.images:
        if ref.kind == "url":
            urls.append(ref.value)
            continue
        try:
            data = _read_input(ctx, ref.kind, ref.value, ref.path)
        except (OSError, StorageError) as exc:
            n = ctx.runs.incr(rec.run_id, rec.id, "attempts")
            if n >= ctx.settings.max_attempts or isinstance(exc, FileNotFoundError):
                _end(ctx, meta, rec, PENDING, FAILED, error=f"input {ref.value} cannot be read: {exc}", reason="input")
                return NEXT
            events.retry(rec, "read_input", n, str(exc))
            return backoff(n)
        sha = hashlib.sha256(data).hexdigest()
        verdict, value = ctx.uploads.claim(rec.run_id, sha)
        if verdict == "url":
            urls.append(value)
            continue
        if verdict == "wait":
            return 0.3  # another job is uploading the same photo
        if verdict == "taken_over":
            log.warning("upload of %s claimed %ss ago, not done; uploading it here", ref.value, value[:6])
        try:
            later = ctx.limiter.take("upload")
            if later:
                ctx.uploads.release(rec.run_id, sha)
                return later
            try:
                info = inspect(data, decode=False)
            except NotAnImage as exc:
                ctx.uploads.release(rec.run_id, sha)
                _end(ctx, meta, rec, PENDING, FAILED, error=f"input {ref.value} is not an image: {exc}", reason="input")
                return NEXT
            url = ctx.client(meta["api_base"]).upload(f"{sha[:24]}.{info.extension}", data, info.content_type)
        except RateLimited as exc:
            ctx.uploads.release(rec.run_id, sha)
            ctx.limiter.cool_down("upload", exc.retry_after)
            events.rate_limited(rec, "upload", exc.retry_after)
            return exc.retry_after or 1.0
        except (TransientError, ServiceError) as exc:
            ctx.uploads.release(rec.run_id, sha)
            n = ctx.runs.incr(rec.run_id, rec.id, "attempts")
            if isinstance(exc, TransientError) and n < ctx.settings.max_attempts:
                events.retry(rec, "upload", n, exc.message)
                return backoff(n)
            _end(ctx, meta, rec, PENDING, FAILED, error=f"upload of {ref.value} failed: {exc}", reason="upload")
            return NEXT
        ctx.uploads.store(rec.run_id, sha, url)
        ctx.runs.bump(rec.run_id, "uploads")
        events.uploaded()
        urls.append(url)
    return urls


def _read_input(ctx: Context, kind: str, value: str, path: str | None) -> bytes:
    if kind == "local":
        assert path is not None
        with open(path, "rb") as fh:
            return fh.read(10 * 1024 * 1024 + 1)
    bucket, _, key = value[5:].partition("/")
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return bytes(ctx.s3().get_object(Bucket=bucket, Key=key)["Body"].read())
    except (BotoCoreError, ClientError) as exc:
        raise StorageError(f"{value}: {type(exc).__name__}") from None


# -- submitting: found after a crash between the claim and the answer --------------------------


def _submitting(ctx: Context, meta: dict[str, Any], rec: JobRecord) -> float | None:
    return _uncertain(
        ctx,
        meta,
        rec,
        SUBMITTING,
        reason="worker_lost_during_submit",
        error="the worker stopped during the submit; the prediction may exist (see /model/history)",
    )


# -- submitted: poll, adaptively ----------------------------------------------------------------


def _submitted(ctx: Context, meta: dict[str, Any], rec: JobRecord) -> float | None:
    run_id = rec.run_id
    ctx.slots.renew(f"{run_id}:{rec.id}")
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
        ctx.control.halt(run_id, "auth")
        ctx.runs.update(run_id, rec.id, error=exc.message)
        return None  # left submitted: `resume` polls it again
    except BadRequest as exc:  # 404 for an id the service gave us
        return _uncertain(ctx, meta, rec, SUBMITTED, error=exc.message, reason="prediction_lost")
    except ServiceError as exc:
        ctx.runs.bump(run_id, "retries")
        events.retry(rec, "poll", polls, exc.message)
        if elapsed > ctx.settings.poll_deadline:
            return _uncertain(
                ctx, meta, rec, SUBMITTED, error=f"no answer before the deadline: {exc.message}", reason="poll_deadline"
            )
        return backoff(polls, 1.0, 30.0)
    if pred.state is State.RUNNING:
        if elapsed > ctx.settings.poll_deadline:
            return _uncertain(
                ctx,
                meta,
                rec,
                SUBMITTED,
                reason="poll_deadline",
                error=f"still {pred.status or 'running'} after {int(elapsed)} s",
            )
        if polls == 1:  # each job teaches the run's poll times once, at its first poll
            ctx.polls.still_running(run_id, rec.spec.model, elapsed)
        return ctx.polls.again(run_id, rec.spec.model, elapsed)
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
    _move(ctx, rec, SUBMITTED, FETCHING, service_outputs=list(pred.outputs), price_micros=str(price))
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
    return _end(ctx, meta, rec, FETCHING, SUCCEEDED, cost=price, outputs=outputs)
