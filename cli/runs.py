"""CLI commands that start and control runs; thin: parse, build settings, call jobs.start, jobs.runs and
jobs.recovery."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import click

from cli import options, progress_view
from cli.inputs import inputs_options
from cli.options import FromSettings, s3_endpoint_option
from cli.reuse import reuse_options
from jobs.config import Limits, WorkerSettings
from jobs.environment import install
from jobs.inputs import InputsRefused
from jobs.recovery import Recovery
from jobs.report import MAX_PRESIGN_SECONDS
from jobs.runs import Progress, Runs, report_from_storage
from jobs.start import ManifestRefused, PreflightRefused, RunOptions, start_run
from manifests.errors import ConfigError, SeedreamError
from manifests.models import micros_to_usd, usd_to_micros

EXIT_OK, EXIT_ERROR, EXIT_INVALID, EXIT_PARTIAL, EXIT_REFUSED = 0, 1, 2, 3, 4


def _queue() -> str:
    return options.settings().queue


def _admitter(settings: WorkerSettings, queue: str) -> Callable[[str], int]:
    """Lets a run's waiting jobs into the task queue, up to its window, from this process."""
    from dataclasses import replace

    from jobs.backlog import Backlog, sizes
    from jobs.records import RunRecord
    from jobs.redisio import connect
    from jobs.store import RunStore
    from workers.dispatch import publish
    from workers.slots import Slots

    store = RunStore(connect(settings.redis_url), prefix=settings.prefix)
    backlog = Backlog(store.client, store)
    lim = settings.limits
    slots = Slots(store.client, settings.atlas.api_key.fingerprint(), lim.in_flight_ceiling,
                  lim.slot_lease_seconds, prefix=settings.prefix)  # fmt: skip

    def admit(run_id: str) -> int:
        run = replace(store.run_meta(run_id) or RunRecord(), queue=queue)
        window, ready = sizes(run, lim, slots.capacity())
        return publish(run_id, backlog.admit(run_id, window, ready=ready), run)

    return admit


def _follow(runs: Runs, run_id: str, *, as_json: bool = False) -> Progress:
    """Follow a run to its end with the view that fits stdout (cli/progress_view.py)."""
    with progress_view.view(as_json=as_json, limit=runs.settings.limits.submit_rate) as show:
        return runs.wait(run_id, show)


def _exit_code(p: Progress) -> int:
    return EXIT_OK if p.counts.get("succeeded", 0) == p.total else EXIT_PARTIAL


