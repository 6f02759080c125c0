"""When to poll a prediction: as soon after its end as the run's poll budget allows.

Prediction times are roughly log-normal, so the run keeps an estimate of the mean and variance of
their logarithm (in Redis, shared by every worker). A job's polls go out at fixed quantiles of
that estimate, z1, z1 + d, z1 + 2d, ... (in standard deviations of the log time): the spacing
chosen, for the estimate's spread, to make the mean time from a prediction's end to the poll that
sees it (the poll lag) as small as it can be for the expected number of polls per job the run may
spend (its budget). Every poll counts against the service's poll quota, so the budget is bounded
by the poll rate shared among the run's submits; and when the in-flight slots, not the submit
rate, hold the run back, a slot held by a finished prediction is lost throughput, so the budget
rises (up to EAGER polls a job) as far as the poll rate allows.

How close the polls can land is a matter of arithmetic, not tuning: with no sign from the service
of when a prediction will end, a budget of 2 polls a job at a spread of sigma 0.4 (the service's
times) has a best median lag of about 0.18 x the median time (1.45 s at 8 s); 5 polls, 0.055 x.

Each job teaches the estimate once, at its first poll, whatever that poll finds. Learning from
predictions as they end would hear from the fast ones first: a run's early estimate would be
biased short. A first poll that finds the prediction still running says only that its time is
longer than the time elapsed (a censored observation); it counts as the mean log time beyond that
point under the current estimate, the expectation step of EM for censored normal data. A censored
time below the current mean says little about the spread and, taken as data, would shrink it
towards nothing while nothing has ended yet: such times move the mean only. The times learned are
the service's own `predict_time`: the time until this run's poll saw a prediction finished
includes the poll's own lag, and learning from it drifts ever later.
"""

from __future__ import annotations

import functools
import math
import threading
import time

import redis

from jobs.keys import RunKeys
from jobs.redisio import script, translated

AGAIN_FRACTION = 0.3  # before the run has learned anything: again after 30% of the time taken
DEFAULT_FIRST = 2.0
BASE_BUDGET = 1.8  # expected polls a job while the rate, not the slots, holds the run back
EAGER = 8.0  # the most a job may spend while slots are scarce
POLL_SHARE = 0.85  # of the poll rate: the rest absorbs jobs polled before the run learned anything
PRIOR_VAR = 0.25  # sigma 0.5 in log space until the run has seen some spread
MIN_VAR = 0.05**2  # identical times must not make the spread exactly zero
MIN_WAIT, MAX_WAIT = 0.2, 60.0
MEAN_ONLY = -1.0

# ARGV: x (a log time, or the expected one beyond a censoring point), w (the variance of the
# log time around x: 0 for a time seen, MEAN_ONLY to leave the spread alone), the prior
# variance, the floor. A running mean at first, then an exponential average (alpha 0.05).
_LEARN = """
local x, w = tonumber(ARGV[1]), tonumber(ARGV[2])
local v = redis.call('HMGET', KEYS[1], 'mu', 'var', 'n')
local mu, var, n
if not v[1] or not v[2] then
  mu, var, n = x, tonumber(ARGV[3]), 1
else
  mu, var, n = tonumber(v[1]), tonumber(v[2]), tonumber(v[3] or '1')
  local a = math.max(0.05, 1 / (n + 1))
  local d = x - mu
  mu = mu + a * d
  if w >= 0 then
    var = math.max(tonumber(ARGV[4]), (1 - a) * var + a * (d * d + w))
  end
  n = n + 1
end
redis.call('HSET', KEYS[1], 'mu', string.format('%.17g', mu), 'var', string.format('%.17g', var), 'n', n)
redis.call('EXPIRE', KEYS[1], 604800)
return 1
"""

Estimate = tuple[float, float]  # mean and variance of the log time


class PollTimes:
    """The estimate moves slowly (alpha 0.05), so each process reads it at most once every
    `refresh` seconds per run and model: one Redis round trip per submit fewer."""

    def __init__(self, client: redis.Redis, prefix: str, *, refresh: float = 2.0) -> None:
        self.client, self.prefix, self.refresh = client, prefix, refresh
        self._learn = script(client, _LEARN)
        self._seen: dict[tuple[str, str], tuple[float, Estimate]] = {}  # (run, model) -> (read at, estimate)
        self._lock = threading.Lock()

    def _key(self, run_id: str, model: str) -> str:
        return RunKeys(self.prefix, run_id).poll_times(model)

    def estimate(self, run_id: str, model: str) -> Estimate | None:
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get((run_id, model))
        if seen is not None and now - seen[0] < self.refresh:
            return seen[1]
        value = self._read(run_id, model)
        if value is None:  # not cached: the first time learned must reach every job at once
            return None
        with self._lock:
            if len(self._seen) > 1000:  # runs end; their entries need not stay
                self._seen.clear()
            self._seen[(run_id, model)] = (now, value)
        return value

    @translated
    def _read(self, run_id: str, model: str) -> Estimate | None:
        mu, var = self.client.hmget(self._key(run_id, model), "mu", "var")
        if mu is None or var is None:
            return None
        return float(mu), float(var)

    def first(self, run_id: str, model: str, budget: float = BASE_BUDGET) -> float:
        est = self.estimate(run_id, model)
        if est is None:
            return DEFAULT_FIRST
        z1, _ = schedule(math.sqrt(est[1]), budget)
        return clamp(math.exp(est[0] + z1 * math.sqrt(est[1])))

    def again(self, run_id: str, model: str, elapsed: float, budget: float = BASE_BUDGET) -> float:
        est = self.estimate(run_id, model)
        if est is None:
            return clamp(AGAIN_FRACTION * elapsed)
        return clamp(next_poll(est, budget, elapsed) - elapsed)

    def learn(self, run_id: str, model: str, seconds: float) -> None:
        """A first poll found the prediction ended after `seconds` of model time."""
        self._send(run_id, model, math.log(max(seconds, 0.05)), 0.0)

    def still_running(self, run_id: str, model: str, elapsed: float) -> None:
        """A first poll found the prediction still running after `elapsed` seconds."""
        self._send(run_id, model, *beyond(self.estimate(run_id, model), math.log(max(elapsed, 0.05))))

    @translated
    def _send(self, run_id: str, model: str, x: float, w: float) -> None:
        self._learn(keys=[self._key(run_id, model)], args=[repr(x), repr(w), repr(PRIOR_VAR), repr(MIN_VAR)])


