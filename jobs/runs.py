"""Runs from the user's side: start, watch, cancel, retry the failed, resume, report.

Nothing is enqueued or spent until the whole manifest is valid and the pre-flight
check passes. A run can be resumed from storage alone after Redis lost it: a job
whose durable record has a prediction id is polled again, never resubmitted.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from jobs import results
from jobs.backlog import Backlog
from jobs.budget import Budget, ledger_key, worst_case
from jobs.catalogue import Catalogue, CatalogueClient, Prices, Schemas
from jobs.claims import Claims, root_id
from jobs.config import WorkerSettings
from jobs.control import AGENT, AUTH, CANCELLED, PAYMENT, RunControl
from jobs.estimate import Estimate
from jobs.inputs import InputsRefused, upload_verdict
from jobs.inputs import plan as plan_inputs
from jobs.keys import RunKeys
from jobs.preflight import Verdict, account_balance, check
from jobs.records import (
    FAILED,
    FETCHING,
    FINAL,
    OVERDUE,
    PENDING,
    SKIPPED,
    SUBMITTED,
    UNCERTAIN,
    JobRecord,
    JobState,
    RunRecord,
    RunStore,
)
from jobs.redisio import connect, looked_in
from jobs.report import write_report, write_run_report
from jobs.restore import Restore, earlier_paid, restore_as
from jobs.results import FINGERPRINT, Plan, reuse_roots
from jobs.s3check import checked_scan, s3_header
from jobs.storage import Storage, open_storage, stored_records
from jobs.thumbs import input_reader
from manifests.errors import ConfigError, SeedreamError
from manifests.models import ModelTable, micros_to_usd
from manifests.s3 import s3_client
from manifests.spec import JobSpec
from manifests.validate import Result, Validator

INITIAL_TOKEN = "0"  # noqa: S105 (a message token, not a secret)


class ManifestRefused(SeedreamError):
    """The manifest has invalid rows: nothing was enqueued or spent."""

    def __init__(self, result: Result, schemas: list[str] | None = None) -> None:
        super().__init__(f"{len(result.problems) + result.more_problems} problems in the manifest")
        self.result = result
        self.schemas = schemas or []


class PreflightRefused(SeedreamError):
    """The estimate does not fit the budget or the balance: nothing was enqueued or spent."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__("; ".join(verdict.messages))
        self.verdict = verdict


@dataclass(frozen=True)
class RunOptions:
    manifest: Path
    output: str
    api_base: str
    model: str | None = None
    fmt: str | None = None
    models_file: str | None = None
    budget_micros: int | None = None
    campaign: str | None = None
    run_id: str | None = None
    allow_partial: bool = False
    skip_invalid: bool = False
    s3_endpoint: str | None = None
    queue: str = "seedream"
    fetch_queue: str = ""
    notify_url: str = ""
    check_balance: bool = True
    inputs: str = "auto"  # jobs/inputs.py: auto | presign | upload
    inputs_bucket: str = ""
    allow_bulk_upload: bool = False
    bulk_upload_threshold: int = 100
    reuse: bool = True  # rows whose edit is already stored are copied, not paid again
    reuse_from: tuple[str, ...] = ()  # other outputs whose results indexes are read as well


