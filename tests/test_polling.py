"""Adaptive polling: learned from the run's own prediction times, shared in Redis."""

from __future__ import annotations

import math
import random

import redis

from workers.polling import DEFAULT_FIRST, PollTimes


def polls_needed(policy: PollTimes, first: float, duration: float) -> tuple[int, float]:
    """Polls a prediction of `duration` seconds gets, and how late the last one is."""
    t, n = first, 1
    while t < duration:
        t += policy.again(t)
        n += 1
    return n, t - duration


def test_first_poll_learns_the_runs_typical_time(rconn: redis.Redis, prefix: str) -> None:
    polls = PollTimes(rconn, prefix, refresh=0)
    assert polls.first("r", "m") == DEFAULT_FIRST  # nothing seen yet
    rng = random.Random(5)
    for _ in range(400):
        polls.learn("r", "m", rng.lognormvariate(math.log(8.0), 0.5))
    first = polls.first("r", "m")
    assert 8.0 * 1.3 < first < 8.0 * 1.8  # about the 80th percentile: 8 s x exp(0.84 x 0.5) = 12.2 s
    assert polls.first("r", "other-model") == DEFAULT_FIRST  # per model
    assert polls.first("other-run", "m") == DEFAULT_FIRST  # per run


def test_the_first_time_learned_is_used_at_once_though_reads_are_cached(rconn: redis.Redis, prefix: str) -> None:
    """Jobs submitted before the first prediction ends poll from a default; once one ends, the
    next job must not keep that default for a whole cache period (early jobs then poll twice)."""
    polls = PollTimes(rconn, prefix, refresh=3600)
    assert polls.first("r", "m") == DEFAULT_FIRST
    polls.learn("r", "m", 6.0)
    learned = polls.first("r", "m")
    assert learned > 6.0
    polls.learn("r", "m", 60.0)
    assert polls.first("r", "m") == learned  # a learned time is cached for `refresh`


def test_polls_per_job_stay_near_one_for_a_service_like_spread(rconn: redis.Redis, prefix: str) -> None:
    polls = PollTimes(rconn, prefix, refresh=0)
    rng = random.Random(9)
    times = [rng.lognormvariate(math.log(8.0), 0.5) for _ in range(2000)]
    for t in times[:200]:
        polls.learn("r", "m", t)
    first = polls.first("r", "m")
    results = [polls_needed(polls, first, t) for t in times[200:]]
    per_job = sum(n for n, _ in results) / len(results)
    lag = sum(late for _, late in results) / len(results)
    assert per_job <= 1.5, per_job
    assert lag < 0.65 * 8.0, lag  # the price: a finished prediction waits for its poll
    fixed = sum(math.ceil(t / 3.0) for t in times[200:]) / len(results)  # polling every 3 s
    assert fixed > 2 * per_job
