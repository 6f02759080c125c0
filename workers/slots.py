"""In-flight slots: predictions between submit and finish per API key, on any host, as many as
the service takes.

A slot is a lease in a Redis sorted set (score = expiry on Redis's clock). The poller renews it; a
worker killed mid-job stops renewing and the slot comes back by itself when the lease runs out.
Renewing re-adds a slot that already expired, because the prediction it stands for is still
running at the service.

How many slots there are is learned, not guessed. The service publishes no concurrency limit, and
the number a run needs is its submit rate times the prediction time (10/s x 20 s is 200): a fixed
number either starves the rate or, where the service does cap, is refused. So the capacity (kept
in Redis beside the set, shared by every worker) grows while the service accepts submits and shrinks
when it pushes back, additive increase and multiplicative decrease, as TCP finds a path's window:

- until the service pushes back, a job that finds every slot taken is given one more (fast
  growth: jobs ask for a slot only when their turn to submit is near, so the capacity follows
  what the submit rate can fill, about the rate times the prediction time, and no more);
- a push-back (a 429 on a submit) sets the capacity to BACK_OFF times the predictions the service
  has accepted and not yet been seen to finish (never up), once per CALM seconds: the submits
  already on their way when the service said no are one event. A job still waiting to submit
  when the capacity shrank gives its slot up when it next asks;
- a push-back within CAREFUL seconds of another, at no less than BACK_OFF times the level refused
  then, is the same cap found again (by a probe, or with fewer predictions ended and not yet
  polled), not a service with less room: the capacity goes to the level now refused, no cut. Only
  the first refusal, or one well below the last, costs an eighth;
- for CAREFUL seconds after a push-back, an accepted submit while the slots were (nearly: within
  an eighth) all taken adds 1/capacity of a slot (one slot per capacity's worth of submits;
  RECOVER of them up to the level refused, which the service took a moment before), and
  for HOLD seconds no higher than the level refused: a service that caps at K refused with K of
  ours running and a few ended that we had not yet polled, so holding there keeps it at K less
  those few, probed once a minute, not refused every few seconds. A stray 429 costs ten minutes
  of careful growth, not a run.

Growing only while the slots are all taken keeps the capacity near what is used: a run held back
by the rate alone never builds up a capacity it has not tried. A user's `--max-in-flight` is the
ceiling the capacity never passes.
"""

from __future__ import annotations

import threading
import time

import redis

from jobs.keys import slots as slots_key
from jobs.redisio import DEFAULT_PREFIX, script, translated

START = 16  # the capacity before the run has heard from the service
BACK_OFF = 0.875  # after a first push-back from a service that caps at K: 7/8 K, growing back to K
CALM = 2.0
RECOVER = 4  # slots per capacity's worth of accepted submits, back up to the level refused
HOLD = 60.0
CAREFUL = 600.0

# KEYS[1]: the slots (holder -> lease end); KEYS[2]: the capacity's state; KEYS[3]: the slots whose
# submit the service accepted (the predictions it counts as in flight, give or take those ended
# and not yet polled)
_NOW_AND_CAP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local ceiling = tonumber(ARGV[1])
local cap = tonumber(redis.call('HGET', KEYS[2], 'cap') or ARGV[2])
cap = math.max(1, math.min(cap, ceiling))
"""

_ACQUIRE = (
    _NOW_AND_CAP
    + """
local lease = tonumber(ARGV[4])
local used = redis.call('ZCARD', KEYS[1])
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  -- a job asking again before its submit: above a capacity that shrank since, it gives its slot up
  if used <= math.floor(cap) or redis.call('ZSCORE', KEYS[3], ARGV[3]) then
    redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
    return {1, '0'}
  end
  redis.call('ZREM', KEYS[1], ARGV[3])
  return {0, '0.5'}
end
if used < math.floor(cap) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
  return {1, '0'}
end
-- all taken: unless the service pushed back lately, one more (a job asks only when its turn to
-- submit is near)
if tonumber(redis.call('HGET', KEYS[2], 'careful_until') or '0') < now and cap < ceiling then
  redis.call('HSET', KEYS[2], 'cap', string.format('%.6f', math.floor(cap) + 1))
  redis.call('EXPIRE', KEYS[2], 604800)
  redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
  return {1, '0'}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tostring(tonumber(first[2]) - now)}
"""
)

# ARGV[3]: 'grow' (ARGV[8]'s submit was accepted) or 'shrink' (a push-back); ARGV[4..7]: BACK_OFF,
# CALM, HOLD, CAREFUL. A push-back sets the capacity from the predictions the service accepted, not
# from the slots taken: slots held by submits still waiting for their send time are no load on it,
# and a capacity that starts above the service's cap would otherwise come down a step per CALM.
_ADJUST = (
    _NOW_AND_CAP
    + f"""
local RECOVER = {RECOVER}
"""
    + """
local used = redis.call('ZCARD', KEYS[1])
local f = redis.call('HMGET', KEYS[2], 'refused_at', 'hold_until', 'careful_until', 'calm_until')
if ARGV[3] == 'grow' then
  local lease = redis.call('ZSCORE', KEYS[1], ARGV[8])
  if lease then redis.call('ZADD', KEYS[3], lease, ARGV[8]) end
  if tonumber(f[3] or '0') < now or used < cap - math.max(2, cap / 8) then return tostring(cap) end
  local limit = ceiling
  if tonumber(f[2] or '0') > now then limit = math.min(ceiling, tonumber(f[1])) end
  if cap >= limit then return tostring(cap) end
  local step = 1
  if cap < tonumber(f[1] or '0') then step = RECOVER end
  cap = math.min(cap + step / cap, limit)
  redis.call('HSET', KEYS[2], 'cap', string.format('%.6f', cap))