def beyond(est: Estimate | None, c: float) -> tuple[float, float]:
    """The mean and variance of a normal log time known to exceed `c` (a truncated normal);
    the spread is left alone (MEAN_ONLY) when `c` is below the mean. With no estimate yet,
    the prior is centred on `c` itself."""
    mu, var = est if est is not None else (c, PRIOR_VAR)
    sd = math.sqrt(var)
    alpha = (c - mu) / sd
    lam = inverse_mills(alpha)
    x = mu + sd * lam
    if est is None or alpha < 0:
        return x, MEAN_ONLY
    return x, max(0.0, var * (1 + alpha * lam - lam * lam))


def inverse_mills(alpha: float) -> float:
    """pdf / survival of the standard normal at `alpha`; its asymptote where erfc underflows."""
    if alpha > 30:
        return alpha + 1 / alpha
    return math.exp(-alpha * alpha / 2) / math.sqrt(2 * math.pi) / (0.5 * math.erfc(alpha / math.sqrt(2)))


def clamp(seconds: float) -> float:
    return max(MIN_WAIT, min(MAX_WAIT, seconds))


def budget(*, submit_rate: float, poll_rate: float, scarce: bool, slots: int, est: Estimate | None) -> float:
    """Expected polls a job may spend. Jobs end at the submit rate while the rate binds, so each
    may have its share of the poll rate (at most BASE_BUDGET); while the slots bind, jobs end at
    about slots / mean time, and each may have that share (at most EAGER)."""
    share = POLL_SHARE * poll_rate / submit_rate
    base = max(1.2, min(BASE_BUDGET, share))
    if not scarce or est is None:
        return base
    mean_time = math.exp(est[0] + est[1] / 2)
    return max(base, min(EAGER, POLL_SHARE * poll_rate * mean_time / max(1, slots)))


def next_poll(est: Estimate, budget: float, elapsed: float) -> float:
    """The first poll time of the schedule after `elapsed` seconds (the schedule goes on past its
    end in the same steps, for the stragglers). A poll that came a little before its point (a
    countdown that fired early, an estimate that moved) counts as that point's poll: otherwise
    the next would follow it at once."""
    mu, sd = est[0], math.sqrt(est[1])
    z1, d = schedule(sd, budget)
    z = (math.log(max(elapsed, 1e-3)) - mu) / sd + d / 4
    i = 0 if z < z1 else math.floor((z - z1) / d) + 1
    return math.exp(mu + sd * (z1 + d * i))


@functools.lru_cache(maxsize=512)
def _schedule(sd: float, budget: float) -> tuple[float, float]:
    best: tuple[float, float, float] | None = None
    for k in range(1, 61):
        d = 0.025 * k
        lo, hi = -4.0, 4.0  # polls spent fall as z1 rises: the z1 that spends the budget exactly
        for _ in range(40):
            mid = (lo + hi) / 2
            if expected_polls(mid, d) > budget:
                lo = mid
            else:
                hi = mid
        lag = mean_lag(hi, d, sd)
        if best is None or lag < best[0]:
            best = (lag, hi, d)
    assert best is not None
    return best[1], best[2]


def schedule(sd: float, budget: float) -> tuple[float, float]:
    """(z1, d) for this spread and budget, rounded so that a few dozen schedules serve a run."""
    return _schedule(max(0.05, round(sd, 2)), max(1.05, round(budget, 1)))


def expected_polls(z1: float, d: float) -> float:
    """1 (the first poll) + the chance that each poll of the schedule finds the prediction running."""
    total, z = 1.0, z1
    while True:
        tail = _survival(z)
        total += tail
        if tail < 1e-6:
            return total
        z += d


def mean_lag(z1: float, d: float, sd: float) -> float:
    """E[poll that sees the end - the end], in units of the median time: for each gap between
    polls, the poll time times the chance the end falls in it, less the partial mean of the time."""
    lag, prev, z = 0.0, -math.inf, z1
    while True:
        p = _cdf(z) - _cdf(prev)
        partial = math.exp(sd * sd / 2) * (_cdf(z - sd) - _cdf(prev - sd))
        lag += math.exp(sd * z) * p - partial
        if _survival(z) < 1e-6:
            return lag
        prev, z = z, z + d


def _cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2)) if z != -math.inf else 0.0


def _survival(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))
