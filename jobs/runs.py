"""Runs from the user's side once started: watch, report, cancel.

Watching reads the run's counters, which the store's transitions keep exactly, so it costs a
few reads however big the run; a cancel is a halt, after which no job's submit leaves. The
report can be rebuilt from the durable records alone when Redis lost the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jobs.backlog import Backlog
from jobs.budget import Budget
from jobs.config import WorkerSettings
from jobs.control import CANCELLED, RunControl
from jobs.records import FINAL, RunRecord
from jobs.redisio import connect, looked_in
from jobs.report import write_report, write_run_report
from jobs.storage import Storage, open_storage, stored_records
from jobs.store import RunStore
from jobs.thumbs import input_reader
from manifests.errors import ConfigError
from manifests.models import micros_to_usd
from manifests.s3 import s3_client


@dataclass
class Progress:
    run_id: str
    total: int
    counts: dict[str, int]
    cost_micros: int
    elapsed: float
    halted: str | None
    budget_cap: int | None
    budget_spent: int
    report_written: bool = False
    notified: str | None = None
    budget_stopped: str | None = None

    @property
    def finished(self) -> int:
        return self.counts.get("finished", 0)

    @property
    def done(self) -> bool:
        return self.finished >= self.total

    @property
    def rate(self) -> float:
        return self.finished / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        return (self.total - self.finished) / self.rate if self.rate > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {  # `status --json`: fields are only ever added; a change of meaning bumps the schema
            "schema": 1,
            "run_id": self.run_id,
            "total": self.total,
            "finished": self.finished,
            "done": self.done,
            "counts": {s: self.counts.get(s, 0) for s in FINAL},
            "in_progress": self.total - self.finished,
            "submitted": self.counts.get("submitted", 0),
            "reused": self.counts.get("reused", 0),  # succeeded by copying an edit already stored
            "cost_usd": micros_to_usd(self.cost_micros),
            "cost_micros": self.cost_micros,
            "elapsed_seconds": round(self.elapsed, 3),
            "jobs_per_second": round(self.rate, 3),
            "eta_seconds": None if self.eta is None else round(self.eta, 1),
            "halted": self.halted,
            "budget_stopped": self.budget_stopped,
            "budget_cap_usd": None if self.budget_cap is None else micros_to_usd(self.budget_cap),
            "budget_spent_usd": micros_to_usd(self.budget_spent),
            "retries": self.counts.get("retries", 0),
            "http_429": self.counts.get("http_429", 0),
            "uploads": self.counts.get("uploads", 0),
            "polls": self.counts.get("polls", 0),
            "report_written": self.report_written,
            "notified": self.notified,
        }


class Runs:
    """Run control against Redis (and storage when Redis lost a run)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.redis = connect(settings.redis_url)
        self.store = RunStore(self.redis, prefix=settings.prefix)
        self.control = RunControl(self.redis, prefix=settings.prefix)
        self.backlog = Backlog(self.redis, self.store)

    @property
    def where(self) -> str:
        """Where this looks for runs, for a message that says so: Redis host:port/db and key prefix."""
        return looked_in(self.redis, self.settings.prefix)

    def meta(self, run_id: str) -> RunRecord:
        meta = self.store.run_meta(run_id)
        if meta is None:
            raise ConfigError(
                f"run {run_id!r} is not known to {self.where}; `seedream-batch runs` lists the runs there, "
                f"and `resume {run_id} --output URI` restores one from its output"
            )
        return meta

    def progress(self, run_id: str) -> Progress:
        run = self.meta(run_id)
        counts = self.store.counts(run_id)
        budget = Budget(self.redis, run.budget_scope, prefix=self.settings.prefix).state()
        return Progress(
            run_id=run_id,
            total=run.total or 0,
            counts=counts,
            cost_micros=counts.get("cost_micros", 0),
            elapsed=time.time() - (run.created_at or time.time()),
            halted=self.control.halted(run_id),
            budget_cap=budget.cap_micros,
            budget_spent=budget.spent_micros,
            report_written=run.report_written,
            notified=run.notified or None,
            budget_stopped=budget.stopped,
        )

    def storage(self, run_id: str) -> Storage:
        run = self.meta(run_id)
        return open_storage(run.output, run_id, endpoint_url=self.settings.s3_endpoint or run.s3_endpoint)

    def report(self, run_id: str, *, presign_seconds: int | None = None) -> dict[str, Any]:
        reader = input_reader(_s3_client(self.meta(run_id).s3_endpoint or self.settings.s3_endpoint))
        storage = self.storage(run_id)
        return write_run_report(self.store, storage, run_id, read_input=reader, presign_seconds=presign_seconds)

    def final_summary(self, run_id: str, *, timeout: float = 30.0) -> dict[str, Any]:
        """The summary the workers wrote when the run ended (the one the webhook got); written
        here only if they have not within `timeout` (e.g. all of them are down)."""
        if self.wait_wrapped_up(run_id, notify=False, timeout=timeout):
            saved = self.storage(run_id).get_json("summary.json")
            if isinstance(saved, dict):
                return saved
        return self.report(run_id)

    def wait(
        self,
        run_id: str,
        on_progress: Callable[[Progress], None],
        *,
        interval: float = 0.5,
        timeout: float | None = None,
    ) -> Progress:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            p = self.progress(run_id)
            on_progress(p)
            if p.done:
                return p
            if deadline is not None and time.monotonic() > deadline:
                return p
            time.sleep(interval)

    def wait_wrapped_up(self, run_id: str, *, notify: bool, timeout: float = 120.0) -> bool:
        """Wait until the workers wrote the run's report and, with a webhook, told it (or gave up):
        `run --workers` stops its workers only then. False at the deadline."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.meta(run_id)
            if run.report_written and (not notify or run.notified):
                return True
            time.sleep(0.2)
        return False

    def cancel(self, run_id: str) -> str:
        self.meta(run_id)
        return self.control.halt(run_id, CANCELLED)

    def driven(self, run_id: str) -> int:
        """How many unfinished jobs of the run have a message due or a step under way (a job's due
        time is moved ahead each time a message takes it or is scheduled for it)."""
        ids = [str(x) for x in self.redis.zrangebyscore(self.store.keys(run_id).due, time.time(), "+inf")]
        n = 0
        for start in range(0, len(ids), 500):
            n += sum(1 for r in self.store.get_many(run_id, ids[start : start + 500]) if r and not r.final)
        return n


def report_from_storage(
    output: str, run_id: str, s3_endpoint: str | None = None, *, presign_seconds: int | None = None
) -> dict[str, Any]:
    """The report when Redis no longer knows the run: rebuilt from the durable records."""
    storage = open_storage(output, run_id, endpoint_url=s3_endpoint)
    run = RunRecord.from_values(storage.get_json("run.json") or {})
    rows = sorted(stored_records(storage), key=lambda r: int(r.get("line") or 0))
    reader = input_reader(_s3_client(s3_endpoint or run.s3_endpoint))
    return write_report(storage, iter(rows), run, read_input=reader, presign_seconds=presign_seconds)


def _s3_client(endpoint: str | None) -> Callable[[], Any]:
    """Made on first use: a report of local inputs needs no S3 at all."""
    made: list[Any] = []

    def client() -> Any:
        if not made:
            made.append(s3_client(endpoint))
        return made[0]

    return client
