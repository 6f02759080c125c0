"""Adaptive polling: learned from the run's own prediction times, shared in Redis."""

from __future__ import annotations

import heapq
import math
import random
import statistics

import pytest
import redis

from workers.polling import DEFAULT_FIRST, MEAN_ONLY, PollTimes, beyond


def polls_needed(policy: PollTimes, first: float, duration: float) -> tuple[int, float]:
    """Polls a prediction of `duration` seconds gets, and how late the last one is."""
    t, n = first, 1
    while t < duration:
        t += policy.again("r", "m", t)
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


def run_through(polls: PollTimes, times: list[float], rate: float) -> list[int]:
    """Jobs submitted at `rate` per second with these prediction times, polled as the workers
    poll them (the first poll teaches the estimate); the polls each job took."""
    events = [(i / rate, i, 0) for i in range(len(times))]  # (when, job, polls so far)
    submitted = [0.0] * len(times)
    counts = [0] * len(times)
    while events:
        now, i, n = heapq.heappop(events)
        if n == 0:
            submitted[i] = now
            heapq.heappush(events, (now + polls.first("r", "m"), i, 1))
            continue
        counts[i] = n
        elapsed = now - submitted[i]
        if elapsed < times[i]:
            if n == 1:
                polls.still_running("r", "m", elapsed)
            heapq.heappush(events, (now + polls.again("r", "m", elapsed), i, n + 1))
        elif n == 1:
            polls.learn("r", "m", times[i])
    return counts


@pytest.mark.parametrize("median", [2.0, 8.0, 30.0])
def test_a_run_learns_its_times_from_the_start_without_favouring_the_fast(
    rconn: redis.Redis, prefix: str, median: float
) -> None:
    """Predictions that end early in a run are the fast ones, those that end last the slow:
    learning from them as they ended ran the estimate short at the start (early jobs polled
    again and again) and long at the end (in this test: 19% long for a 2 s median, 61% for 8 s,
    158% for 30 s). With each job teaching once, at its first poll, and a still-running poll
    taken as a censored time, the estimate ends near the truth even when the default first
    poll (2 s) is far below it."""
    polls = PollTimes(rconn, prefix, refresh=0)
    rng = random.Random(11)
    times = [rng.lognormvariate(math.log(median), 0.5) for _ in range(600)]
    counts = run_through(polls, times, rate=20.0)
    est = polls.estimate("r", "m")
    assert est is not None
    assert abs(math.exp(est[0]) / median - 1) < 0.15, math.exp(est[0])
    assert 0.35 < math.sqrt(est[1]) < 0.7, math.sqrt(est[1])  # the spread neither collapses nor blows up
    if median <= 2.0:  # the run is long enough to leave its start behind
        assert statistics.mean(counts) < 1.45, statistics.mean(counts)


def test_beyond_is_the_truncated_normal_mean_and_variance() -> None:
    rng = random.Random(3)
    draws = [x for x in (rng.gauss(1.0, 0.5) for _ in range(400_000)) if x > 1.42]
    x, w = beyond((1.0, 0.25), 1.42)  # 0.84 sigma above the mean
    assert abs(x - statistics.mean(draws)) < 0.005
    assert abs(w - statistics.pvariance(draws)) < 0.003
    assert beyond((1.0, 0.25), 0.9)[1] == MEAN_ONLY  # below the mean: the spread is left alone
    assert beyond((1.0, 0.25), -40.0) == (1.0, MEAN_ONLY)  # no information at all
    x, w = beyond((0.0, 1.0), 50.0)  # far in the tail: no overflow, just past the point
    assert 50.0 < x < 50.1 and 0 <= w < 0.01
    assert beyond(None, 1.0) == (pytest.approx(1.0 + 0.5 * math.sqrt(2 / math.pi)), MEAN_ONLY)
