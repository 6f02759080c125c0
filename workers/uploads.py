"""A run's photo-to-URL cache: rows that share a photo upload it once.

The first job to need a photo claims it (`pending:<Redis time>`), uploads it and stores the
URL; the others wait. A claim older than `UPLOAD_WAIT` is taken over by one waiting job (its
host may have been cut off holding it; uploads are free), atomically and timed by Redis's
clock, so hosts with skewed clocks agree on what is stale.
"""

from __future__ import annotations

from typing import cast

import redis

from jobs.keys import RunKeys
from jobs.redisio import script, translated

UPLOAD_WAIT = 10.0
CLAIM_LEASE = 120  # seconds a claim lives if its holder vanishes without releasing it
URL_TTL = 6 * 3600

_CLAIM = """
local v = redis.call('GET', KEYS[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local mine = 'pending:' .. string.format('%.3f', now)
if not v then
  redis.call('SET', KEYS[1], mine, 'EX', ARGV[2])
  return {'claimed', ''}
end
if string.sub(v, 1, 7) ~= 'pending' then return {'url', v} end
local since = tonumber(string.sub(v, 9)) or 0
if now - since < tonumber(ARGV[1]) then return {'wait', ''} end
redis.call('SET', KEYS[1], mine, 'EX', ARGV[2])
return {'taken_over', tostring(now - since)}
"""


class UploadCache:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client, self.prefix = client, prefix
        self._claim = script(client, _CLAIM)

    def key(self, run_id: str, sha: str) -> str:
        return RunKeys(self.prefix, run_id).upload(sha)

    @translated
    def claim(self, run_id: str, sha: str) -> tuple[str, str]:
        """('url', URL) when uploaded already; ('claimed' | 'taken_over', _) when this caller
        uploads it now ('taken_over' carries the stale claim's age); ('wait', '') otherwise."""
        verdict, value = self._claim(keys=[self.key(run_id, sha)], args=[repr(UPLOAD_WAIT), CLAIM_LEASE])
        return str(verdict), str(value)

    @translated
    def store(self, run_id: str, sha: str, url: str) -> None:
        self.client.set(self.key(run_id, sha), url, ex=URL_TTL)

    @translated
    def release(self, run_id: str, sha: str) -> None:
        """The claim holder could not upload: let the next job try."""
        self.client.delete(self.key(run_id, sha))

    @translated
    def drop(self, run_id: str) -> int:
        """The whole cache of a run that is over (a later retry uploads again: free)."""
        n = 0
        batch: list[str] = []
        for key in self.client.scan_iter(self.key(run_id, "*"), count=1000):
            batch.append(cast(str, key))
            if len(batch) >= 500:
                n += int(self.client.unlink(*batch))
                batch = []
        if batch:
            n += int(self.client.unlink(*batch))
        return n