@click.command("run")
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--output", required=True, help="s3://bucket/prefix or a local folder; the run goes under <output>/<run_id>/."
)
@click.option("--model", default=None, help="Model for rows without one.")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default=None, help="Manifest format.")
@click.option(
    "--models-file", default=None, cls=FromSettings, setting="models_file", help="JSON overriding the model table."
)
@click.option("--budget", default=None, help="Hard cap in USD; never passed.")
@click.option("--campaign", default=None, help="Share the budget with other runs of this campaign name.")
@click.option("--run-id", default=None, help="Name the run (letters, digits, . _ -); default: time + random.")
@click.option(
    "--workers",
    "workers",
    type=int,
    default=0,
    help="Start N local worker processes for this run (one that dies is restarted).",
)
@click.option(
    "--concurrency", type=int, default=None, help="Threads per local worker (default: 2 x submit rate / workers, 8-64)."
)
@click.option("--wait/--no-wait", default=None, help="Show progress and wait for the end (default: on a terminal).")
@click.option("--api-base", default=None, cls=FromSettings, setting="api_base", help="The service's API base URL.")
@s3_endpoint_option
@click.option("--allow-partial", is_flag=True, help="Start even if the budget or balance cannot pay for every job.")
@click.option("--skip-invalid", is_flag=True, help="Run the valid rows and list the invalid ones.")
@click.option("--submit-rate", type=float, default=None, help="Submits/s per API key (default SEEDREAM_SUBMIT_RATE).")
@click.option(
    "--max-in-flight",
    type=int,
    default=None,
    help="A ceiling on predictions in flight per key (default: none; as many as the service takes).",
)
@click.option(
    "--notify",
    "notify_url",
    default=None,
    cls=FromSettings,
    setting="notify_url",
    help="POST the run's summary (JSON) to this URL when it ends; retried, never fails the run.",
)
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None, help="Log lines of the local workers.")
@inputs_options
@reuse_options
def run_command(
    manifest: Path,
    output: str,
    model: str | None,
    fmt: str | None,
    models_file: str | None,
    budget: str | None,
    campaign: str | None,
    run_id: str | None,
    workers: int,
    concurrency: int | None,
    wait: bool | None,
    api_base: str | None,
    s3_endpoint: str | None,
    allow_partial: bool,
    skip_invalid: bool,
    submit_rate: float | None,
    max_in_flight: int | None,
    notify_url: str | None,
    log_format: str | None,
    inputs: str,
    inputs_bucket: str | None,
    allow_bulk_upload: bool,
    reuse: bool,
    reuse_from: tuple[str, ...],
) -> None:
    """Validate MANIFEST, check the budget, and run every row through the service. A row whose
    edit is already stored under --output (or --reuse-from) is copied from there, not paid again."""
    from workers.atlas import AtlasClient, catalogue_client
    from workers.local import LocalWorkers

    if workers and wait is False:
        click.echo(
            f"refused: --workers {workers} starts workers that stop when this command returns, and --no-wait "
            "returns at once: nothing would run.\n"
            f"  either wait here:         seedream-batch run {manifest} --output {output} --workers {workers} --wait\n"
            "  or start workers elsewhere: seedream-batch worker   (then run with --no-wait and no --workers)",
            err=True,
        )
        sys.exit(EXIT_INVALID)
    try:
        # This command's own flags count as the global ones would, for its workers too.
        flags = {"submit_rate": submit_rate, "max_in_flight": max_in_flight, "log_format": log_format}
        given = install(options.settings().with_flags(**flags))
        config = WorkerSettings.from_settings(given)
        config = replace(config, atlas=config.atlas.with_(api_base=api_base)) if api_base else config
        opts = RunOptions(
            manifest=manifest,
            output=output,
            api_base=config.atlas.api_base,
            model=model,
            fmt=fmt,
            models_file=models_file,
            budget_micros=usd_to_micros(budget) if budget else None,
            campaign=campaign,
            run_id=run_id,
            allow_partial=allow_partial,
            skip_invalid=skip_invalid,
            s3_endpoint=s3_endpoint,
            queue=given.queue,
            fetch_queue=given.fetch_queue,
            notify_url=notify_url or "",
            inputs=inputs,
            inputs_bucket=inputs_bucket or "",
            allow_bulk_upload=allow_bulk_upload,
            bulk_upload_threshold=given.bulk_upload_threshold,
            reuse=reuse,
            reuse_from=reuse_from,
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    wait = bool(workers) or sys.stdout.isatty() if wait is None else wait  # its own workers: it must wait
    threads = concurrency or config.limits.threads(workers)
    # the run's own workers take every queue its jobs go to: with a fetch queue set and no
    # fetch worker here, downloads would wait in Redis for good after the service had billed them
    queues = ",".join(dict.fromkeys(q for q in (opts.queue, given.fetch_queue) if q))
    local = (
        LocalWorkers(workers, concurrency=threads, queue=queues, settings=given, restart=True).start()
        if workers
        else None
    )
    try:
        try:
            with catalogue_client(config.atlas) as service:
                started = start_run(
                    opts,
                    config,
                    _admitter(config, opts.queue),
                    client_factory=lambda base: AtlasClient(config.atlas.with_(api_base=base)),
                    service=service,
                )
        except ManifestRefused as exc:
            for line in exc.schemas:
                click.echo(line, err=True)
            for line in exc.result.lines():
                click.echo(line, err=True)
            click.echo(f"{manifest}: the manifest has problems; nothing was enqueued or spent", err=True)
            sys.exit(EXIT_INVALID)
        except InputsRefused as exc:
            click.echo(f"refused: {exc}; nothing was enqueued or spent", err=True)
            sys.exit(EXIT_INVALID)
        except PreflightRefused as exc:
            click.echo(f"refused: {exc}", err=True)
            sys.exit(EXIT_REFUSED)
        except SeedreamError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_ERROR)
        for message in started.messages:
            click.echo(f"note: {message}", err=True)
        for line in [*started.schemas, *started.prices]:
            click.echo(line)
        est = started.estimate
        click.echo(
            f"run {started.run_id}: {started.jobs:,} jobs enqueued, estimated ${micros_to_usd(est.total_micros)}"
            + (f" ({est.reused_jobs:,} reuse edits stored already)" if est.reused_jobs else "")
            + (f" (skipped {started.result.invalid_rows} invalid rows)" if started.result.invalid_rows else "")
        )
        if not wait:
            return
        runs = Runs(config)
        progress = _follow(runs, started.run_id)
        summary = runs.final_summary(started.run_id)
        click.echo(f"report: {summary['report']}")
        click.echo(f"gallery: {summary['gallery']}")
        if local is not None:  # the workers about to stop still owe the report and the webhook
            runs.wait_wrapped_up(started.run_id, notify=bool(opts.notify_url or config.notify_url))
        sys.exit(_exit_code(progress))
    finally:
        if local is not None:
            local.stop()


