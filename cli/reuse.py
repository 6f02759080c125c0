"""The options on reusing edits already stored (jobs/results.py), shared by `run` and `estimate`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from cli.options import settings
from jobs import results
from jobs.results import reuse_roots
from manifests.errors import StorageError


def reuse_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--reuse-from",
        "reuse_from",
        multiple=True,
        help="Also reuse edits stored under this other output (s3://bucket/prefix or a folder); repeatable.",
    )(fn)
    return click.option(
        "--reuse/--no-reuse",
        default=True,
        show_default=True,
        help="Copy a row's outputs from an identical edit already stored instead of paying for it again.",
    )(fn)


def known_edits(output: str | None, reuse: bool, reuse_from: tuple[str, ...]) -> set[str] | None:
    """The fingerprints stored under `output` and each `--reuse-from` (None: not looked for)."""
    if not reuse or not output:
        return None
    try:
        return results.known(reuse_roots(output, reuse_from), settings().s3_endpoint or None)
    except StorageError as exc:
        raise click.ClickException(f"the results stored under {output} cannot be listed: {exc}") from None
