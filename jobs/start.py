"""Starting a run: nothing is enqueued or spent until the whole manifest is valid and the
pre-flight check passes.

The manifest is read twice, once to check and price every row and once to enqueue, so a bad row
or a budget that does not fit stops the run before its first job exists; the jobs then go to
Redis a thousand at a time, and workers start on the first rows while the rest are read.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs import results
from jobs.budget import Budget
from jobs.catalogue import Catalogue, CatalogueClient, Prices, Schemas
from jobs.claims import root_id
from jobs.config import WorkerSettings
from jobs.estimate import Estimate
from jobs.inputs import InputsRefused, upload_verdict
from jobs.inputs import plan as plan_inputs
from jobs.preflight import Verdict, account_balance, check
from jobs.redisio import connect
from jobs.results import Plan, reuse_roots
from jobs.s3check import checked_scan, s3_header
from jobs.storage import open_storage
from jobs.store import RunStore
from manifests.errors import ConfigError, SeedreamError
from manifests.models import ModelTable, micros_to_usd
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
