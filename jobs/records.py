"""Job and run records in Redis: the state machine's memory, changed only by atomic transitions.

A job moves `pending → submitting → submitted → fetching → succeeded`, or ends
`failed`, `skipped`, `uncertain` or `overdue`. A transition happens only from the
state the caller expects (Lua), and reaching a final state bumps the run's counters
exactly once, so a redelivered task can never count or bill a job twice.

`uncertain` means exactly: the POST left (`posted_at` was set by the message that held
the job's token) and no answer proves what happened. `overdue` is a job that holds a
prediction id but has no verdict yet (a poll deadline, or the service lost it): the run
ends with it counted at its reservation, and `resume`/`reconcile` poll it again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

import redis

from jobs.keys import RunKeys, active_runs
from jobs.redisio import DEFAULT_PREFIX, script, translated
from manifests.spec import ImageRef, JobSpec


class JobState(StrEnum):
    """A job's state. A `StrEnum`, so what Redis, the Lua scripts, the durable records and the
    reports hold stays the plain lowercase word, and a state read back compares equal to it."""

    PENDING = "pending"
    SUBMITTING = "submitting"
    SUBMITTED = "submitted"
    FETCHING = "fetching"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    UNCERTAIN = "uncertain"
    OVERDUE = "overdue"

    @property
    def final(self) -> bool:
        return self in FINAL


# The short names stay importable: most modules speak of one or two states, not of the type.
PENDING, SUBMITTING, SUBMITTED, FETCHING = JobState.PENDING, JobState.SUBMITTING, JobState.SUBMITTED, JobState.FETCHING
SUCCEEDED, FAILED, SKIPPED, UNCERTAIN = JobState.SUCCEEDED, JobState.FAILED, JobState.SKIPPED, JobState.UNCERTAIN
OVERDUE = JobState.OVERDUE
STATES = tuple(JobState)
FINAL = STATES[STATES.index(SUCCEEDED) :]  # every state from `succeeded` on ends the job

_TRANSITION = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= ARGV[1] then return state or '' end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'updated_at', ARGV[3])
for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[7] ~= '' then redis.call('SREM', KEYS[3], ARGV[7]) end
if ARGV[5] ~= '' then redis.call('HINCRBY', KEYS[2], ARGV[5], 1) end
if ARGV[6] ~= '' then redis.call('HINCRBY', KEYS[1], ARGV[6], 1) end
if ARGV[4] == '1' then
  redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
  redis.call('HINCRBY', KEYS[2], 'finished', 1)
  local cost = tonumber(redis.call('HGET', KEYS[1], 'cost_micros') or '0')
  redis.call('HINCRBY', KEYS[2], 'cost_micros', cost)
end
return 'ok'
"""

# A final job taken back. With ARGV[4] == '1' (an attempt that was paid, and is paid again) its
# cost stays in the run's total and moves to the job's earlier attempts.
_REOPEN = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'token', ARGV[3], 'next_token', '', 'error', '', 'reason', '')
redis.call('HDEL', KEYS[1], 'posted_at', 'wake_at', 'finished_at')
redis.call('HINCRBY', KEYS[2], ARGV[1], -1)
redis.call('HINCRBY', KEYS[2], 'finished', -1)
local cost = math.floor(tonumber(redis.call('HGET', KEYS[1], 'cost_micros') or '0'))
if ARGV[4] == '1' then
  redis.call('HINCRBY', KEYS[1], 'prior_cost_micros', cost)
elseif cost > 0 then
  redis.call('HINCRBY', KEYS[2], 'cost_micros', -cost)
end
redis.call('HSET', KEYS[1], 'cost_micros', '0')
return 1
"""

# The claim before a POST: only the message holding the job's token may take it.
_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'pending' then return state or '' end
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 'stale' end
redis.call('HSET', KEYS[1], 'state', 'submitting', 'updated_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'posted_at')
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return 'ok'
"""

# The last check before a POST, and the mark that it leaves: the job is still claimed by this
# message's token, its run is not halted and its budget not stopped. Once `posted_at` is set the
# job is never handed back.
_POST = """
local got = redis.call('HMGET', KEYS[1], 'state', 'token')
if got[1] ~= 'submitting' or got[2] ~= ARGV[1] then return 'lost' end
local halt = redis.call('GET', KEYS[2])
if halt then return 'halted:' .. halt end
local stopped = redis.call('HGET', KEYS[3], 'stopped')
if stopped then return 'budget:' .. stopped end
redis.call('HSET', KEYS[1], 'posted_at', ARGV[2])
return 'ok'
"""

