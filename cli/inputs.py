"""The options every command that reads a manifest shares about its inputs (jobs/inputs.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from cli.options import FromSettings, settings
from jobs.inputs import MODES, plan, upload_verdict
from manifests.errors import ConfigError
from manifests.validate import Validator


def inputs_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--allow-bulk-upload",
        is_flag=True,
        cls=FromSettings,
        setting="allow_bulk_upload",
        help="Send more files than SEEDREAM_BULK_UPLOAD_THRESHOLD through the service's uploadMedia anyway.",
    )(fn)
    fn = click.option(
        "--inputs-bucket",
        default=None,
        cls=FromSettings,
        setting="inputs_bucket",
        help="s3://bucket/prefix where local inputs are staged and sent as presigned links "
        "(default: <output>/inputs/ for an s3:// output).",
    )(fn)
    return click.option(
        "--inputs",
        type=click.Choice(MODES),
        default="auto",
        show_default=True,
        cls=FromSettings,
        setting="inputs",
        help="auto: presigned links from your bucket, uploadMedia only without one; "
        "presign: never upload; upload: every local and s3:// input through uploadMedia.",
    )(fn)


def bulk_upload_threshold() -> int:
    return settings().bulk_upload_threshold


def warn_uploads(validator: Validator, output: str | None, inputs: str, inputs_bucket: str | None, allow: bool) -> None:
    """`validate` and `estimate` say what `run` would refuse or warn about; they refuse nothing."""
    try:
        warning, _ = upload_verdict(
            plan(inputs, output, inputs_bucket),
            validator.local_files,
            validator.s3_objects,
            threshold=bulk_upload_threshold(),
            allow=allow,
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if warning:
        click.echo(f"warning: {warning}", err=True)
