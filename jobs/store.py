"""Runs and their jobs in Redis under one prefix: the one place that reads and writes their
hashes, so the key layout (jobs/keys.py) and the atomic moves (jobs/transitions.py) are used the
same way by the command line, the workers and the watchdog.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, cast

import redis

from jobs.keys import RunKeys, active_runs
from jobs.records import FINAL, PENDING, SUBMITTING, JobRecord, JobState, RunRecord, spec_to_json
from jobs.redisio import DEFAULT_PREFIX, script, translated
from jobs.transitions import ANNOUNCE, BEGIN, CLAIM, COMMIT, HAND_BACK, POST, REOPEN, TRANSITION
from manifests.spec import JobSpec


class RunStore:
    """Runs and their jobs in Redis under one prefix."""

    def __init__(self, client: redis.Redis, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self._transition = script(client, TRANSITION)
        self._reopen = script(client, REOPEN)
        self._announce = script(client, ANNOUNCE)
        self._begin = script(client, BEGIN)
        self._commit = script(client, COMMIT)
        self._claim = script(client, CLAIM)
        self._post = script(client, POST)
        self._hand_back = script(client, HAND_BACK)

    # -- keys --------------------------------------------------------------------------------
    # (spelled in jobs/keys.py, which says what each holds)
    def keys(self, run_id: str) -> RunKeys:
        return RunKeys(self.prefix, run_id)

    @translated
    def reopen_run(self, run_id: str) -> None:
        """A job of an ended run is open again: the run is active (the watchdog watches it) and
        its report is written anew when its last job ends."""
        k = self.keys(run_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(k.finalized)
        pipe.sadd(self.active_key, run_id)
        pipe.hset(k.run, "report_written", "false")
        pipe.execute()

    @property
    def active_key(self) -> str:
        return active_runs(self.prefix)

    @translated
    def set_due(self, run_id: str, job_id: str, when: float) -> None:
        self.client.zadd(self.keys(run_id).due, {job_id: when})

    @translated
    def clear_due(self, run_id: str, job_id: str) -> None:
        self.client.zrem(self.keys(run_id).due, job_id)

    @translated
    def overdue(self, run_id: str, before: float, limit: int = 200) -> list[str]:
        return [str(x) for x in self.client.zrangebyscore(self.keys(run_id).due, "-inf", before, start=0, num=limit)]

    @translated
    def active_runs(self) -> list[str]:
        return sorted(str(x) for x in self.client.smembers(self.active_key))

    @translated
    def set_active(self, run_id: str, active: bool) -> None:
        if active:
            self.client.sadd(self.active_key, run_id)
        else:
            self.client.srem(self.active_key, run_id)

    @translated
    def force_token(self, run_id: str, job_id: str, token: str) -> None:
        """Take the job away from any message in flight (the reaper and resume do this)."""
        self.client.hset(self.keys(run_id).job(job_id), mapping={"token": token, "next_token": ""})

    # -- runs --------------------------------------------------------------------------------
    @translated
    def create_run(self, run_id: str, meta: Mapping[str, Any]) -> bool:
        """Register a run; False if one with this id is already known (ids are never reused)."""
        created = self.client.hsetnx(self.keys(run_id).run, "created_at", repr(time.time()))
        if created:
            self.client.hset(self.keys(run_id).run, mapping={k: json.dumps(v) for k, v in meta.items()})
        return bool(created)

    @translated
    def run_meta(self, run_id: str) -> RunRecord | None:
        raw = cast(dict[str, str], self.client.hgetall(self.keys(run_id).run))
        return RunRecord.from_redis(raw) if raw else None

    @translated
    def set_run(self, run_id: str, **fields: Any) -> None:
        self.client.hset(self.keys(run_id).run, mapping={k: json.dumps(v) for k, v in fields.items()})

    @translated
    def counts(self, run_id: str) -> dict[str, int]:
        return {k: int(v) for k, v in cast(dict[str, str], self.client.hgetall(self.keys(run_id).counts)).items()}

    @translated
    def bump(self, run_id: str, name: str, by: int = 1) -> None:
        self.client.hincrby(self.keys(run_id).counts, name, by)

    @translated
    def add_jobs(
        self,
        run_id: str,
        specs: Iterable[JobSpec],
        token: str,
        *,
        state: JobState = PENDING,
        waiting: bool = True,
        look: Callable[[str], bool] | None = None,
    ) -> list[str]:
        """Create job records (pipelined), append them to the run's ordered list and, unless the
        caller has more to set first, to its backlog (in the same round trip: a crash right after
        leaves no job that nothing will ever drive). `look` marks the jobs whose edit the results
        index may hold already (jobs/results.py)."""
        ids: list[str] = []
        pipe = self.client.pipeline(transaction=False)
        now = repr(time.time())
        for spec in specs:
            pipe.hset(
                self.keys(run_id).job(spec.id),
                mapping={
                    "state": state,
                    "spec": spec_to_json(spec),
                    "token": token,
                    "created_at": now,
                    "attempts": 0,
                    "polls": 0,
                    "cost_micros": 0,
                    "reuse_look": "1" if look is not None and look(spec.fingerprint) else "",
                },
            )
            ids.append(spec.id)
        if ids:
            pipe.rpush(self.keys(run_id).jobs, *ids)
            if waiting:
                pipe.rpush(self.keys(run_id).backlog, *ids)
            pipe.sadd(self.active_key, run_id)
        pipe.execute()
        return ids

    @translated
    def job_ids(self, run_id: str, start: int = 0, stop: int = -1) -> list[str]:
        return [str(x) for x in self.client.lrange(self.keys(run_id).jobs, start, stop)]

    def iter_job_ids(self, run_id: str, page: int = 1000) -> Iterator[str]:
        start = 0
        while True:
            ids = self.job_ids(run_id, start, start + page - 1)
            if not ids:
                return
            yield from ids
            start += page

    # -- jobs --------------------------------------------------------------------------------
    @translated
    def get(self, run_id: str, job_id: str) -> JobRecord | None:
        raw = cast(dict[str, str], self.client.hgetall(self.keys(run_id).job(job_id)))
        return JobRecord.from_redis(run_id, job_id, raw) if raw else None

    def iter_records(self, run_id: str, page: int = 500) -> Iterator[JobRecord]:
        """Every job of the run in manifest order, a page of records per round trip."""
        ids: list[str] = []
        for jid in self.iter_job_ids(run_id):
            ids.append(jid)
            if len(ids) == page:
                yield from (r for r in self.get_many(run_id, ids) if r is not None)
                ids = []
        if ids:
            yield from (r for r in self.get_many(run_id, ids) if r is not None)

    def get_many(self, run_id: str, job_ids: list[str]) -> list[JobRecord | None]:
        pipe = self.client.pipeline(transaction=False)
        for jid in job_ids:
            pipe.hgetall(self.keys(run_id).job(jid))
        rows = cast(list[dict[str, str]], pipe.execute())
        return [JobRecord.from_redis(run_id, jid, raw) if raw else None for jid, raw in zip(job_ids, rows, strict=True)]

    @translated
    def transition(
        self,
        run_id: str,
        job_id: str,
        expect: JobState,
        to: JobState,
        *,
        bump: str = "",
        count: str = "",
        **fields: Any,
    ) -> str:
        """'ok' when the job went from `expect` to `to`; otherwise the state it is really in.
        With the move (and only then) the run's counter `bump` and the job's field `count` go up by
        one, and a job past its submit leaves the run's ready set."""
        leaves = "" if to in (PENDING, SUBMITTING) else job_id
        args: list[Any] = [expect, to, repr(time.time()), "1" if to in FINAL else "0", bump, count, leaves]
        for k, v in fields.items():
            args += [k, v if isinstance(v, str) else json.dumps(v)]
        rk = self.keys(run_id)
        keys = [rk.job(job_id), rk.counts, rk.ready]
        return str(self._transition(keys=keys, args=args))

    @translated
    def update(self, run_id: str, job_id: str, **fields: Any) -> None:
        self.client.hset(
            self.keys(run_id).job(job_id),
            mapping={k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()},
        )

    @translated
    def record_stored(self, run_id: str, job_id: str, *, succeeded: bool) -> int:
        """The final record is durable in storage: keep in Redis only what the report, `status`
        and `retry-failed` read (a finished job is most of what a big run leaves in Redis).
        A failed job keeps its service outputs: a retry fetches them again, never resubmits.
        Returns how many jobs of the run have finished (the last one has the report written)."""
        drop = ["input_urls", "next_token"] + (["service_outputs", "error", "reason"] if succeeded else [])
        k = self.keys(run_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(k.job(job_id), "record_written", "1")
        pipe.hdel(k.job(job_id), *drop)
        pipe.hget(k.counts, "finished")
        return int(pipe.execute()[-1] or 0)  # jobs of the run finished so far

    @translated
    def holds(
        self, run_id: str, job_id: str, state: JobState, token: str, *, flag: str = ""
    ) -> tuple[bool, str | None]:
        """Whether the job is still in `state` and driven by the message holding `token`, and the
        value of the key `flag` (a run's halt reason), in one round trip: this check sits between
        a rate-limited send time and the send, where every wait adds jitter."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self.keys(run_id).job(job_id), "state", "token")
        if flag:
            pipe.get(flag)
        got = pipe.execute()
        return list(got[0]) == [state, token], (got[1] if flag else None)

    @translated
    def count_poll(self, run_id: str, job_id: str) -> int:
        """One more poll, for the job and the run (one round trip); the job's count so far."""
        k = self.keys(run_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hincrby(k.job(job_id), "polls", 1)
        pipe.hincrby(k.counts, "polls", 1)
        return int(pipe.execute()[0])

    @translated
    def incr(self, run_id: str, job_id: str, name: str, by: int = 1) -> int:
        return int(self.client.hincrby(self.keys(run_id).job(job_id), name, by))

    # A job is driven by one chain of task messages. Each message carries a token; the next one
    # is announced before it is published and committed after, so a worker killed in between
    # leaves either the old message (restored by the broker) or the new one valid, never neither.
    @translated
    def announce_token(self, run_id: str, job_id: str, old: str, new: str, due_at: float) -> str | None:
        """The job's state, once `new` is announced as its next token; None if `old` no longer drives it."""
        keys = [self.keys(run_id).job(job_id), self.keys(run_id).due]
        state = self._announce(keys=keys, args=[old, new, repr(due_at), job_id])
        return str(state) if state else None

    @translated
    def begin(self, run_id: str, job_id: str, token: str, due_at: float) -> JobRecord | None:
        """The job's record when this message may drive it (it holds the current or the announced
        next token), marked due by `due_at`; None for an unknown job or a stale message."""
        keys = [self.keys(run_id).job(job_id), self.keys(run_id).due]
        flat = self._begin(keys=keys, args=[token, repr(due_at), job_id])
        if not flat:
            return None
        return JobRecord.from_redis(run_id, job_id, dict(zip(flat[::2], flat[1::2], strict=True)))

    @translated
    def commit_token(self, run_id: str, job_id: str, old: str, new: str) -> None:
        self._commit(keys=[self.keys(run_id).job(job_id)], args=[old, new])

    @translated
    def reopen(
        self,
        run_id: str,
        job_id: str,
        from_state: JobState,
        to_state: JobState,
        token: str,
        *,
        paid_again: bool = False,
    ) -> bool:
        """Take a final job back (retry-failed, resume, reconcile), undoing its counters; with
        `paid_again` its cost stays counted, as an earlier attempt's."""
        keys = [self.keys(run_id).job(job_id), self.keys(run_id).counts]
        return bool(int(self._reopen(keys=keys, args=[from_state, to_state, token, "1" if paid_again else "0"])))

    @translated
    def claim(self, run_id: str, job_id: str, token: str, claim: str) -> str:
        """'ok' when this message (holding `token`) took the pending job for its submit, as the
        claim named `claim` (its own: `mark_posted` checks it); 'stale' when another message
        drives it; otherwise the state it is in."""
        return str(self._claim(keys=[self.keys(run_id).job(job_id)], args=[token, repr(time.time()), claim]))

    @translated
    def mark_posted(
        self, run_id: str, job_id: str, token: str, halt_key: str, budget_key: str, *, claim: str, posted_at: float
    ) -> str:
        """'ok': the POST may leave now (and the job is marked as sent, at `posted_at`: the mark
        a refused POST's hand-back names to show the claim is its own); 'lost': the job is no
        longer this claim's; 'halted:<reason>': the run stopped its submits; 'budget:<why>':
        its budget stopped them."""
        keys = [self.keys(run_id).job(job_id), halt_key, budget_key]
        return str(self._post(keys=keys, args=[token, repr(posted_at), claim]))

    @translated
    def hand_back(
        self, run_id: str, job_id: str, *, refused: bool = False, uncount: bool = True, posted_at: float | None = None
    ) -> str:
        """A claimed submit that never left is pending again: 'ok'; 'kept' if it left (or is not
        claimed); 'gone' if the job is not in Redis. `refused`: the POST marked at `posted_at`
        left, but the service's answer proves nothing was created."""
        posted = "" if posted_at is None else repr(posted_at)
        args = [repr(time.time()), "1" if refused else "0", "1" if uncount else "0", posted]
        return str(self._hand_back(keys=[self.keys(run_id).job(job_id)], args=args))
