"""When to poll a prediction: one poll per job is the floor, so polls wait for the time most
predictions of this run and model take, then back off in proportion to the time spent.

Prediction times are roughly log-normal, so the run keeps an estimate of the mean and variance
of their logarithm (in Redis, shared by every worker). The first poll goes out at about the
80th percentile of the estimate; a prediction still running is polled again after 30% of the
time it has already taken, or at the estimate's 80th percentile if that has since moved later.
For log-normal times with sigma 0.5 that is about 1.3 polls per job (polling every 3 s takes
ceil(t/3): 3.1 for a median of 8 s); the price is that a finished prediction waits for its
poll, on average a little over half the median time.

Each job teaches the estimate once, at its first poll, whatever that poll finds. Learning from
predictions as they end would hear from the fast ones first: a run's early estimate would be
biased short, and its early jobs would poll again and again. A first poll that finds the
prediction still running says only that its time is longer than the time elapsed (a censored
observation); it counts as the mean log time beyond that point under the current estimate,
the expectation step of EM for censored normal data. A censored time below the current mean
says little about the spread and, taken as data, would shrink it towards nothing while nothing
has ended yet: such times move the mean only.
The times learned are the service's own `predict_time`: the time until this run's poll saw a
prediction finished includes the poll's own lag, and learning from it drifts ever later. A poll
costs the service's poll quota; a wait only holds an in-flight slot a little longer.
"""

from __future__ import annotations

import math
import threading
import time

import redis

from jobs.redisio import script, translated

FIRST_QUANTILE_Z = 0.84  # the 80th percentile of a normal distribution
AGAIN_FRACTION = 0.3
DEFAULT_FIRST = 2.0  # before the run has learned anything
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
        return f"{self.prefix}:run:{run_id}:ptimes:{model}"

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

    def first(self, run_id: str, model: str) -> float:
        est = self.estimate(run_id, model)
        if est is None:
            return DEFAULT_FIRST
        return clamp(math.exp(est[0] + FIRST_QUANTILE_Z * math.sqrt(est[1])))

    def again(self, run_id: str, model: str, elapsed: float) -> float:
        return clamp(max(AGAIN_FRACTION * elapsed, self.first(run_id, model) - elapsed))

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