@contextlib.contextmanager
def _click_errors() -> Iterator[None]:
    """The project's errors become a one-line CLI error, not a traceback."""
    try:
        yield
    except SeedreamError as exc:
        raise click.ClickException(str(exc)) from None


def _runs() -> Runs:
    with _click_errors():
        return Runs(options.worker_settings())


@click.command("status")
@click.argument("run_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: counts, cost, rate, ETA.")
def status_command(run_id: str | None, as_json: bool) -> None:
    """Counts by status, cost so far, rate and ETA of RUN_ID (default: the run started last)."""
    from jobs.run_list import latest

    runs = _runs()
    with _click_errors():
        if run_id is None:
            run_id = latest(runs)
            if run_id is None:
                raise ConfigError(f"no run is known to {runs.where}")
            if not as_json:
                click.echo(f"run {run_id} (the latest)")
        p = runs.progress(run_id)
    click.echo(json.dumps(p.to_json(), indent=2) if as_json else progress_view.line(p))


@click.command("runs")
@click.option("--output", default=None, help="Also list the runs whose folders are under this output.")
@s3_endpoint_option
@click.option("--json", "as_json", is_flag=True, help="One JSON array of runs.")
def runs_command(output: str | None, s3_endpoint: str | None, as_json: bool) -> None:
    """The runs Redis knows (and with --output, those in storage): id, started, state, done/total,
    cost, budget and output, oldest first."""
    from jobs.run_list import COLUMNS, listing, table

    runs = _runs()
    with _click_errors():
        rows = listing(runs, output, s3_endpoint)
    if as_json:
        fields = (*COLUMNS, "finished", "total", "created_at")
        click.echo(json.dumps([{k: r[k] for k in fields} for r in rows], indent=2))
    elif rows:
        click.echo(table(rows))
    else:
        click.echo(f"no runs in {runs.where}" + (f" or under {output}" if output else ""))