# A claimed submit that never left goes back to pending. A POST that left is handed back only
# when the service's answer proved nothing was created (ARGV[2] == '1'); with ARGV[3] == '1' the
# attempt does not count.
_HAND_BACK = """
if redis.call('HGET', KEYS[1], 'state') ~= 'submitting' then return 0 end
if ARGV[2] ~= '1' and redis.call('HEXISTS', KEYS[1], 'posted_at') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'pending', 'updated_at', ARGV[1])
redis.call('HDEL', KEYS[1], 'posted_at')
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', -1) end
return 1
"""

# The next message's token is announced (and the job's due time moved to when it should run)
# before the message is published.
_ANNOUNCE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return false end
redis.call('HSET', KEYS[1], 'next_token', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return redis.call('HGET', KEYS[1], 'state')
"""

# A message may drive the job when it holds the current token or the announced next one; it
# then marks the job due by the end of its step lease and reads the whole record, in one trip.
_BEGIN = """
local token = redis.call('HGET', KEYS[1], 'token')
if not token then return false end
if token ~= ARGV[1] then
  if redis.call('HGET', KEYS[1], 'next_token') ~= ARGV[1] then return false end
  redis.call('HSET', KEYS[1], 'token', ARGV[1], 'next_token', '')
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return redis.call('HGETALL', KEYS[1])
"""

_COMMIT = """
local token = redis.call('HGET', KEYS[1], 'token')
if token == ARGV[1] and redis.call('HGET', KEYS[1], 'next_token') == ARGV[2] then
  redis.call('HSET', KEYS[1], 'token', ARGV[2], 'next_token', '')
end
return 1
"""


@dataclass
class JobRecord:
    run_id: str
    id: str
    state: JobState
    spec: JobSpec
    token: str = ""
    prediction_id: str = ""
    input_urls: list[str] = field(default_factory=list)
    service_outputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    nsfw: list[bool] = field(default_factory=list)  # per service output: flagged by the service (may be blank)
    price_micros: int | None = None
    cost_micros: int = 0
    attempts: int = 0
    polls: int = 0
    error: str = ""
    reason: str = ""
    submitted_at: float | None = None
    finished_at: float | None = None
    created_at: float | None = None
    record_written: bool = False  # the final durable record is in storage
    charge: int = 1  # the ledger attempt: a retry that may be billed again is a new one
    prior_cost_micros: int = 0  # what earlier paid attempts cost (in the run's total already)
    history: list[dict[str, Any]] = field(default_factory=list)  # earlier attempts' endings, oldest first
    posted_at: float | None = None  # the POST of this attempt left (or was about to) at this time
    wake_at: float | None = None  # a wait longer than the broker holds: the job sleeps until then
    reuse_look: bool = False  # its edit may be in the results index already: read it before paying
    reused_from: str = ""  # "<run>/<job>" whose stored outputs this job copied instead of paying
    saved_micros: int = 0  # what the reused edit cost when it was made: not spent again

    @property
    def final(self) -> bool:
        return self.state in FINAL

    @property
    def total_cost_micros(self) -> int:
        """Every paid attempt of this job, summed: what the report shows."""
        return self.cost_micros + self.prior_cost_micros

    def ending(self) -> dict[str, Any]:
        """How this attempt ended, kept in `history` when the job runs again."""
        return {
            "attempt": self.charge,
            "state": self.state,
            "reason": self.reason,
            "error": self.error[:300],
            "prediction_id": self.prediction_id,
            "cost_micros": self.cost_micros,
            "finished_at": self.finished_at,
        }

    @property
    def settled(self) -> bool:
        """Final, and its durable record written: nothing more to do for this job."""
        return self.final and self.record_written

    def to_json(self) -> dict[str, Any]:
        """The durable record (records/<id>.json): everything to report and resume, no secrets."""
        return {
            "run_id": self.run_id,
            "id": self.id,
            "line": self.spec.line,
            "state": self.state,
            "model": self.spec.model,
            "prompt": self.spec.prompt,
            "size": self.spec.size,
            "images": [i.value for i in self.spec.images],
            "params": self.spec.params,
            "metadata": self.spec.metadata,
            "prediction_id": self.prediction_id,
            "service_outputs": self.service_outputs,
            "outputs": self.outputs,
            "nsfw": self.nsfw,
            "price_micros": self.price_micros,
            "cost_micros": self.cost_micros,
            "prior_cost_micros": self.prior_cost_micros,
            "charge": self.charge,
            "history": self.history,
            "attempts": self.attempts,
            "polls": self.polls,
            "error": self.error,
            "reason": self.reason,
            "created_at": self.created_at,
            "submitted_at": self.submitted_at,
            "posted_at": self.posted_at,
            "finished_at": self.finished_at,
            "fingerprint": self.spec.fingerprint,
            "reused_from": self.reused_from,
            "saved_micros": self.saved_micros,
        }


@dataclass(frozen=True)
class RunRecord:
    """A run as its Redis hash holds it: the settings it started with (the same in run.json) and
    what is set as it ends. The hash keeps one JSON value per field, as `create_run` and `set_run`
    write them; every field has a default because runs started by earlier versions, or made by
    hand in tests, lack some, and such a run must still be read."""

    run_id: str = ""
    output: str = ""
    api_base: str = ""
    budget_scope: str = ""
    total: int | None = None  # None: only the hash's creation mark is there, not the run
    manifest: str = ""
    manifest_sha256: str = ""
    format: str | None = None
    model: str | None = None
    models_file: str | None = None
    allow_internal_urls: bool = False
    prices: Mapping[str, int] = field(default_factory=dict)  # list prices, for a prediction without one
    price_sources: Mapping[str, str] = field(default_factory=dict)
    prices_read_at: str | None = None
    metadata_columns: tuple[str, ...] = ()
    queue: str | None = None
    fetch_queue: str | None = None  # set only when it differs from `queue`
    notify_url: str = ""
    window: int = 0  # 0: the window follows the in-flight slots
    ready: int = 0  # 0: the worker's own setting
    s3_endpoint: str | None = None
    inputs_mode: str = "upload"  # a run from before the modes uploads, as it began
    inputs_stage: str = ""
    reuse: bool = False
    reuse_roots: tuple[str, ...] = ()  # the run's own output first
    reuse_claims: str = ""
    created_at: float | None = None
    skipped_invalid_rows: int = 0
    enqueued: int = 0
    report_written: bool = False
    notified: str = ""

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> RunRecord:
        """From decoded values (the hash's JSON, or run.json); keys this version does not know are
        left out, a missing or null one takes its default."""

        def get(name: str) -> Any:
            return values.get(name)

        def text(name: str, default: str = "") -> str:
            value = get(name)
            return default if value is None else str(value)

        def maybe(name: str) -> str | None:
            value = get(name)
            return None if value is None else str(value)

        def whole(name: str) -> int:
            return int(get(name) or 0)

        created = get("created_at")
        return cls(
            run_id=text("run_id"),
            output=text("output"),
            api_base=text("api_base"),
            budget_scope=text("budget_scope"),
            total=int(get("total") or 0) if "total" in values else None,
            manifest=text("manifest"),
            manifest_sha256=text("manifest_sha256"),
            format=maybe("format"),
            model=maybe("model"),
            models_file=maybe("models_file"),
            allow_internal_urls=bool(get("allow_internal_urls")),
            prices={str(k): int(v) for k, v in (get("prices") or {}).items()},
            price_sources={str(k): str(v) for k, v in (get("price_sources") or {}).items()},
            prices_read_at=maybe("prices_read_at"),
            metadata_columns=tuple(str(c) for c in get("metadata_columns") or ()),
            queue=maybe("queue"),
            fetch_queue=maybe("fetch_queue"),
            notify_url=text("notify_url"),
            window=whole("window"),
            ready=whole("ready"),
            s3_endpoint=maybe("s3_endpoint"),
            inputs_mode=text("inputs_mode", "upload"),
            inputs_stage=text("inputs_stage"),
            reuse=bool(get("reuse")),
            reuse_roots=tuple(str(r) for r in get("reuse_roots") or ()),
            reuse_claims=text("reuse_claims"),
            created_at=float(created) if created not in (None, "") else None,
            skipped_invalid_rows=whole("skipped_invalid_rows"),
            enqueued=whole("enqueued"),
            report_written=bool(get("report_written")),
            notified=text("notified"),
        )

    @classmethod
    def from_redis(cls, raw: Mapping[str, str]) -> RunRecord:
        """From the hash as HGETALL returns it: each value JSON, or (`created_at`, first set by
        HSETNX) a bare number."""
        values: dict[str, Any] = {}
        for k, v in raw.items():
            try:
                values[k] = json.loads(v)
            except ValueError:
                values[k] = v
        return cls.from_values(values)

    def list_price(self, model: str) -> int:
        return int(self.prices[model])


def spec_to_json(spec: JobSpec) -> str:
    return json.dumps(
        {
            "line": spec.line,
            "id": spec.id,
            "prompt": spec.prompt,
            "model": spec.model,
            "size": spec.size,
            "params": spec.params,
            "metadata": spec.metadata,
            "images": [[i.kind, i.value, i.path] for i in spec.images],
            "fp": spec.fingerprint,
        },
        separators=(",", ":"),
    )


def spec_from_json(text: str) -> JobSpec:
    d = json.loads(text)
    return JobSpec(
        line=d["line"],
        id=d["id"],
        prompt=d["prompt"],
        model=d["model"],
        size=d.get("size"),
        params=d.get("params") or {},
        metadata=d.get("metadata") or {},
        images=tuple(ImageRef(k, v, p) for k, v, p in d["images"]),
        fingerprint=d.get("fp") or "",
    )


class RunStore:
    """Runs and their jobs in Redis under one prefix."""

    def __init__(self, client: redis.Redis, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self._transition = script(client, _TRANSITION)
        self._reopen = script(client, _REOPEN)
        self._announce = script(client, _ANNOUNCE)
        self._begin = script(client, _BEGIN)
        self._commit = script(client, _COMMIT)
        self._claim = script(client, _CLAIM)
        self._post = script(client, _POST)
        self._hand_back = script(client, _HAND_BACK)

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
        return _record(run_id, job_id, raw) if raw else None

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
        return [_record(run_id, jid, raw) if raw else None for jid, raw in zip(job_ids, rows, strict=True)]

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
        return _record(run_id, job_id, dict(zip(flat[::2], flat[1::2], strict=True)))

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
    def claim(self, run_id: str, job_id: str, token: str) -> str:
        """'ok' when this message (holding `token`) took the pending job for its submit; 'stale'
        when another message drives it; otherwise the state it is in."""
        return str(self._claim(keys=[self.keys(run_id).job(job_id)], args=[token, repr(time.time())]))

    @translated
    def mark_posted(self, run_id: str, job_id: str, token: str, halt_key: str, budget_key: str) -> str:
        """'ok': the POST may leave now (and the job is marked as sent); 'lost': the job is no
        longer this message's; 'halted:<reason>': the run stopped its submits; 'budget:<why>':
        its budget stopped them."""
        keys = [self.keys(run_id).job(job_id), halt_key, budget_key]
        return str(self._post(keys=keys, args=[token, repr(time.time())]))

    @translated
    def hand_back(self, run_id: str, job_id: str, *, refused: bool = False, uncount: bool = True) -> bool:
        """A claimed submit that never left is pending again; False if it left (or was not claimed).
        `refused`: the POST left but the service's answer proves nothing was created."""
        args = [repr(time.time()), "1" if refused else "0", "1" if uncount else "0"]
        return bool(int(self._hand_back(keys=[self.keys(run_id).job(job_id)], args=args)))


def _record(run_id: str, job_id: str, raw: Mapping[str, str]) -> JobRecord:
    def js(name: str, default: Any) -> Any:
        value = raw.get(name)
        if value in (None, ""):
            return default
        try:
            return json.loads(value)
        except ValueError:
            return value

    def num(name: str) -> float | None:
        value = raw.get(name)
        return float(value) if value is not None and value not in ("", "null") else None

    def flags(name: str) -> list[bool]:
        value = js(name, [])
        return [v is True for v in value] if isinstance(value, list) else []

    price = raw.get("price_micros")
    return JobRecord(
        run_id=run_id,
        id=job_id,
        state=JobState(raw.get("state") or PENDING),
        spec=spec_from_json(raw["spec"]),
        token=raw.get("token", ""),
        prediction_id=raw.get("prediction_id", ""),
        input_urls=js("input_urls", []),
        service_outputs=js("service_outputs", []),
        outputs=js("outputs", []),
        nsfw=flags("nsfw"),
        price_micros=int(price) if price not in (None, "", "null") else None,
        cost_micros=int(raw.get("cost_micros") or 0),
        attempts=int(raw.get("attempts") or 0),
        polls=int(raw.get("polls") or 0),
        error=raw.get("error", ""),
        reason=raw.get("reason", ""),
        record_written=raw.get("record_written") == "1",
        charge=int(raw.get("charge") or 1),
        prior_cost_micros=int(raw.get("prior_cost_micros") or 0),
        history=js("history", []),
        posted_at=num("posted_at"),
        wake_at=num("wake_at"),
        submitted_at=num("submitted_at"),
        finished_at=num("finished_at"),
        created_at=num("created_at"),
        reuse_look=raw.get("reuse_look") == "1",
        reused_from=raw.get("reused_from", ""),
        saved_micros=int(raw.get("saved_micros") or 0),
    )
