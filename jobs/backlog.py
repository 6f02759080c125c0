"""A run's admission window: its jobs wait in a Redis list and enter the task queue a few at a time.

With every job of a big run as a task message at once, the jobs waiting for an in-flight
slot come back every couple of seconds, and a job's next poll waits behind the whole queue:
workers spend their time on messages that only find "not yet", and throughput falls with
the manifest's length (5,000 rows ran at half the rate of 1,000). Instead a run keeps at
most `window` jobs with a message out (the jobs in its due set, see `RunStore.due_key`);
each job that ends lets the next ones in, and the watchdog tops the window up, so a worker
that dies between the two never shrinks it for good.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from jobs.records import FINAL, RunStore
from jobs.redisio import script, translated

# Takes a job that ended out of the window, then pops jobs while the run has room; each one let
# in is due now, so that if its message is never published (the publisher died), the watchdog
# finds it overdue and drives it. A job already out (a duplicate entry) or settled (ended with
# its record written) is dropped.
_ADMIT = """
if ARGV[5] ~= '' then redis.call('ZREM', KEYS[2], ARGV[5]) end
local room = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[2])
local out = {}
while room > 0 do
  local id = redis.call('LPOP', KEYS[1])
  if not id then break end
  local job = ARGV[3] .. id
  local f = redis.call('HMGET', job, 'state', 'record_written', 'token')
  local settled = f[1] and string.find(ARGV[4], ',' .. f[1] .. ',', 1, true) and f[2] == '1'
  if f[1] and not settled and not redis.call('ZSCORE', KEYS[2], id) then
    redis.call('ZADD', KEYS[2], ARGV[2], id)
    out[#out + 1] = id
    out[#out + 1] = f[3] or ''
    out[#out + 1] = f[1]
    room = room - 1
  end
end
return out
"""


class Backlog:
    def __init__(self, client: redis.Redis, store: RunStore) -> None:
        self.client, self.store = client, store
        self._admit = script(client, _ADMIT)

    @translated
    def push(self, run_id: str, job_ids: Iterable[str], *, chunk: int = 1000) -> int:
        key, n = self.store.backlog_key(run_id), 0
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
        self, run_id: str, window: int, now: float | None = None, *, done: str = ""
    ) -> list[tuple[str, str, str]]:
        """(job id, its current token, its state) for each job let in; the caller publishes their messages.
        `done`: a job that just ended leaves the window first (in the same round trip)."""
        flat = self._admit(
            keys=[self.store.backlog_key(run_id), self.store.due_key(run_id)],
            args=[
                window,
                repr(time.time() if now is None else now),
                self.store.job_key(run_id, ""),
                ",".join(("", *FINAL, "")),
                done,
            ],
        )
        items = [str(x) for x in flat]
        return list(zip(items[::3], items[1::3], items[2::3], strict=True))

    @translated
    def waiting(self, run_id: str) -> int:
        return int(self.client.llen(self.store.backlog_key(run_id)))

    @translated
    def reset(self, run_id: str) -> None:
        """Forget who is waiting and who is out (resume lets every job not yet settled in again)."""
        self.client.delete(self.store.backlog_key(run_id), self.store.due_key(run_id))
