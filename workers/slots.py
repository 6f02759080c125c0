"""In-flight slots: at most N predictions between submit and finish per API key, on any host.

A slot is a lease in a Redis sorted set (score = expiry on Redis's clock). The
poller renews it; a worker killed mid-job stops renewing and the slot comes back
by itself when the lease runs out. Renewing re-adds a slot that already expired,
because the prediction it stands for is still running at the service.
"""

from __future__ import annotations

import redis

from jobs.redisio import DEFAULT_PREFIX, script, translated

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local lease = tonumber(ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
  return {1, '0'}
end
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
  return {1, '0'}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tostring(tonumber(first[2]) - now)}
"""

_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
"""

_IN_USE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""


class Slots:
    def __init__(
        self, client: redis.Redis, key_id: str, capacity: int, lease: float, *, prefix: str = DEFAULT_PREFIX
    ) -> None:
        self.client = client
        self.key = f"{prefix}:slots:{key_id}"
        self.capacity = capacity
        self.lease = lease
        self._acquire = script(client, _ACQUIRE)
        self._renew = script(client, _RENEW)
        self._in_use = script(client, _IN_USE)

    @translated
    def acquire(self, holder: str) -> float:
        """0.0 when `holder` has a slot (idempotent), else seconds until the oldest lease ends."""
        ok, wait = self._acquire(keys=[self.key], args=[holder, self.capacity, repr(self.lease)])
        return 0.0 if int(ok) else max(0.0, float(wait))

    @translated
    def renew(self, holder: str) -> None:
        self._renew(keys=[self.key], args=[holder, repr(self.lease)])

    @translated
    def release(self, holder: str) -> None:
        self.client.zrem(self.key, holder)

    @translated
    def in_use(self) -> int:
        return int(self._in_use(keys=[self.key]))
