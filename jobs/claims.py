"""One prediction per edit at a time: a claim in Redis on a fingerprint, per output root.

The job that takes the claim submits; another row with the same fingerprint (in the same
manifest, or in a run going at the same time into the same output) waits while the claim is
held, then reuses what the holder stored. The claim has a lease that the holder renews
with each step, so a holder lost for good (every worker gone) stops blocking after
`LEASE` seconds, and a holder whose job has ended (its worker died before letting go) is
taken over at once. When the holder succeeds the claim becomes `done` for `DONE_TTL`: a row
that comes to it later reads the results index for the outputs instead of paying again.
When the holder ends any other way the claim is dropped and the next row submits.
"""

from __future__ import annotations

import hashlib

import redis

from jobs.keys import edit_claim
from jobs.redisio import DEFAULT_PREFIX, script, translated

LEASE = 900.0  # seconds; renewed at every step of the holder (each poll, each hop)
DONE_TTL = 2 * 86400.0  # a run that reaches a row later than this reads the index it listed at start

FRESH, MINE, HELD, DONE = "fresh", "mine", "held", "done"

# ARGV: holder, lease ms, take over a `done` claim ('1': its entry turned out unusable)
_TAKE = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 'fresh'
end
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 'mine'
end
if v == 'done' then
  if ARGV[3] == '1' then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 'fresh'
  end
  return 'done'
end
return 'held'
"""

# ARGV: holder, '1' when its edit succeeded and is in the index, done ms
_END = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '1' then
  redis.call('SET', KEYS[1], 'done', 'PX', ARGV[3])
else
  redis.call('DEL', KEYS[1])
end
return 1
"""


# ARGV: the holder found, the taker, lease ms
_TAKE_FROM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""


def root_id(output: str) -> str:
    """The output root a claim is about: runs into different outputs never wait on each other."""
    return hashlib.sha256(output.rstrip("/").encode()).hexdigest()[:16]


class Claims:
    def __init__(self, client: redis.Redis, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self._take = script(client, _TAKE)
        self._end = script(client, _END)
        self._take_from = script(client, _TAKE_FROM)

    def key(self, root: str, fp: str) -> str:
        return edit_claim(self.prefix, root, fp)

    @translated
    def take(self, root: str, fp: str, holder: str, *, over_done: bool = False) -> str:
        """FRESH (taken now), MINE (held already: renewed), HELD (another job's) or DONE."""
        args = [holder, int(LEASE * 1000), "1" if over_done else "0"]
        return str(self._take(keys=[self.key(root, fp)], args=args))

    @translated
    def end(self, root: str, fp: str, holder: str, *, succeeded: bool) -> bool:
        """Let the claim go (only the holder can): `done` after a success, gone otherwise."""
        args = [holder, "1" if succeeded else "0", int(DONE_TTL * 1000)]
        return bool(int(self._end(keys=[self.key(root, fp)], args=args)))

    @translated
    def take_from(self, root: str, fp: str, holder: str, taker: str) -> bool:
        """Take the claim from a holder whose job has ended without letting it go,
        only if that holder still has it."""
        return bool(int(self._take_from(keys=[self.key(root, fp)], args=[holder, taker, int(LEASE * 1000)])))

    @translated
    def holder(self, root: str, fp: str) -> str | None:
        value = self.client.get(self.key(root, fp))
        return None if value is None else str(value)