else
  if tonumber(f[4] or '0') > now then return tostring(cap) end
  local serving = math.max(redis.call('ZCARD', KEYS[3]), 1)
  if tonumber(f[3] or '0') > now and serving >= math.floor(tonumber(f[1] or '0') * tonumber(ARGV[4])) then
    -- refused again near the level refused before: the service's cap found once more (by a probe,
    -- or with fewer predictions ended and not yet polled), not a service with less room: held there
    cap = math.min(cap, serving)
  else
    cap = math.max(1, math.min(cap, math.floor(serving * tonumber(ARGV[4]))))
  end
  redis.call('HSET', KEYS[2], 'cap', string.format('%.6f', cap), 'refused_at', tostring(serving),
             'hold_until', tostring(now + tonumber(ARGV[6])), 'careful_until', tostring(now + tonumber(ARGV[7])),
             'calm_until', tostring(now + tonumber(ARGV[5])), 'pushed_back_at', tostring(now))
  redis.call('HINCRBY', KEYS[2], 'push_backs', 1)
end
redis.call('EXPIRE', KEYS[2], 604800)
return tostring(cap)
"""
)

_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[2], 'XX', now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
"""

_IN_USE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""

# {capacity, whether the service pushed back within CAREFUL, slots in use}: one round trip for
# the window and the poll schedule
_STATE = (
    _NOW_AND_CAP
    + """
local careful = tonumber(redis.call('HGET', KEYS[2], 'careful_until') or '0') > now
return {string.format('%.6f', cap), careful and 1 or 0, redis.call('ZCARD', KEYS[1])}
"""
)


class Slots:
    """`ceiling`: the most slots there may ever be (the user's cap, or the project's default)."""

    def __init__(
        self, client: redis.Redis, key_id: str, ceiling: int, lease: float, *, prefix: str = DEFAULT_PREFIX
    ) -> None:
        self.client = client
        self.key = slots_key(prefix, key_id)
        self.aimd_key = f"{self.key}:aimd"
        self.posted_key = f"{self.key}:posted"
        self.ceiling = ceiling
        self.lease = lease
        self._acquire = script(client, _ACQUIRE)
        self._adjust = script(client, _ADJUST)
        self._renew = script(client, _RENEW)
        self._in_use = script(client, _IN_USE)
        self._state = script(client, _STATE)
        self._seen = (-1e9, 0, False)  # (read at, capacity, scarce), cached per process
        self._lock = threading.Lock()

    def _args(self, *more: object) -> list[str]:
        return [str(self.ceiling), str(min(START, self.ceiling)), *map(str, more)]

    @translated
    def acquire(self, holder: str) -> float:
        """0.0 when `holder` has a slot (idempotent), else seconds until the oldest lease ends."""
        ok, wait = self._acquire(keys=self._keys, args=self._args(holder, repr(self.lease)))
        return 0.0 if int(ok) else max(0.0, float(wait))

    @property
    def _keys(self) -> list[str]:
        return [self.key, self.aimd_key, self.posted_key]

    @translated
    def accepted(self, holder: str) -> float:
        """The service took `holder`'s submit: one more slot if they were all taken. The new capacity."""
        return float(self._adjust(keys=self._keys, args=self._args("grow", BACK_OFF, CALM, HOLD, CAREFUL, holder)))

    @translated
    def pushed_back(self) -> float:
        """The service refused a submit for load: fewer slots. The new capacity."""
        return float(self._adjust(keys=self._keys, args=self._args("shrink", BACK_OFF, CALM, HOLD, CAREFUL, "")))

    def capacity(self, refresh: float = 0.5) -> int:
        """The slots there are now (cached for `refresh` seconds: the window and the poll schedule
        follow it, and need not cost a round trip per job)."""
        return self._read(refresh)[0]

    def scarce(self, refresh: float = 0.5) -> bool:
        """Whether the slots, not the rate, hold the run back: the service pushed back lately, or
        the capacity reached the ceiling and is all taken. A finished prediction's slot is then
        worth an early poll."""
        return self._read(refresh)[1]

    @translated
    def _read(self, refresh: float) -> tuple[int, bool]:
        now = time.monotonic()
        with self._lock:
            if now - self._seen[0] < refresh:
                return self._seen[1], self._seen[2]
        cap, careful, used = self._state(keys=self._keys, args=self._args())
        cap = int(float(cap))
        scarce = bool(int(careful)) or (cap >= self.ceiling and int(used) >= self.ceiling - 1)
        with self._lock:
            self._seen = (now, cap, scarce)
        return cap, scarce

    @translated
    def renew(self, holder: str) -> None:
        self._renew(keys=[self.key, self.posted_key], args=[holder, repr(self.lease)])

    @translated
    def release(self, holder: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(self.key, holder)
        pipe.zrem(self.posted_key, holder)
        pipe.execute()

    @translated
    def in_use(self) -> int:
        return int(self._in_use(keys=[self.key]))
