"""The watchdog that finishes what the broker dropped.

Redis-backed Celery can lose a message in a narrow window (a worker killed between
popping a message and recording it as unacknowledged). Every job records when its
next message is due; one worker at a time (a Redis lock) re-drives jobs overdue by
more than the broker's own redelivery time, with a fresh token so that a late
original message stops at once. Re-driving is safe: the state machine never
submits twice.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from jobs.config import WorkerSettings
from jobs.keys import reaper_lock
from manifests.errors import StateError
from workers.context import Context
from workers.dispatch import admit, queue_for, send_job

log = logging.getLogger("seedream.reaper")


def grace_seconds(settings: WorkerSettings) -> float:
    """Longer than the broker's own redelivery (visibility timeout plus its restore sweeps)."""
    return settings.visibility_timeout + 3 * settings.restore_interval + 15.0


def sweep(ctx: Context, *, grace: float | None = None, now: float | None = None) -> int:
    """Re-drive overdue jobs of every active run; return how many."""
    grace = grace_seconds(ctx.settings) if grace is None else grace
    now = time.time() if now is None else now
    lock = reaper_lock(ctx.settings.prefix)
    if not ctx.redis.set(lock, uuid.uuid4().hex, nx=True, ex=int(max(10, grace))):
        return 0
    redriven = 0
    try:
        for run_id in ctx.runs.active_runs():
            run = ctx.runs.run_meta(run_id)
            if run is None:
                ctx.runs.set_active(run_id, False)
                continue
            for job_id in ctx.runs.overdue(run_id, now - grace):
                rec = ctx.runs.get(run_id, job_id)
                if rec is None or rec.settled:
                    ctx.runs.clear_due(run_id, job_id)
                    continue
                token = uuid.uuid4().hex
                ctx.runs.force_token(run_id, job_id, token)
                ctx.runs.set_due(run_id, job_id, now)
                send_job(run_id, job_id, token, queue=queue_for(run, rec.state))
                ctx.runs.bump(run_id, "redriven")
                redriven += 1
                extra = {"run_id": run_id, "job_id": job_id, "event": "redriven", "status": rec.state}
                log.warning("job %s/%s was overdue (%s); re-driven", run_id, job_id, rec.state, extra=extra)
            ctx.backlog.prune_ready(run_id)  # a place held by a job past its submit frees
            admit(ctx, run_id)  # a worker that died after a job ended never let the next one in
    finally:
        ctx.redis.delete(lock)
    return redriven


def start_thread(ctx: Context, interval: float | None = None) -> threading.Thread:
    every = interval if interval is not None else max(2.0, min(30.0, grace_seconds(ctx.settings) / 4))

    def loop() -> None:
        while True:
            time.sleep(every)
            try:
                sweep(ctx)
            except StateError as exc:
                log.warning("reaper: %s", exc)
            except Exception:
                log.exception("reaper failed; trying again later")

    thread = threading.Thread(target=loop, name="seedream-reaper", daemon=True)
    thread.start()
    return thread