@click.command("watch")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per update (status --json's fields).")
def watch_command(run_id: str, as_json: bool) -> None:
    """Follow RUN_ID until it ends: a live bar on a terminal, a line every few seconds otherwise."""
    runs = _runs()
    with _click_errors():
        p = _follow(runs, run_id, as_json=as_json)
    sys.exit(_exit_code(p))


@click.command("cancel")
@click.argument("run_id")
def cancel_command(run_id: str) -> None:
    """Stop new submits of RUN_ID; paid predictions are still fetched and stored; the rest are skipped."""
    with _click_errors():
        reason = _runs().cancel(run_id)
    click.echo(f"run {run_id}: halted ({reason}); jobs already submitted will still be fetched")


@click.command("retry-failed")
@click.argument("run_id")
@click.option("--pay-again", is_flag=True, help="Also resubmit jobs the service billed without giving outputs.")
def retry_failed_command(run_id: str, pay_again: bool) -> None:
    """Run the failed jobs of RUN_ID again. A paid result is fetched again, not resubmitted; a job
    billed without outputs is resubmitted (and paid for again) only with --pay-again."""
    runs = _runs()
    with _click_errors():
        admit = _admitter(runs.settings, runs.meta(run_id).queue or _queue())
        n, held = Recovery(runs).retry_failed(run_id, admit, pay_again=pay_again)
    click.echo(f"run {run_id}: {n} failed jobs enqueued again")
    if held:
        click.echo(f"{held} failed jobs were billed by the service; --pay-again resubmits them (and pays again)")


@click.command("resume")
@click.argument("run_id")
@click.option("--output", default=None, help="Where the run's records are (needed when Redis lost the run).")
@click.option(
    "--manifest",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The manifest, if it moved since the run started (its digest must match).",
)
@s3_endpoint_option
@click.option("--force", is_flag=True, help="Resume even though workers seem to drive the run still.")
@click.option(
    "--clear-halt", is_flag=True, help="After a top-up or a new key: lift the halt and run the jobs it skipped."
)
@click.option("--wait/--no-wait", default=None, help="Follow the run to its end (default: on a terminal).")
def resume_command(
    run_id: str,
    output: str | None,
    manifest: Path | None,
    s3_endpoint: str | None,
    force: bool,
    clear_halt: bool,
    wait: bool | None,
) -> None:
    """Continue RUN_ID from Redis, or from its durable records alone; nothing is resubmitted.
    Jobs that hold a prediction id without a verdict (overdue) are polled again."""
    runs = _runs()
    with _click_errors():
        admit = _admitter(runs.settings, _queue())
        source, n = Recovery(runs).resume(
            run_id, output, admit, manifest=manifest, s3_endpoint=s3_endpoint, force=force
        )
        click.echo(f"run {run_id}: resumed from {source}; {n} jobs enqueued")
        if clear_halt:
            lifted, again = Recovery(runs).clear_halt(run_id, admit)
            what = "; ".join(lifted) if lifted else "no halt was set"
            click.echo(f"run {run_id}: halt lifted ({what}); {again} skipped jobs enqueued again")
    if wait if wait is not None else sys.stdout.isatty():
        with _click_errors():
            p = _follow(runs, run_id)
        sys.exit(_exit_code(p))


@click.command("reconcile")
@click.argument("run_id")
@click.option("--output", default=None, help="Read the run's records here when Redis no longer knows the run.")
@s3_endpoint_option
@click.option("--json", "as_json", is_flag=True, help="Print what was polled again and both ledgers as JSON.")
def reconcile_command(run_id: str, output: str | None, s3_endpoint: str | None, as_json: bool) -> None:
    """Poll again every job of RUN_ID that holds a prediction id without a verdict (overdue), so
    workers fetch and store what arrived and settle its real cost once; then print the run's
    ledger beside the service's (/public/v1/model-costs, /model-usage): predictions and dollars
    per model per UTC day, and each difference. Exit 0 when they agree, 3 when they differ,
    1 when the service's ledger could not be read."""
    import time

    from jobs.ledger import build, render_text, run_records
    from workers.atlas import AtlasClient

    runs = _runs()
    with _click_errors():
        meta = runs.store.run_meta(run_id)
        polled: int | None = None
        if meta is not None:
            polled = Recovery(runs).reconcile(run_id, _admitter(runs.settings, meta.queue or _queue()))
        source, records, created_at = run_records(runs.store, run_id, output, s3_endpoint)
        atlas = runs.settings.atlas
        with AtlasClient(atlas.with_(api_base=(meta.api_base if meta else "") or atlas.api_base)) as client:
            ledger = build(
                run_id, source, records, client, atlas.api_key.shown_as, created_at=created_at, now=time.time()
            )
    if as_json:
        click.echo(json.dumps({"run_id": run_id, "polled_again": polled, "ledger": ledger.to_json()}, indent=2))
    else:
        if polled is None:
            click.echo(
                f"run {run_id}: not known to Redis, nothing polled again (`resume {run_id} --output` restores it)"
            )
        else:
            click.echo(f"run {run_id}: {polled} jobs with a prediction id and no verdict are polled again")
        click.echo(render_text(ledger))
    sys.exit(EXIT_ERROR if ledger.service_error else EXIT_OK if ledger.agree else EXIT_PARTIAL)


def _seconds(text: str) -> int:
    """'3600', '90m', '12h' or '7d' as seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    number, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
    try:
        seconds = int(float(number) * unit)
    except ValueError:
        raise click.BadParameter(f"{text!r}: use seconds or a number with s, m, h or d") from None
    if not 60 <= seconds <= MAX_PRESIGN_SECONDS:
        raise click.BadParameter("links can work from 1 minute to 7 days (S3's limit)")
    return seconds


@click.command("report")
@click.argument("run_id")
@click.option("--output", default=None, help="Rebuild from the records under this output when Redis lost the run.")
@s3_endpoint_option
@click.option(
    "--presign",
    is_flag=True,
    help="Also write report-presigned.html, whose links work without credentials for --expires (s3:// only).",
)
@click.option("--expires", default="7d", show_default=True, help="How long presigned links work: 3600, 90m, 12h, 7d.")
def report_command(run_id: str, output: str | None, s3_endpoint: str | None, presign: bool, expires: str) -> None:
    """Write report.csv, report.html (the gallery) and summary.json of RUN_ID now (also done when the run ends)."""
    seconds = _seconds(expires) if presign else None
    with _click_errors():
        runs = _runs()
        if runs.store.run_meta(run_id) is None and output:
            summary = report_from_storage(output, run_id, s3_endpoint, presign_seconds=seconds)
        else:
            summary = runs.report(run_id, presign_seconds=seconds)
    click.echo(json.dumps(summary, indent=2))


@click.command("worker")
@click.option(
    "--concurrency", type=int, default=None, help="Threads (the stages wait on I/O; default: 2 x submit rate, 8 to 64)."
)
@click.option(
    "--role",
    type=click.Choice(["all", "control", "fetch"]),
    default="all",
    show_default=True,
    help="control: submits and polls (SEEDREAM_QUEUE); fetch: downloads and storage writes (SEEDREAM_FETCH_QUEUE).",
)
@click.option("--queues", default=None, help="Comma-separated queues to consume, instead of --role.")
@click.option("--name", default="seedream@%h", show_default=True, help="Worker name (for Flower, logs).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None, help="Log lines as text or JSON.")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port (0: off).")
def worker_command(
    concurrency: int | None,
    role: str,
    queues: str | None,
    name: str,
    loglevel: str,
    log_format: str | None,
    metrics_port: int | None,
) -> None:
    """Run a Celery worker for seedream jobs (thread pool; task events while Flower watches).
    SIGTERM is a warm stop: running steps finish, nothing waiting is lost. Start it with jemalloc
    preloaded (LD_PRELOAD, docs/DEPLOY.md), or its memory creeps up with every job."""
    # The worker runs in this process, on the settings installed here (with these flags): its
    # Celery config, logging and metrics are derived from them when it starts.
    try:
        given = install(options.settings().with_flags(log_format=log_format, metrics_port=metrics_port))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    from workers.celery import app
    from workers.local import worker_args

    queue, fetch = given.queue, given.fetch_queue
    if role == "fetch" and not fetch and not queues:
        raise click.UsageError("--role fetch needs SEEDREAM_FETCH_QUEUE (or fetch_queue in the config file)")
    by_role = {"control": [queue], "fetch": [fetch], "all": [queue, fetch]}[role]
    chosen = queues or ",".join(q for q in dict.fromkeys(by_role) if q)
    quiet = given.log_format == "json"
    if concurrency is None:
        with _click_errors():
            concurrency = Limits.from_settings(given).threads()
    args = worker_args(concurrency=concurrency, queue=chosen, name=name, loglevel=loglevel, quiet=quiet)
    app.worker_main(args)


COMMANDS = [
    run_command,
    status_command,
    runs_command,
    watch_command,
    cancel_command,
    retry_failed_command,
    resume_command,
    reconcile_command,
    report_command,
    worker_command,
]
