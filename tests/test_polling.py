"""Adaptive polling: learned from the run's own prediction times, shared in Redis."""

from __future__ import annotations

import heapq
import math
import random
import statistics

import pytest
import redis

from workers.polling import (
    BASE_BUDGET,
    DEFAULT_FIRST,
    EAGER,
    MEAN_ONLY,
    PollTimes,
    beyond,
    budget,
    expected_polls,
    mean_lag,
    schedule,
)


def polls_needed(policy: PollTimes, duration: float, spend: float = BASE_BUDGET) -> tuple[int, float]:
    """Polls a prediction of `duration` seconds gets, and how late the last one is."""
    t, n = policy.first("r", "m", spend), 1
    while t < duration:
        t += policy.again("r", "m", t, spend)
        n += 1
    return n, t - duration


def test_first_poll_learns_the_runs_typical_time(rconn: redis.Redis, prefix: str) -> None:
    polls = PollTimes(rconn, prefix, refresh=0)
    assert polls.first("r", "m") == DEFAULT_FIRST  # nothing seen yet
    rng = random.Random(5)
    for _ in range(400):
        polls.learn("r", "m", rng.lognormvariate(math.log(8.0), 0.5))
    z1, _ = schedule(0.5, BASE_BUDGET)
    assert polls.first("r", "m") == pytest.approx(8.0 * math.exp(0.5 * z1), rel=0.15)
    assert polls.first("r", "m", EAGER) < 8.0 * 0.8  # eager: the first poll comes well before the median
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


@pytest.mark.parametrize("spend", [1.5, BASE_BUDGET, 3.0, EAGER])
def test_each_job_spends_its_budget_and_no_more_for_the_least_lag(
    rconn: redis.Redis, prefix: str, spend: float
) -> None:
    """The schedule spends the polls a job may have (on average) and lands the poll that sees
    the end as close to it as that many polls can: its mean lag is the closed form's, and more
    budget buys less lag."""
    polls = PollTimes(rconn, prefix, refresh=0)
    rng = random.Random(9)
    for _ in range(400):
        polls.learn("r", "m", rng.lognormvariate(math.log(8.0), 0.4))
    est = polls.estimate("r", "m")
    assert est is not None and 6.0 < math.exp(est[0]) < 11.0
    # the predictions to come, as the run now believes them to be (its estimate moves on)
    mu, sd = est[0], math.sqrt(est[1])
    times = [math.exp(rng.gauss(mu, sd)) for _ in range(4000)]
    results = [polls_needed(polls, t, spend) for t in times]
    per_job = statistics.fmean(n for n, _ in results)
    lag = statistics.fmean(late for _, late in results)
    z1, d = schedule(sd, spend)
    assert per_job == pytest.approx(spend, abs=0.1)
    assert lag == pytest.approx(math.exp(mu) * mean_lag(z1, d, sd), rel=0.1)
    fixed = statistics.fmean(math.ceil(t / 3.0) for t in times)  # polling every 3 s, as the service's clients do
    if spend <= BASE_BUDGET:
        assert per_job < fixed / 2
    if spend == EAGER:  # well under a tenth of the median: 8 polls where every 3 s takes 4
        assert lag < 0.08 * math.exp(mu)


def test_the_schedule_is_the_best_of_its_kind_for_the_budget() -> None:
    """No other spacing of the same family spends the same budget with less lag, and the closed
    forms agree with a simulation of the schedule."""
    for sd, spend in ((0.4, 1.8), (0.4, 5.0), (0.6, 2.0)):
        z1, d = schedule(sd, spend)
        assert expected_polls(z1, d) == pytest.approx(spend, abs=0.02)
        best = mean_lag(z1, d, sd)
        for other in (d * 0.7, d * 1.4):
            lo, hi = -4.0, 4.0
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if expected_polls(mid, other) > spend else (lo, mid)
            assert mean_lag(hi, other, sd) >= best - 1e-3
    rng = random.Random(4)
    z1, d = schedule(0.4, 2.0)
    grid = [math.exp(0.4 * (z1 + d * i)) for i in range(200)]
    draws = [math.exp(rng.gauss(0, 0.4)) for _ in range(100_000)]
    sim = statistics.fmean(next(g for g in grid if g >= t) - t for t in draws)
    assert sim == pytest.approx(mean_lag(z1, d, 0.4), rel=0.03)


def test_the_budget_follows_the_poll_rate_and_rises_while_slots_are_scarce() -> None:
    est = (math.log(8.0), 0.16)
    assert budget(submit_rate=2, poll_rate=20, scarce=False, slots=100, est=est) == BASE_BUDGET
    assert budget(submit_rate=10, poll_rate=20, scarce=False, slots=100, est=est) == pytest.approx(1.7)
    assert budget(submit_rate=30, poll_rate=20, scarce=False, slots=100, est=est) == 1.2  # the floor
    # a service that caps at 24: jobs end at ~24 / 8.7 s, and each may have 6 polls of the rate
    assert budget(submit_rate=10, poll_rate=20, scarce=True, slots=24, est=est) == pytest.approx(
        0.85 * 20 * math.exp(math.log(8.0) + 0.08) / 24
    )
    assert budget(submit_rate=10, poll_rate=20, scarce=True, slots=4, est=est) == EAGER  # no more than EAGER
    # a ceiling of 200 slots: the poll rate cannot pay for more than the base
    assert budget(submit_rate=10, poll_rate=20, scarce=True, slots=200, est=est) == pytest.approx(1.7)
    assert budget(submit_rate=10, poll_rate=20, scarce=True, slots=24, est=None) == pytest.approx(1.7)


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
    assert 0.35 < math.sqrt(est[1]) < 0.75, math.sqrt(est[1])  # the spread neither collapses nor blows up
    if median <= 2.0:  # the run is long enough to leave its start behind
        assert statistics.mean(counts) < BASE_BUDGET + 0.15, statistics.mean(counts)


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
