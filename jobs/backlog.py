"""A run's admission window: its jobs wait in a Redis list and enter the task queue a few at a time.

With every job of a big run as a task message at once, the jobs waiting for an in-flight
slot come back every couple of seconds, and a job's next poll waits behind the whole queue:
workers spend their time on messages that only find "not yet", and throughput falls with
the manifest's length (5,000 rows ran at half the rate of 1,000). Instead a run keeps at
most `window` jobs with a message out (the jobs in its due set, see `RunKeys.due`);
each job that ends lets the next ones in, and the watchdog tops the window up, so a worker
that dies between the two never shrinks it for good.

Of the window, at most `ready` jobs may be out and not yet submitted (the run's ready set): a
job waiting for its turn to submit comes back with a message of its own each time it is told
"later", so jobs let in far ahead of their turn cost messages that do nothing. Each submit lets
the next job in (driven by the same worker thread), each end lets its successor in.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from jobs.config import Limits
from jobs.records import FINAL, PENDING, SUBMITTING, RunRecord
from jobs.redisio import script, translated
from jobs.store import RunStore

# Takes a job that ended out of the window, then pops jobs while the run has room; each one let
# in is due now, so that if its message is never published (the publisher died), the watchdog
# finds it overdue and drives it. A job already out (a duplicate entry) or settled (ended with
# its record written) is dropped.
_ADMIT = """
if ARGV[5] ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[5])
  redis.call('SREM', KEYS[3], ARGV[5])
end
local room = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[2])
local cap = tonumber(ARGV[6])
local ready = cap > 0 and cap - redis.call('SCARD', KEYS[3]) or room
local out = {}
while room > 0 and ready > 0 do
  local id = redis.call('LPOP', KEYS[1])
  if not id then break end
  local job = ARGV[3] .. id
  local f = redis.call('HMGET', job, 'state', 'record_written', 'token')
  local settled = f[1] and string.find(ARGV[4], ',' .. f[1] .. ',', 1, true) and f[2] == '1'
  if f[1] and not settled and not redis.call('ZSCORE', KEYS[2], id) then
    redis.call('ZADD', KEYS[2], ARGV[2], id)
    if cap > 0 and f[1] == ARGV[7] then
      redis.call('SADD', KEYS[3], id)
      ready = ready - 1
    end
    out[#out + 1] = id
    out[#out + 1] = f[3] or ''
    out[#out + 1] = f[1]
    room = room - 1
  end
end
return out
"""

# Members of the ready set no longer waiting to submit. `RunStore.transition` takes a job out in
# the same script that moves it, so only a state set some other way (by hand, a future bug) leaves
# one behind; the watchdog drops them so the ready part never shrinks for good.
_PRUNE = """
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local state = redis.call('HGET', ARGV[1] .. id, 'state')
  if state ~= ARGV[2] and state ~= ARGV[3] then
    redis.call('SREM', KEYS[1], id)
    n = n + 1
  end
end
return n
"""


def sizes(run: RunRecord, limits: Limits, slots: int) -> tuple[int, int]:
    """A run's window and ready part: a window set when it was started, else one that follows the
    in-flight slots there are now (`slots`); the ready part as it was started (this host's
    settings for older runs)."""
    window = run.window or limits.admission_window(slots)
    return window, run.ready or limits.admission_ready


class Backlog:
    def __init__(self, client: redis.Redis, store: RunStore) -> None:
        self.client, self.store = client, store
        self._admit = script(client, _ADMIT)
        self._prune = script(client, _PRUNE)

    @translated
    def push(self, run_id: str, job_ids: Iterable[str], *, chunk: int = 1000) -> int:
        key, n = self.store.keys(run_id).backlog, 0
        pipe = self.client.pipeline(transaction=False)
        batch: list[str] = []
        for jid in job_ids:
            batch.append(jid)
            if len(batch) == chunk:
                pipe.rpush(key, *batch)
                n, batch = n + len(batch), []
        if batch:
            pipe.rpush(key, *batch)
            n += len(batch)
        pipe.execute()
        return n

    @translated
    def admit(
        self, run_id: str, window: int, now: float | None = None, *, done: str = "", ready: int = 0
    ) -> list[tuple[str, str, str]]:
        """(job id, its current token, its state) for each job let in; the caller publishes their messages.
        `done`: a job that just ended leaves the window first (in the same round trip). `ready`:
        at most this many of the jobs out are still to be submitted (0: the window alone)."""
        k = self.store.keys(run_id)
        flat = self._admit(
            keys=[k.backlog, k.due, k.ready],
            args=[
                window,
                repr(time.time() if now is None else now),
                k.job(""),
                ",".join(("", *FINAL, "")),
                done,
                ready,
                PENDING,
            ],
        )
        items = [str(x) for x in flat]
        return list(zip(items[::3], items[1::3], items[2::3], strict=True))

    @translated
    def prune_ready(self, run_id: str) -> int:
        k = self.store.keys(run_id)
        args = [k.job(""), PENDING, SUBMITTING]
        return int(self._prune(keys=[k.ready], args=args))

    @translated
    def waiting(self, run_id: str) -> int:
        return int(self.client.llen(self.store.keys(run_id).backlog))

    @translated
    def reset(self, run_id: str) -> None:
        """Forget who is waiting and who is out (resume lets every job not yet settled in again)."""
        k = self.store.keys(run_id)
        self.client.delete(k.backlog, k.due, k.ready)
