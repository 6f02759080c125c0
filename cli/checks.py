"""`doctor`: the checks before a first real run, as a command; thin: parse, build inputs, call jobs.doctor."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cli.options import FromSettings, s3_endpoint_option, worker_settings
from cli.runs import EXIT_ERROR, EXIT_OK, EXIT_REFUSED
from jobs.doctor import Inputs, diagnose
from manifests.errors import ConfigError


@click.command("doctor")
@click.argument("manifest", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--output", default=None, help="s3://bucket/prefix or a folder: a probe object is written, read, deleted."
)
@click.option(
    "--models-file", default=None, cls=FromSettings, setting="models_file", help="JSON overriding the model table."
)
@click.option("--api-base", default=None, cls=FromSettings, setting="api_base", help="The service's API base URL.")
@s3_endpoint_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with every check.")
def doctor_command(
    manifest: Path | None,
    output: str | None,
    models_file: str | None,
    api_base: str | None,
    s3_endpoint: str | None,
    as_json: bool,
) -> None:
    """Check, without spending a cent, what a first real run needs: Redis, the broker, the clock,
    the output, the manifest, the API key, the User-Agent, the models and their prices, the
    balance against the estimate. Exit 0 when nothing would break a run (warnings allowed),
    4 when a check failed, 1 when the settings themselves cannot be read."""
    from workers.atlas import AtlasClient

    try:
        settings = worker_settings(api_base)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    inputs = Inputs(
        redis_url=settings.redis_url,
        broker_url=settings.broker_url or settings.redis_url,
        output=output,
        s3_endpoint=s3_endpoint,
        manifest=manifest,
        models_file=models_file,
        has_key=bool(settings.atlas.api_key),
        allow_internal_urls=settings.allow_internal_urls,
    )
    report = diagnose(inputs, lambda: AtlasClient(settings.atlas))
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.render_text())
    sys.exit(EXIT_OK if report.ok else EXIT_REFUSED)


COMMANDS = [doctor_command]
