"""Celery tasks: one message per job step, and the end-of-run report.

The task is a thin shell around the state machine (`workers.steps`). It re-enqueues
itself with a countdown instead of sleeping, and hands the job a fresh token with
each message so a duplicated message finds itself stale and stops.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterable

from jobs.errors import StateError, StorageError
from jobs.report import write_run_report
from workers.celery import app
from workers.context import get_context
from workers.steps import advance

log = logging.getLogger("seedream.tasks")
# A step (HTTP calls with timeouts, bounded retries) ends well within this; past it, the watchdog
# may take the job over.
STEP_LEASE = float(os.environ.get("SEEDREAM_STEP_LEASE", "180"))


@app.task(name="seedream.job", bind=True, acks_late=True, ignore_result=True, max_retries=None)
def run_job(self, run_id: str, job_id: str, token: str) -> None:  # type: ignore[no-untyped-def]
    ctx = get_context()
    try:
        ctx.runs.set_due(run_id, job_id, time.time() + STEP_LEASE)  # running now: not overdue
        countdown = advance(ctx, run_id, job_id, token)
    except StateError as exc:
        # Redis (state and broker) is away: try this message again shortly. If even the retry
        # cannot be published, Celery drops the message; the job is then overdue once its step
        # lease ends and the watchdog (workers/reaper.py) drives it again.
        log.warning("job %s/%s: %s; retrying", run_id, job_id, exc)
        raise self.retry(countdown=5) from None
    except Exception:
        log.exception("job %s/%s: unexpected error; retrying", run_id, job_id)
        n = ctx.runs.incr(run_id, job_id, "crashes")
        if n > 20:
            return
        countdown = min(60.0, 2.0**n)
    if countdown is None:
        ctx.runs.clear_due(run_id, job_id)
        return
    new = uuid.uuid4().hex
    if ctx.runs.announce_token(run_id, job_id, token, new):
        ctx.runs.set_due(run_id, job_id, time.time() + max(0.0, countdown))
        queue = ctx.meta(run_id).get("queue") or None
        run_job.apply_async((run_id, job_id, new), countdown=max(0.0, countdown), queue=queue)
        ctx.runs.commit_token(run_id, job_id, token, new)


@app.task(name="seedream.finalize", bind=True, acks_late=True, ignore_result=True, max_retries=None)
def finalize_run(self, run_id: str) -> None:  # type: ignore[no-untyped-def]
    ctx = get_context()
    try:
        summary = write_run_report(ctx.runs, ctx.storage(run_id), run_id)
    except (StateError, StorageError) as exc:
        log.warning("report of %s not written yet: %s", run_id, exc)
        raise self.retry(countdown=10) from None
    ctx.uploads.drop(run_id)
    ctx.runs.set_run(run_id, report_written=True)
    ctx.runs.set_active(run_id, False)
    log.info("run %s finished: %s", run_id, summary["counts"])


def enqueue(run_id: str, job_ids: Iterable[str], token: str, *, queue: str | None = None) -> int:
    """One message per job, on one producer connection, sent to Redis in pipelined batches
    (kombu's producer batch: one round trip per 500 messages instead of one each)."""
    n = 0
    with app.producer_or_acquire() as producer, producer.batch(500):
        for jid in job_ids:
            run_job.apply_async((run_id, jid, token), queue=queue, producer=producer)
            n += 1
    return n
