"""Rate buckets shared by every worker on every host, with a shared cool-down after a 429.

Each kind of call (submit, poll, upload) has its own bucket per API key, kept in
Redis and timed by Redis's own clock (`TIME`), so hosts with skewed clocks agree.
It is a reserving GCRA: a caller is handed the next free send time, at most
`horizon` ahead, and sleeps until then; callers further back are given a place in
line and told to come back just before it (a Celery countdown), so the rate is used
fully without a thundering herd.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from jobs.config import Limits
from jobs.keys import rate as rate_key
from jobs.redisio import DEFAULT_PREFIX, script, translated

KINDS = ("submit", "poll", "upload")

# Redis time; nothing goes while a 429's cool-down (KEYS[2]) holds
_NOW_UNLESS_COOLING = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cool = tonumber(redis.call('GET', KEYS[2]) or '0')
if cool > now then return {0, tostring(cool - now)} end
"""

_ACQUIRE = (
    _NOW_UNLESS_COOLING
    + """
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local slot = math.max(now, tat - tolerance)
local wait = slot - now
if wait > horizon then
  -- a place in line: callers turned away come back one interval apart, in order, a little
  -- before their turn, instead of all retrying at once (which burns CPU and delays the
  -- callers whose turn it is)
  local line = tonumber(redis.call('GET', KEYS[3]) or '0')
  local ticket = math.max(line, slot) + interval
  redis.call('SET', KEYS[3], tostring(ticket), 'PX', math.ceil((ticket - now) * 1000) + 1000)
  return {0, tostring(math.max(ticket - now - horizon / 2, interval))}
end
local new_tat = math.max(tat, now) + interval
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now + tolerance) * 1000) + 1000)
return {1, tostring(wait)}
"""
)

_PACE = (
    _NOW_UNLESS_COOLING
    + """
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local new_tat = math.max(tat, now) + interval
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
return {1, tostring(math.max(now, tat - tolerance) - now)}
"""
)

_COOL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local seconds = tonumber(ARGV[1])
if seconds < 0 then
  local n = redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], 120)
  seconds = math.min(tonumber(ARGV[2]) * 2 ^ (n - 1), tonumber(ARGV[3]))
end
local till = now + seconds
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if till > cur then
  redis.call('SET', KEYS[1], tostring(till), 'PX', math.ceil(seconds * 1000) + 1000)
  return tostring(seconds)
end
return tostring(cur - now)
"""


@dataclass(frozen=True)
class Grant:
    """`go` after sleeping `wait` seconds; or not `go`: come back in `wait` seconds."""

    go: bool
    wait: float


class RateLimiter:
    """Buckets for one API key (identified by a fingerprint, never the key itself)."""

    def __init__(
        self,
        client: redis.Redis,
        key_id: str,
        limits: Limits,
        *,
        prefix: str = DEFAULT_PREFIX,
        backoff_initial: float = 2.0,
        backoff_max: float = 60.0,
    ) -> None:
        self.client = client
        self.limits = limits
        self.base = rate_key(prefix, key_id)
        self._acquire = script(client, _ACQUIRE)
        self._pace = script(client, _PACE)
        self._cool = script(client, _COOL)
        self.backoff = (backoff_initial, backoff_max)

    def _key(self, kind: str, name: str) -> str:
        return f"{self.base}:{kind}:{name}"

    def rate_of(self, kind: str) -> tuple[float, int]:
        lim = self.limits
        if kind == "submit":
            return lim.submit_rate, lim.submit_burst
        if kind == "poll":
            return lim.poll_rate, max(1, int(lim.poll_rate))
        if kind == "upload":
            return lim.upload_rate, max(1, int(lim.upload_rate))
        raise ValueError(f"unknown kind of call {kind!r}")

    @translated
    def acquire(self, kind: str) -> Grant:
        rate, burst = self.rate_of(kind)
        interval = 1.0 / self.limits.planned_rate(rate)
        horizon = max(0.05, min(1.0, 4 * interval))
        go, wait = self._acquire(
            keys=[self._key(kind, "tat"), self._key(kind, "cool"), self._key(kind, "line")],
            args=[repr(interval), repr((burst - 1) * interval), repr(horizon)],
        )
        return Grant(go=bool(int(go)), wait=max(0.0, float(wait)))

    def take(self, kind: str, sleep: Callable[[float], None] = time.sleep) -> float:
        """0.0 once it is this caller's turn (after a short in-place wait for its slot), or the
        seconds to come back later (a Celery countdown: no worker thread waits that long)."""
        later, send_at = self.book(kind)
        if later:
            return later
        sleep(max(0.0, send_at - time.monotonic()))
        return 0.0

    def book(self, kind: str) -> tuple[float, float]:
        """(seconds to come back later, 0.0), or (0.0, the `time.monotonic()` to send at).

        Booking before the work that precedes a call and sleeping only the rest of the wait
        keeps the send times as evenly spaced as the grants: work done after the wait would
        add its own jitter, and the service's small burst turns jitter into 429s."""
        grant = self.acquire(kind)  # the script checks the shared cool-down first
        if not grant.go:
            return max(grant.wait, 0.001), 0.0
        return 0.0, time.monotonic() + grant.wait

    @translated
    def pace(self, kind: str) -> Grant:
        """The last check before a call leaves, at the moment it leaves: sends spaced at least
        1/rate apart as they actually go out (bursts as `book` allows them), and none while a
        429's cool-down holds.

        `book` spaces the planned send times; a thread that reaches its time late (a busy core,
        a slow storage write) would otherwise go out right beside the next one, on time, and
        two such pairs within the service's small burst are a 429, which pauses every worker."""
        rate, burst = self.rate_of(kind)
        interval = 1.0 / rate
        go, wait = self._pace(
            keys=[self._key(kind, "sent"), self._key(kind, "cool")], args=[repr(interval), repr((burst - 1) * interval)]
        )
        return Grant(go=bool(int(go)), wait=max(0.0, float(wait)))

    @translated
    def cool_down(self, kind: str, retry_after: float | None) -> float:
        """Pause every worker's calls of this kind: Retry-After when sent, else growing backoff."""
        seconds = -1.0 if retry_after is None else max(0.0, min(600.0, retry_after))
        out = self._cool(
            keys=[self._key(kind, "cool"), self._key(kind, "strikes")],
            args=[repr(seconds), repr(self.backoff[0]), repr(self.backoff[1])],
        )
        return float(out)
