"""Taking a run up again: retry the failed, lift a halt, reconcile, resume.

A run can be resumed from storage alone after Redis lost it: a job whose durable record has a
prediction id is polled again, never resubmitted (jobs/restore.py says how each record comes
back). Each path takes a final job back through the store's atomic reopen, so a job is taken
back once however many commands race for it, and its counters are undone with it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from jobs import results
from jobs.budget import Budget, ledger_key, worst_case
from jobs.claims import Claims
from jobs.control import AGENT, AUTH, CANCELLED, PAYMENT
from jobs.keys import RunKeys
from jobs.records import (
    FAILED,
    FETCHING,
    OVERDUE,
    PENDING,
    SKIPPED,
    SUBMITTED,
    UNCERTAIN,
    JobRecord,
    JobState,
    RunRecord,
)
from jobs.restore import Restore, earlier_paid, restore_as
from jobs.results import FINGERPRINT, Plan
from jobs.runs import Runs
from jobs.start import file_sha256
from jobs.storage import open_storage
from manifests.errors import ConfigError
from manifests.models import ModelTable
from manifests.spec import JobSpec
from manifests.validate import Validator


class Recovery:
    """Run control that takes jobs of a run up again, against Redis (and storage when Redis lost
    the run)."""

    def __init__(self, runs: Runs) -> None:
        self.runs = runs
        self.settings = runs.settings
        self.redis = runs.redis
        self.store = runs.store
        self.control = runs.control
        self.backlog = runs.backlog

    def retry_failed(self, run_id: str, admit: Callable[[str], int], *, pay_again: bool = False) -> tuple[int, int]:
        """Run failed jobs again: one whose outputs were paid for is fetched again, not resubmitted;
        one whose attempt was billed without outputs is resubmitted only with `pay_again` (a new
        ledger attempt: both costs count). Returns (jobs enqueued, billed jobs held back)."""
        self.runs.meta(run_id)
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
        scope = self.runs.meta(run_id).budget_scope
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
        return Budget(self.redis, self.runs.meta(run_id).budget_scope, prefix=self.settings.prefix)

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
                    raise ConfigError(
                        f"{self.runs.where} does not know run {run_id}: pass --output to read it from storage"
                    )
                return "storage", self._resume_from_storage(run_id, output, token, admit, manifest, s3_endpoint)
            driven = self.runs.driven(run_id)
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
            raise ConfigError(f"run {run_id} is not known to {self.runs.where}, and has no run.json under {output}")
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
