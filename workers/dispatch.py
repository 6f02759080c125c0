"""Task messages, sent by name: the state machine, the watchdog and the CLI hand jobs on here
without importing the tasks that run them (workers/tasks.py sits above all three)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from jobs.backlog import sizes
from jobs.records import FETCHING, RunRecord
from workers.celery_app import app
from workers.context import Context

JOB_TASK = "seedream.job"
FINALIZE_TASK = "seedream.finalize"
NOTIFY_TASK = "seedream.notify"


def queue_for(run: RunRecord, state: str) -> str | None:
    """Downloads and storage writes go to the run's fetch queue when it has one (hosts near the
    bucket); everything else to its queue."""
    if state == FETCHING and run.fetch_queue:
        return run.fetch_queue
    return run.queue or None


def send_job(
    run_id: str, job_id: str, token: str, *, queue: str | None, countdown: float | None = None, producer: Any = None
) -> None:
    app.send_task(JOB_TASK, (run_id, job_id, token), queue=queue, countdown=countdown, producer=producer)


def send_finalize(run_id: str, queue: str | None) -> None:
    app.send_task(FINALIZE_TASK, (run_id,), queue=queue)


def send_notify(run_id: str, summary: dict[str, Any], queue: str | None) -> None:
    app.send_task(NOTIFY_TASK, (run_id, summary), queue=queue)


def publish(run_id: str, jobs: Iterable[tuple[str, str, str]], run: RunRecord, *, countdown: float = 0.0) -> int:
    """One message per (job, token, state), on the queue for its state, over one producer
    connection, sent in pipelined batches (kombu's producer batch: one round trip per 500
    messages instead of one each)."""
    n = 0
    with app.producer_or_acquire() as producer, producer.batch(500):
        for jid, token, state in jobs:
            send_job(run_id, jid, token, queue=queue_for(run, state), countdown=countdown or None, producer=producer)
            n += 1
    return n


def admit(ctx: Context, run_id: str, *, done: str = "", keep_one: bool = False) -> tuple[str, str, str] | None:
    """Let waiting jobs of a run in, up to its window (after job `done` ended, and from the
    watchdog), and publish their messages; with `keep_one`, the first is returned instead, for
    the caller to drive itself."""
    run = ctx.meta(run_id)
    window, ready = sizes(run, ctx.settings.limits, ctx.slots.capacity())
    jobs = ctx.backlog.admit(run_id, window, done=done, ready=ready)
    first = jobs.pop(0) if keep_one and jobs else None
    publish(run_id, jobs, run)
    return first


def maybe_finalize(ctx: Context, run_id: str, finished: int) -> None:
    """Whoever finishes the last job has the report written, once. `finished`: the run's count
    of finished jobs, read when this job's record was stored."""
    run = ctx.meta(run_id)
    if finished < (run.total or 0):
        return
    if ctx.redis.set(ctx.runs.keys(run_id).finalized, "1", nx=True):
        send_finalize(run_id, run.queue or None)
