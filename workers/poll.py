"""The poll step: a submitted job is asked after on the schedule its run's poll budget allows
(workers/polling.py), until the prediction ends or its deadline passes.

A job whose prediction has no verdict by its deadline (or whose id the service lost) is not
left without a cost: it ends `overdue`, counted at its reservation, for `resume` and
`reconcile` to poll again.
"""

from __future__ import annotations

import time

from jobs.control import refused_by
from jobs.records import FAILED, FETCHING, SUBMITTED
from jobs.retry import backoff
from manifests.errors import AuthError, BadRequest, RateLimited, ServiceError
from workers import events
from workers.ending import end, move, overdue
from workers.polling import budget as poll_budget
from workers.prediction import State
from workers.reuse import renew_claim
from workers.turn import Done, Next, StepResult, Turn, Wait


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


def poll(t: Turn) -> StepResult:
    run_id = t.job.run_id
    t.ctx.slots.renew(t.holder)
    renew_claim(t)
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
        return overdue(t, error=f"the service lost the prediction: {exc.message}", reason="prediction_lost")
    except ServiceError as exc:
        t.ctx.runs.bump(run_id, "retries")
        events.retry(t.job, "poll", polls, exc.message)
        if elapsed > t.ctx.settings.poll_deadline:
            return overdue(t, error=f"no answer before the deadline: {exc.message}", reason="poll_deadline")
        return Wait(backoff(polls, 1.0, 30.0))
    if pred.state is State.RUNNING:
        if elapsed > t.ctx.settings.poll_deadline:
            return overdue(t, reason="poll_deadline", error=f"still {pred.status or 'running'} after {int(elapsed)} s")
        if polls == 1:  # each job teaches the run's poll times once, at its first poll
            t.ctx.polls.still_running(run_id, t.job.spec.model, elapsed)
        return Wait(next_poll(t, elapsed))
    if polls == 1:
        t.ctx.polls.learn(run_id, t.job.spec.model, elapsed if pred.predict_time is None else pred.predict_time)
    if pred.state is State.FAILED:
        error = pred.error or f"the prediction ended '{pred.status}'"
        return end(t, SUBMITTED, FAILED, error=error, reason=pred.status or "failed")
    price = pred.price_micros if pred.price_micros is not None else t.run.list_price(t.job.spec.model)
    if not pred.outputs:
        return end(t, SUBMITTED, FAILED, error="completed without outputs", reason="no_outputs", cost=price)
    t.ctx.slots.release(t.holder)
    move(t, SUBMITTED, FETCHING, service_outputs=list(pred.outputs), nsfw=list(pred.nsfw), price_micros=str(price))
    # With a fetch queue of its own (hosts near the bucket) the download goes there, now.
    return Wait(0.0) if t.run.fetch_queue and t.run.fetch_queue != t.run.queue else Next()
