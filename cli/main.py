"""The `seedream-batch` command line: parse, build config, call a function. Nothing else."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from cli import checks, runs
from cli.inputs import inputs_options, warn_uploads
from cli.manifest import manifest_command
from cli.options import FromSettings, settings
from cli.reuse import known_edits, reuse_options
from jobs.catalogue import Catalogue, Prices, Schemas
from jobs.config import AtlasConfig, Limits
from jobs.environment import given, install
from jobs.estimate import Estimate, render_text
from jobs.exit_codes import document
from jobs.logs import configure
from jobs.s3check import checked_scan, s3_header
from jobs.settings import FILE_NAME, SETTINGS, Layers
from manifests.errors import ConfigError, StorageError
from manifests.models import ModelTable, usd_to_micros
from manifests.validate import Result, Validator
from sandbox.command import sandbox_command

EXIT_INVALID = 2


def _setting_options(fn: Any) -> Any:
    """One global option per setting (jobs/settings.py), so every setting has a flag."""
    for s in reversed(SETTINGS):
        if s.name == "api_key":
            kind: Any = click.Path(exists=True, dir_okay=False)
            text = "A file holding the API key (never the key itself on a command line)."
        else:
            kind = click.Choice(s.choices) if s.choices else s.kind
            text = f"{s.help[0].upper()}{s.help[1:]} [{s.env}]."
        metavar = "PATH" if s.name == "api_key" else s.kind.__name__.upper()
        fn = click.option(s.flag, f"set_{s.name}", type=kind, default=None, help=text, metavar=metavar)(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="seedream-batch")
@click.option("--config", "config_path", default=None, help=f"A TOML file of settings (default: ./{FILE_NAME}).")
@_setting_options
@click.pass_context
def main(ctx: click.Context, config_path: str | None, **flags: Any) -> None:
    """Run manifests of Seedream image edits on Atlas Cloud: validated, budgeted, resumable.

    Every setting comes from a flag, the environment or the TOML file, in that order of
    precedence; `seedream-batch config` shows the result.
    """
    values = {name.removeprefix("set_"): v for name, v in flags.items() if v is not None}
    if "api_key" in values:
        values["api_key"] = Path(values["api_key"]).read_text(encoding="utf-8").strip()
    try:
        layers = given(config=config_path, flags=values)  # the file and the flags are checked here
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        settings = layers.parse()  # and the environment's values here
    except ConfigError:
        # A variable's value is bad: `config` still shows it, so that it can be found, and any
        # other command refuses it where it first needs its settings (cli/options.py), with that
        # command's own exit code.
        ctx.obj = layers
        return
    # The one object this command line runs with: its subcommands read it from the context, and
    # the Celery app, the in-process worker included, derives its config from it (celeryconfig.py).
    ctx.obj = install(settings)
    configure(settings.log_format, settings.log_level or "WARNING", secrets=settings.secrets())


@main.command("config")
@click.option("--json", "as_json", is_flag=True, help="Print the settings as JSON.")
@click.pass_context
def config_command(ctx: click.Context, as_json: bool) -> None:
    """Print every setting's value now (secrets masked) and where it came from."""
    given = ctx.find_root().obj
    if isinstance(given, Layers):  # a variable's value is bad (`main`): shown, and named
        try:
            given.parse()
        except ConfigError as exc:
            click.echo(f"warning: {exc}; every other command refuses it", err=True)
    rows = given.rows() if isinstance(given, Layers) else settings(ctx).rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in ("setting", "value", "source")}
    click.echo("  ".join(k.ljust(w) for k, w in widths.items()) + "  env / flag")
    for r in rows:
        click.echo("  ".join(r[k].ljust(w) for k, w in widths.items()) + f"  {r['env']} / {r['flag']}")


main.add_command(sandbox_command)

manifest_arg = click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
model_opt = click.option("--model", default=None, help="Model for rows without one (default: seedream-v4 edit).")
format_opt = click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    default=None,
    help="Manifest format (default: from the extension).",
)
output_opt = click.option(
    "--output", default=None, help="Where the run would write (s3:// stages local inputs there); default: a folder."
)
models_file_opt = click.option(
    "--models-file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    cls=FromSettings,
    setting="models_file",
    help="JSON file overriding the model table.",
)


@dataclass
class _Checked:
    """A manifest's validator, with the live prices and the service's schemas it checks with."""

    validator: Validator
    prices: Prices
    schemas: Schemas
    catalogue: Catalogue