@dataclass
class Started:
    run_id: str
    jobs: int
    estimate: Estimate
    result: Result
    messages: list[str] = field(default_factory=list)
    prices: list[str] = field(default_factory=list)  # one line per model of the run: price and source
    schemas: list[str] = field(default_factory=list)  # one line per model: which rules checked its rows


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def start_run(
    opts: RunOptions,
    settings: WorkerSettings,
    admit: Callable[[str], int],
    *,
    client_factory: Callable[[str], Any] | None = None,
    service: CatalogueClient | None = None,
) -> Started:
    """`service` reads the catalogue (`/models`) and the schemas it names: the run's prices and
    the service's own row checks. Without it, or when it fails, the built-in table decides."""
    catalogue = Catalogue.read(service) if service is not None else None
    prices = Prices.resolve(ModelTable.load(opts.models_file, default=opts.model), catalogue)
    schemas = Schemas(catalogue, service.schema) if catalogue is not None and service is not None else None
    allow_internal_urls = settings.allow_internal_urls
    validator = Validator(
        opts.manifest,
        prices.table,
        fmt=opts.fmt,
        model=opts.model,
        allow_internal_urls=allow_internal_urls,
        schemas=schemas,
    )
    inputs = plan_inputs(opts.inputs, opts.output, opts.inputs_bucket)
    # The run's own output's index is written to even with --no-reuse (later runs may reuse
    # what it pays for); it is read only with reuse on.
    roots = reuse_roots(opts.output, opts.reuse_from if opts.reuse else ())
    known = results.known(roots, opts.s3_endpoint) if opts.reuse else set()
    result, est, metadata_columns = checked_scan(
        validator, lambda: s3_header(opts.s3_endpoint), known=known if opts.reuse else None
    )
    est.price_sources = prices.to_dict(est.by_model)
    if (not result.ok and not opts.skip_invalid) or result.jobs == 0:
        raise ManifestRefused(result, schemas.lines() if schemas is not None else None)
    warning, refusal = upload_verdict(
        inputs,
        validator.local_files,
        validator.s3_objects,
        threshold=opts.bulk_upload_threshold,
        allow=opts.allow_bulk_upload,
    )
    if refusal:
        raise InputsRefused(refusal)
    r = connect(settings.redis_url)
    store = RunStore(r, prefix=settings.prefix)
    run_id = opts.run_id or new_run_id()
    scope = opts.campaign or run_id
    budget = Budget(r, scope, prefix=settings.prefix)
    if opts.budget_micros is not None:
        budget.set_cap(opts.budget_micros)
    state = budget.state()
    est = est.with_budget(state.remaining_micros)
    balance = None
    messages: list[str] = [warning] if warning else []
    if catalogue is not None and catalogue.error:
        why = f"/models could not be read ({catalogue.error})"
        messages.append(f"{why}; prices from the models file or the built-in table")
    if opts.check_balance and client_factory is not None:
        balance, note = account_balance(client_factory(opts.api_base))
        if note:
            messages.append(note)
    verdict = check(est, state if state.cap_micros is not None else None, balance, allow_partial=opts.allow_partial)
    if not verdict.ok:
        raise PreflightRefused(verdict)
    messages += verdict.messages
    if est.reused_jobs:
        messages.append(
            f"{est.reused_jobs:,} of {est.jobs:,} rows reuse an edit stored already or made by an earlier row: "
            f"copied, not paid again (up to ${micros_to_usd(est.reused_micros)} saved; --no-reuse pays anew)"
        )
    meta = {
        "run_id": run_id,
        "output": opts.output,
        "api_base": opts.api_base,
        "budget_scope": scope,
        "total": result.jobs,
        "manifest": str(opts.manifest.resolve()),
        "manifest_sha256": file_sha256(opts.manifest),
        "format": validator.fmt,
        "model": opts.model,
        "models_file": opts.models_file,
        "allow_internal_urls": allow_internal_urls,
        **prices.meta(),
        "metadata_columns": metadata_columns,
        "queue": opts.queue,
        "fetch_queue": opts.fetch_queue if opts.fetch_queue != opts.queue else "",
        "notify_url": opts.notify_url,
        "window": settings.limits.window,  # 0: it follows the in-flight slots (workers/slots.py)
        "ready": settings.limits.admission_ready,
        "s3_endpoint": opts.s3_endpoint,
        **inputs.meta(),
        "reuse": opts.reuse,
        "reuse_roots": roots,  # the run's own output first: where its edits are looked up
        "reuse_claims": root_id(roots[0]),
        "created_at": time.time(),
        "skipped_invalid_rows": result.invalid_rows,
    }
    if not store.create_run(run_id, meta):
        raise ConfigError(f"run id {run_id!r} is already used; pick another or `resume` it")
    storage = open_storage(opts.output, run_id, endpoint_url=opts.s3_endpoint)
    durable = {k: v for k, v in meta.items() if k != "notify_url"}  # a webhook may carry a token
    extra = {"limits": settings.limits.__dict__, "estimate": est.to_dict(), "budget_cap_micros": state.cap_micros}
    storage.put_json("run.json", {**durable, **extra})
    count = 0
    batch: list[JobSpec] = []
    look = Plan(known).reused if opts.reuse else None
    for spec in validator.jobs():
        batch.append(spec)
        if len(batch) == 1000:
            count += len(store.add_jobs(run_id, batch, INITIAL_TOKEN, look=look))
            admit(run_id)  # workers start on the first rows while the rest are read
            batch = []
    if batch:
        count += len(store.add_jobs(run_id, batch, INITIAL_TOKEN, look=look))
    admit(run_id)
    store.set_run(run_id, enqueued=count)
    return Started(
        run_id=run_id,
        jobs=count,
        estimate=est,
        result=result,
        messages=messages,
        prices=prices.lines(est.by_model),
        schemas=schemas.lines() if schemas is not None else [],
    )


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

    def retry_failed(self, run_id: str, admit: Callable[[str], int], *, pay_again: bool = False) -> tuple[int, int]:
        """Run failed jobs again: one whose outputs were paid for is fetched again, not resubmitted;
        one whose attempt was billed without outputs is resubmitted only with `pay_again` (a new
        ledger attempt: both costs count). Returns (jobs enqueued, billed jobs held back)."""
        self.meta(run_id)
        again: list[str] = []
        held = 0
        token = secrets.token_hex(8)
        for rec in list(self.store.iter_records(run_id)):
            if rec.state != FAILED:
                continue
            if rec.service_outputs:
                if self.store.reopen(run_id, rec.id, FAILED, FETCHING, token):
                    self.store.update(run_id, rec.id, record_written="0")
                    again.append(rec.id)
            elif rec.cost_micros and not pay_again:
                held += 1
            elif self._new_attempt(run_id, rec, token):
                again.append(rec.id)
        self._enqueue_again(run_id, again, admit)
        return len(again), held

    def _new_attempt(self, run_id: str, rec: JobRecord, token: str) -> bool:
        """A final job submitted afresh: a new ledger attempt; a paid one's cost stays counted."""
        if not self.store.reopen(run_id, rec.id, rec.state, PENDING, token, paid_again=bool(rec.cost_micros)):
            return False
        self.store.update(
            run_id,
            rec.id,
            input_urls=[],
            prediction_id="",
            service_outputs=[],
            outputs=[],
            nsfw=[],
            record_written="0",
            charge=str(rec.charge + 1),
            history=[*rec.history, rec.ending()],
        )
        return True

    def _enqueue_again(self, run_id: str, ids: list[str], admit: Callable[[str], int]) -> None:
        if ids:
            self.store.reopen_run(run_id)
            self.backlog.push(run_id, ids)
            admit(run_id)

    def clear_halt(self, run_id: str, admit: Callable[[str], int]) -> tuple[list[str], int]:
        """Lift the run's halt (payment, key, cancel) and its budget's stop, and run the jobs they
        skipped again, each as a new attempt. Returns (the reasons lifted, jobs enqueued)."""
        scope = self.meta(run_id).budget_scope
        lifted = [r for r in [self.control.halted(run_id)] if r]
        self.control.resume(run_id)
        stopped = Budget(self.redis, scope, prefix=self.settings.prefix).clear_stop()
        if stopped:
            lifted.append(stopped)
        token = secrets.token_hex(8)
        again: list[str] = []
        for rec in list(self.store.iter_records(run_id)):
            stop = rec.reason in (PAYMENT, AUTH, AGENT, CANCELLED) or (rec.reason == "budget" and rec.error != "")
            halted = rec.state == SKIPPED and stop
            if (halted or (rec.state == FAILED and rec.reason == AUTH)) and self._new_attempt(run_id, rec, token):
                again.append(rec.id)
        self._enqueue_again(run_id, again, admit)
        return lifted, len(again)

    def reconcile(self, run_id: str, admit: Callable[[str], int]) -> int:
        """Poll again every job that holds a prediction id without a verdict (`overdue`, or an
        `uncertain` one whose id turned up); workers fetch what arrived and settle it once."""
        budget = self._budget(run_id)
        token = secrets.token_hex(8)
        again = [r.id for r in list(self.store.iter_records(run_id)) if self._reopen_awaiting(run_id, r, token, budget)]
        self._enqueue_again(run_id, again, admit)
        return len(again)

    def _budget(self, run_id: str) -> Budget:
        return Budget(self.redis, self.meta(run_id).budget_scope, prefix=self.settings.prefix)

    def _reopen_awaiting(self, run_id: str, rec: JobRecord, token: str, budget: Budget) -> bool:
        if rec.state not in (OVERDUE, UNCERTAIN) or not rec.prediction_id:
            return False
        if not self.store.reopen(run_id, rec.id, rec.state, SUBMITTED, token):
            return False
        budget.unsettle(ledger_key(run_id, rec.id, rec.charge))
        self.store.update(run_id, rec.id, submitted_at=repr(time.time()), record_written="0")
        return True

    def resume(
        self,
        run_id: str,
        output: str | None,
        admit: Callable[[str], int],
        *,
        manifest: Path | None = None,
        s3_endpoint: str | None = None,
        force: bool = False,
    ) -> tuple[str, int]:
        """Continue a run: from Redis when it still knows it, else from storage alone. One resume
        of a run at a time; a run that workers still drive is refused unless `force`."""
        lock = RunKeys(self.settings.prefix, run_id).resuming
        mine = secrets.token_hex(8)
        if not self.redis.set(lock, mine, nx=True, ex=600):
            raise ConfigError(f"run {run_id} is being resumed by another command; wait for it to finish")
        try:
            token = secrets.token_hex(8)
            meta = self.store.run_meta(run_id)
            if meta is None:
                if output is None:
                    raise ConfigError(f"{self.where} does not know run {run_id}: pass --output to read it from storage")
                return "storage", self._resume_from_storage(run_id, output, token, admit, manifest, s3_endpoint)
            driven = self.driven(run_id)
            if driven and not force:
                raise ConfigError(
                    f"run {run_id} is still driven by workers ({driven} jobs have a step under way or a "
                    "message due); `watch` it, or pass --force if those workers are gone"
                )
            ids = []
            budget = Budget(self.redis, meta.budget_scope, prefix=self.settings.prefix)
            for rec in list(self.store.iter_records(run_id)):
                if self._reopen_awaiting(run_id, rec, token, budget):
                    ids.append(rec.id)
                elif not rec.settled:
                    self.store.update(run_id, rec.id, token=token, next_token="")
                    ids.append(rec.id)
            if ids:
                self.store.reopen_run(run_id)
            self.backlog.reset(run_id)  # every job not settled is let in again, once
            self.backlog.push(run_id, ids)
            admit(run_id)
            return "redis", len(ids)
        finally:
            if self.redis.get(lock) == mine:
                self.redis.delete(lock)

    def driven(self, run_id: str) -> int:
        """How many unfinished jobs of the run have a message due or a step under way (a job's due
        time is moved ahead each time a message takes it or is scheduled for it)."""
        ids = [str(x) for x in self.redis.zrangebyscore(self.store.due_key(run_id), time.time(), "+inf")]
        n = 0
        for start in range(0, len(ids), 500):
            n += sum(1 for r in self.store.get_many(run_id, ids[start : start + 500]) if r and not r.final)
        return n

    def _resume_from_storage(
        self,
        run_id: str,
        output: str,
        token: str,
        admit: Callable[[str], int],
        manifest: Path | None,
        s3_endpoint: str | None,
    ) -> int:
        storage = open_storage(output, run_id, endpoint_url=s3_endpoint)
        saved = storage.get_json("run.json")
        if not isinstance(saved, dict):
            raise ConfigError(f"run {run_id} is not known to {self.where}, and has no run.json under {output}")
        path = manifest or Path(saved["manifest"])
        if file_sha256(path) != saved["manifest_sha256"]:
            raise ConfigError(f"{path} is not the manifest this run started with (its digest differs)")
        models_file = saved.get("models_file") or self.settings.models_file or None
        table = ModelTable.load(models_file, default=saved.get("model"))
        validator = Validator(
            path,
            table,
            fmt=saved.get("format"),
            model=saved.get("model"),
            check_files=False,
            allow_internal_urls=bool(saved.get("allow_internal_urls")),
        )
        meta = {k: v for k, v in saved.items() if k not in ("limits", "estimate", "budget_cap_micros")}
        meta["output"] = output
        meta["s3_endpoint"] = s3_endpoint or saved.get("s3_endpoint")
        if not self.store.create_run(run_id, meta):
            raise ConfigError(f"run {run_id} is known to Redis again; resume it without --output")
        run = RunRecord.from_values(meta)
        budget = Budget(self.redis, run.budget_scope, prefix=self.settings.prefix)
        if saved.get("budget_cap_micros") is not None and budget.state().cap_micros is None:
            budget.set_cap(int(saved["budget_cap_micros"]))
        todo: list[str] = []
        batch: list[JobSpec] = []
        # The rows' fingerprints are read again (files hashed, not checked); a stored record's
        # wins, being what the run first had. Rows whose edit is indexed look for it, as at start.
        roots = list(run.reuse_roots)
        reusing = run.reuse and bool(roots)
        look = Plan(results.known(roots, run.s3_endpoint)).reused if reusing else None
        claims = Claims(self.redis, prefix=self.settings.prefix)

        def flush() -> None:
            recs = [storage.get_json(f"records/{spec.id}.json") for spec in batch]
            specs = [with_fingerprint(spec, rec) for spec, rec in zip(batch, recs, strict=True)]
            ids = self.store.add_jobs(run_id, specs, token, waiting=False, look=look)  # let in once restored
            for spec, jid, rec in zip(specs, ids, recs, strict=True):
                if not isinstance(rec, dict):
                    todo.append(jid)
                    continue
                cost = int(rec.get("cost_micros") or 0)
                charge = int(rec.get("charge") or 1)
                history = rec.get("history") or []
                for attempt, paid in earlier_paid(history):
                    budget.settle(ledger_key(run_id, jid, attempt), paid)
                fields = {
                    "prediction_id": rec.get("prediction_id") or "",
                    "outputs": rec.get("outputs") or [],
                    "service_outputs": rec.get("service_outputs") or [],
                    "nsfw": rec.get("nsfw") or [],
                    "error": rec.get("error") or "",
                    "reason": rec.get("reason") or "",
                    "attempts": int(rec.get("attempts") or 0),
                    "cost_micros": cost,
                    "prior_cost_micros": int(rec.get("prior_cost_micros") or 0),
                    "charge": str(charge),
                    "history": history,
                    "record_written": "1",
                    "reused_from": str(rec.get("reused_from") or ""),
                    "saved_micros": str(int(rec.get("saved_micros") or 0)),
                }
                entry = ledger_key(run_id, jid, charge)
                kind = restore_as(rec)
                if kind is Restore.POLL_AGAIN:
                    self.store.update(run_id, jid, **{**fields, "cost_micros": 0, "record_written": "0"})
                    self.store.transition(run_id, jid, PENDING, SUBMITTED, submitted_at=repr(time.time()))
                    budget.reserve(entry, worst_case(run.list_price(spec.model), spec.params))
                    if reusing and spec.fingerprint:  # its edit is under way: twins wait for it, from now
                        claims.take(run.reuse_claims, spec.fingerprint, f"{run_id}:{jid}")
                    todo.append(jid)
                elif kind is Restore.ENDED:
                    self.store.update(run_id, jid, **fields)
                    ended = JobState(rec["state"])  # one of FINAL
                    self.store.transition(run_id, jid, PENDING, ended, bump="reused" if fields["reused_from"] else "")
                    if cost:
                        budget.settle(entry, cost)
                elif kind is Restore.MAYBE_SENT:
                    price = worst_case(run.list_price(spec.model), spec.params)
                    self.store.update(
                        run_id,
                        jid,
                        **{
                            **fields,
                            "cost_micros": price,
                            "record_written": "0",
                            "reason": "submit_outcome_unknown",
                            "error": "Redis lost the run during this job's submit",
                        },
                    )
                    self.store.transition(run_id, jid, PENDING, UNCERTAIN)
                    budget.settle(entry, price)
                    todo.append(jid)
                else:  # Restore.UNSENT: it runs as a new attempt
                    self.store.update(run_id, jid, charge=str(charge), history=history,
                                      prior_cost_micros=fields["prior_cost_micros"])  # fmt: skip
                    todo.append(jid)
            batch.clear()

        for spec in validator.jobs():
            batch.append(spec)
            if len(batch) == 500:
                flush()
        if batch:
            flush()
        self.backlog.push(run_id, todo)
        admit(run_id)
        return len(todo)


def with_fingerprint(spec: JobSpec, rec: Any) -> JobSpec:
    fp = rec.get("fingerprint") if isinstance(rec, dict) else None
    return replace(spec, fingerprint=fp) if isinstance(fp, str) and FINGERPRINT.fullmatch(fp) else spec


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
