"""Celery tasks: one message per job step, and the end-of-run report.

The task is a thin shell around the state machine (`workers.steps`). It re-enqueues
itself with a countdown instead of sleeping, and hands the job a fresh token with
each message so a duplicated message finds itself stale and stops. A message whose job
ended starts the next job let into the run's window itself (see INLINE_JOBS).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from jobs.logs import job_context
from jobs.records import PENDING
from jobs.report import write_run_report
from jobs.retry import backoff
from jobs.thumbs import input_reader
from manifests.errors import NotifyError, StateError, StorageError
from workers import notify
from workers.celery_app import app
from workers.context import Context, get_context
from workers.dispatch import FINALIZE_TASK, JOB_TASK, NOTIFY_TASK, admit, publish, queue_for, send_job, send_notify
from workers.steps import drive
from workers.turn import Done, Next, Stale, StepResult, Wait

log = logging.getLogger("seedream.tasks")


# When a job ends or is submitted, the message that did it goes on to start the next job let in,
# instead of publishing a message for it: one Celery message fewer per job (each costs about
# 2 ms of worker CPU). Past this many in a row, the next one gets a message of its own, due at
# once: it waits its turn behind the messages already queued, and this thread is free for them.
INLINE_JOBS = 50


@app.task(name=JOB_TASK, bind=True, acks_late=True, ignore_result=True, max_retries=None)
def run_job(self, run_id: str, job_id: str, token: str) -> None:  # type: ignore[no-untyped-def]
    ctx = get_context()
    try:
        nxt = _step(ctx, run_id, job_id, token)
    except StateError as exc:
        # Redis (state and broker) is away: try this message again shortly. If even the retry
        # cannot be published, Celery drops the message; the job is then overdue once its step
        # lease ends and the watchdog (workers/reaper.py) drives it again.
        log.warning("job %s/%s: %s; retrying", run_id, job_id, exc, extra={"run_id": run_id, "job_id": job_id})
        raise self.retry(countdown=5) from None
    later = 0.0
    for _ in range(INLINE_JOBS):
        if nxt is None:
            return
        job_id, token, _state = nxt
        try:
            nxt = _step(ctx, run_id, job_id, token)
        except StateError as exc:
            log.warning("job %s/%s: %s; giving it a message of its own", run_id, job_id, exc,
                        extra={"run_id": run_id, "job_id": job_id})  # fmt: skip
            nxt, later = (job_id, token, PENDING), 5.0  # Redis is struggling: not at once
            break
    if nxt is not None:
        try:
            publish(run_id, [nxt], ctx.meta(run_id), countdown=later)
        except Exception as exc:  # Redis away: the job is due, and the watchdog drives it when overdue
            log.warning("job %s/%s not handed on (%s); the watchdog will", run_id, nxt[0], exc)


def _step(ctx: Context, run_id: str, job_id: str, token: str) -> tuple[str, str, str] | None:
    """Drive one job as far as it goes now and hand it its next message; when it ended or was
    just submitted, the (job, token, state) of a job let in after it, for the caller to start."""
    with job_context(run_id, job_id):
        submitted = False
        result: StepResult
        try:
            outcome = drive(ctx, run_id, job_id, token, due_at=time.time() + ctx.settings.step_lease)
            result, submitted = outcome.result, outcome.submitted
        except StateError:
            raise  # the caller knows which message to retry
        except Exception:
            log.exception("job %s/%s: unexpected error; retrying", run_id, job_id)
            n = ctx.runs.incr(run_id, job_id, "crashes")
            if n > 20:
                return None
            result = Wait(backoff(n, 2.0, 60.0))
        match result:
            case Stale():
                return None  # another message drives this job
            case Done():
                return admit(ctx, run_id, done=job_id, keep_one=True)  # out of the window: let the next in
            case Wait(seconds):
                _hand_on(ctx, run_id, job_id, token, seconds)
            case Next():
                _hand_on(ctx, run_id, job_id, token, 0.0)
    if submitted:  # its place in the ready part is free: the next job goes on in this thread
        return admit(ctx, run_id, keep_one=True)
    return None


def _hand_on(ctx: Context, run_id: str, job_id: str, token: str, countdown: float) -> None:
    """Publish the job's next message, due in `countdown` seconds, under a new token."""
    new = uuid.uuid4().hex
    wait = max(0.0, countdown)
    if wait > ctx.settings.longest_countdown:  # the broker cannot hold it: the job sleeps in Redis
        ctx.runs.update(run_id, job_id, wake_at=repr(time.time() + wait))
        wait = ctx.settings.longest_countdown
    state = ctx.runs.announce_token(run_id, job_id, token, new, time.time() + wait)
    if state is not None:
        queue = queue_for(ctx.meta(run_id), state)
        send_job(run_id, job_id, new, countdown=wait, queue=queue)
        ctx.runs.commit_token(run_id, job_id, token, new)
        log.debug("job %s/%s: next step in %.2fs on %s", run_id, job_id, wait, queue,
                  extra={"event": "scheduled", "countdown": round(wait, 3), "status": state})  # fmt: skip


@app.task(name=FINALIZE_TASK, bind=True, acks_late=True, ignore_result=True, max_retries=None)
def finalize_run(self, run_id: str) -> None:  # type: ignore[no-untyped-def]
    ctx = get_context()
    try:
        summary = write_run_report(ctx.runs, ctx.storage(run_id), run_id, read_input=input_reader(ctx.s3))
    except (StateError, StorageError) as exc:
        log.warning("report of %s not written yet: %s", run_id, exc)
        raise self.retry(countdown=10) from None
    ctx.uploads.drop(run_id)
    ctx.runs.set_run(run_id, report_written=True)
    ctx.runs.set_active(run_id, False)
    log.info("run %s finished (%s): %s, $%s", run_id, summary["outcome"], summary["counts"], summary["total_cost_usd"],
             extra={"run_id": run_id, "event": "run_finished", "status": summary["outcome"],
                    "cost_usd": summary["total_cost_usd"]})  # fmt: skip
    if _notify_url(ctx, run_id):
        send_notify(run_id, summary, ctx.meta(run_id).queue or None)


def _notify_url(ctx: Context, run_id: str) -> str:
    """The run's own webhook (run --notify), else this worker's SEEDREAM_NOTIFY_URL."""
    return ctx.meta(run_id).notify_url or ctx.settings.notify_url or ""


@app.task(name=NOTIFY_TASK, bind=True, acks_late=True, ignore_result=True, max_retries=None)
def notify_run(self, run_id: str, summary: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    """POST the summary to the run's webhook, a few times with growing pauses; whatever the
    webhook does, the run's result stands (the outcome is kept in the run's `notified`)."""
    ctx = get_context()
    attempts = ctx.settings.notify_attempts
    tried = self.request.retries + 1
    extra = {"run_id": run_id, "event": "notify", "attempt": tried}
    try:
        status = notify.post(_notify_url(ctx, run_id), summary)
    except NotifyError as exc:
        if tried < attempts:
            log.warning("run %s: webhook not told (%s); try %d of %d", run_id, exc, tried, attempts, extra=extra)
            raise self.retry(countdown=backoff(tried, 1.0, 60.0)) from None
        log.error("run %s: webhook not told after %d tries (%s); the run is unaffected", run_id, tried, exc,
                  extra=extra)  # fmt: skip
        ctx.runs.set_run(run_id, notified=f"failed after {tried} tries: {exc}")
        return
    log.info("run %s: webhook told (HTTP %d)", run_id, status, extra=extra)
    ctx.runs.set_run(run_id, notified=f"ok after {tried} tries")
