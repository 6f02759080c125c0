"""A job's life as seen from outside: each event is one log line and the metrics it moves.

The state machine (`workers.steps`) says what happened; this module decides how it shows, so
a transition is logged and counted the same way wherever it happens.
"""

from __future__ import annotations

import logging
import time

from jobs.records import FINAL, JobRecord, JobState
from manifests.models import micros_to_usd
from workers.metrics import COST, FINISHED, JOB_SECONDS, POLLS, RATE_LIMITED, RETRIES, SUBMITS, UPLOADS

log = logging.getLogger("seedream.jobs")


def moved(
    rec: JobRecord, expect: JobState, to: JobState, *, cost_micros: int = 0, reason: str = "", error: str = ""
) -> None:
    """The job went from `expect` to `to` (the transition was made, once)."""
    extra: dict[str, object] = {"event": "transition", "from_state": expect, "to_state": to}
    if reason:
        extra["reason"] = reason
    if to in FINAL:
        extra["cost_usd"] = micros_to_usd(cost_micros)
        FINISHED.labels(to, rec.spec.model).inc()
        if cost_micros:
            COST.labels(rec.spec.model).inc(cost_micros / 1_000_000)
        if rec.submitted_at:
            JOB_SECONDS.observe(max(0.0, time.time() - rec.submitted_at))
    why = f" ({reason or error[:200]})" if reason or error else ""
    log.info("job %s/%s %s -> %s%s", rec.run_id, rec.id, expect, to, why, extra=extra)


def submitted(rec: JobRecord, outcome: str, prediction_id: str = "") -> None:
    """A submit left this machine: accepted (an id came back), unknown (no answer) or refused."""
    SUBMITS.labels(rec.spec.model, outcome).inc()
    if prediction_id:
        log.info("job %s/%s submitted: prediction %s", rec.run_id, rec.id, prediction_id,
                 extra={"event": "submitted", "prediction_id": prediction_id})  # fmt: skip


def polled() -> None:
    POLLS.inc()


def uploaded() -> None:
    UPLOADS.inc()


def rate_limited(rec: JobRecord, kind: str, retry_after: float | None) -> None:
    RATE_LIMITED.labels(kind).inc()
    log.info("job %s/%s: %s answered 429; every worker waits %ss", rec.run_id, rec.id, kind, retry_after,
             extra={"event": "rate_limited", "reason": kind, "countdown": retry_after})  # fmt: skip


def retry(rec: JobRecord, stage: str, attempt: int, why: str) -> None:
    """A transient failure at `stage`; the step is tried again later (attempt `attempt`)."""
    RETRIES.labels(stage).inc()
    log.warning("job %s/%s: %s failed (%s); try %d", rec.run_id, rec.id, stage, why[:300], attempt,
                extra={"event": "retry", "reason": stage, "attempt": attempt})  # fmt: skip
