"""When to poll a prediction: one poll per job is the floor, so polls wait for the time most
predictions of this run and model have taken, then back off in proportion to the time spent.

Prediction times are roughly log-normal, so the run keeps an estimate of the mean and variance
of their logarithm (in Redis, shared by every worker). The first poll goes out at about the
80th percentile of the times seen; a prediction still running is polled again after 30% of
the time it has already taken. For log-normal times with sigma 0.5 that is about 1.3 polls
per job (polling every 3 s takes ceil(t/3): 3.1 for a median of 8 s); the price is that a
finished prediction waits for its poll, on average a little over half the median time.
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
DEFAULT_FIRST = 2.0  # before any prediction of the run has finished
PRIOR_VAR = 0.25  # sigma 0.5 in log space until the run has seen some spread
MIN_WAIT, MAX_WAIT = 0.2, 60.0

_LEARN = """
local x = tonumber(ARGV[1])
local v = redis.call('HMGET', KEYS[1], 'mu', 'var', 'n')
local mu, var, n
if not v[1] or not v[2] then
  mu, var, n = x, tonumber(ARGV[2]), 1
else
  mu, var, n = tonumber(v[1]), tonumber(v[2]), tonumber(v[3] or '1')
  local a = math.max(0.05, 1 / (n + 1))
  local d = x - mu
  mu = mu + a * d
  var = (1 - a) * (var + a * d * d)
  n = n + 1
end
redis.call('HSET', KEYS[1], 'mu', string.format('%.17g', mu), 'var', string.format('%.17g', var), 'n', n)
redis.call('EXPIRE', KEYS[1], 604800)
return 1
"""


class PollTimes:
    """The estimate moves slowly (alpha 0.05), so each process reads it at most once every
    `refresh` seconds per run and model: one Redis round trip per submit fewer."""

    def __init__(self, client: redis.Redis, prefix: str, *, refresh: float = 2.0) -> None:
        self.client, self.prefix, self.refresh = client, prefix, refresh
        self._learn = script(client, _LEARN)
        self._seen: dict[tuple[str, str], tuple[float, float]] = {}  # (run, model) -> (read at, first)
        self._lock = threading.Lock()

    def _key(self, run_id: str, model: str) -> str:
        return f"{self.prefix}:run:{run_id}:ptimes:{model}"

    def first(self, run_id: str, model: str) -> float:
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get((run_id, model))
        if seen is not None and now - seen[0] < self.refresh:
            return seen[1]
        value = self._read_first(run_id, model)
        if value is None:  # not cached: the first time learned must reach every job at once
            return DEFAULT_FIRST
        with self._lock:
            if len(self._seen) > 1000:  # runs end; their entries need not stay
                self._seen.clear()
            self._seen[(run_id, model)] = (now, value)
        return value

    @translated
    def _read_first(self, run_id: str, model: str) -> float | None:
        mu, var = self.client.hmget(self._key(run_id, model), "mu", "var")
        if mu is None or var is None:
            return None
        return clamp(math.exp(float(mu) + FIRST_QUANTILE_Z * math.sqrt(float(var))))

    def again(self, elapsed: float) -> float:
        return clamp(AGAIN_FRACTION * elapsed)

    @translated
    def learn(self, run_id: str, model: str, seconds: float) -> None:
        """Running mean at first, then an exponential average (alpha 0.05), in one atomic step."""
        self._learn(keys=[self._key(run_id, model)], args=[repr(math.log(max(seconds, 0.05))), repr(PRIOR_VAR)])


def clamp(seconds: float) -> float:
    return max(MIN_WAIT, min(MAX_WAIT, seconds))