@contextlib.contextmanager
def _validator(manifest: Path, model: str | None, fmt: str | None, models_file: str | None) -> Iterator[_Checked]:
    """One `/models` read for the command; schemas are read while rows are checked."""
    from workers.atlas import catalogue_client

    try:
        table = ModelTable.load(models_file, default=model)
        config = AtlasConfig.from_settings(settings())
    except (ConfigError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    with catalogue_client(config) as client:
        catalogue = Catalogue.read(client)
        prices = Prices.resolve(table, catalogue)
        schemas = Schemas(catalogue, client.schema)
        allow = settings().allow_internal_urls
        try:
            validator = Validator(
                manifest, prices.table, fmt=fmt, model=model, allow_internal_urls=allow, schemas=schemas
            )
        except (ConfigError, ValueError) as exc:
            raise click.UsageError(str(exc)) from None
        if catalogue.error:
            why = f"/models could not be read ({catalogue.error})"
            click.echo(f"note: {why}; prices and rules from the project's own table", err=True)
        yield _Checked(validator, prices, schemas, catalogue)


def _checked_scan(validator: Validator, **kwargs: Any) -> tuple[Result, Estimate, list[str]]:
    try:
        endpoint = settings().s3_endpoint or None
        return checked_scan(validator, lambda: s3_header(endpoint), **kwargs)
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None


def _print_problems(result: Result) -> None:
    for line in result.lines():
        click.echo(line, err=True)


@main.command()
@manifest_arg
@model_opt
@format_opt
@models_file_opt
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@output_opt
@inputs_options
def validate(
    manifest: Path,
    model: str | None,
    fmt: str | None,
    models_file: str | None,
    as_json: bool,
    output: str | None,
    inputs: str,
    inputs_bucket: str | None,
    allow_bulk_upload: bool,
) -> None:
    """Check every row of MANIFEST (nothing is spent); name each problem's line and field.
    Rows are checked against the service's own schema of their model too, where it can be read,
    and each s3:// input with a HEAD (it exists, at most 10 MB)."""
    with _validator(manifest, model, fmt, models_file) as checked:
        result, _, _ = _checked_scan(checked.validator)
    warn_uploads(checked.validator, output, inputs, inputs_bucket, allow_bulk_upload)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": result.ok,
                    "jobs": result.jobs,
                    "invalid_rows": result.invalid_rows,
                    "by_model": dict(result.by_model),
                    "more_problems": result.more_problems,
                    "problems": [p.__dict__ for p in result.problems],
                    "schemas": {
                        m: {"service_schema": r is None, "unavailable": r} for m, r in checked.schemas.used().items()
                    },
                },
                indent=2,
            )
        )
        sys.exit(0 if result.ok else EXIT_INVALID)
    for line in checked.schemas.lines():
        click.echo(line)
    if result.ok:
        click.echo(f"{result.jobs:,} jobs OK")
    else:
        _print_problems(result)
        count = len(result.problems) + result.more_problems
        click.echo(f"{manifest}: {count:,} problems; {result.jobs:,} rows are valid; nothing was run", err=True)
    sys.exit(0 if result.ok else EXIT_INVALID)


@main.command("estimate")
@manifest_arg
@model_opt
@format_opt
@models_file_opt
@click.option("--budget", default=None, help="Budget in USD: how many jobs fit.")
@click.option("--rate", type=float, default=None, help="Submits per second (default: SEEDREAM_SUBMIT_RATE).")
@click.option("--skip-invalid", is_flag=True, help="Estimate the valid rows even if some are invalid.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
@output_opt
@inputs_options
@reuse_options
def estimate_command(
    manifest: Path,
    model: str | None,
    fmt: str | None,
    models_file: str | None,
    budget: str | None,
    rate: float | None,
    skip_invalid: bool,
    as_json: bool,
    output: str | None,
    inputs: str,
    inputs_bucket: str | None,
    allow_bulk_upload: bool,
    reuse: bool,
    reuse_from: tuple[str, ...],
) -> None:
    """Cost (exact, per model) and the least time MANIFEST needs, before anything is spent. With
    --output, the rows whose edit is already stored there are counted apart: they cost nothing."""
    try:
        budget_micros = usd_to_micros(budget) if budget is not None else None
        limits = Limits.from_settings(settings(), submit_rate=rate)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    with _validator(manifest, model, fmt, models_file) as checked:
        known = known_edits(output, reuse, reuse_from)
        result, est, _ = _checked_scan(
            checked.validator, budget_micros=budget_micros, rate=limits.submit_rate, known=known
        )
    est.price_sources = checked.prices.to_dict(est.by_model)
    warn_uploads(checked.validator, output, inputs, inputs_bucket, allow_bulk_upload)
    if not result.ok:
        _print_problems(result)
        if not skip_invalid:
            click.echo(f"{manifest}: {result.invalid_rows:,} invalid rows; fix them or pass --skip-invalid", err=True)
            sys.exit(EXIT_INVALID)
    if as_json:
        click.echo(json.dumps(est.to_dict(), indent=2))
        return
    click.echo(render_text(est))
    for line in checked.prices.lines(est.by_model):
        click.echo(line)


for _command in [manifest_command, *runs.COMMANDS, *checks.COMMANDS]:
    main.add_command(_command)
document(main)
