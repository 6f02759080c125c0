"""`seedream-batch manifest`: a folder or an S3 prefix of photos and one prompt become a manifest
that `validate` and `run` take, so the commonest catalogue job needs no spreadsheet first."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from cli.options import s3_endpoint_option
from jobs.exit_codes import ERROR, INVALID
from manifests.errors import SeedreamError
from manifests.from_source import Join, TemplateError, build, render, scan_folder, scan_s3, write_atomically
from manifests.reader import detect_format


@click.command("manifest")
@click.argument("source")
@click.option(
    "--prompt",
    required=True,
    help="The prompt of every row; may use {stem}, {name}, {parent} and the columns of --join, "
    'e.g. "{name} on white marble".',
)
@click.option("--model", default=None, help="The model column of every row (default: the run's default model).")
@click.option("--size", default=None, metavar="WxH", help="The size column of every row, e.g. 2048x2048.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here: .csv or .jsonl (default: CSV on stdout, images as absolute paths).")  # fmt: skip
@click.option("--join", "join_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A CSV of more columns keyed by id (its 'id' column, else its first), e.g. SKU, name.")  # fmt: skip
@click.option("--skip-invalid", is_flag=True, help="Leave out the files that cannot be used, and list them.")
@s3_endpoint_option
def manifest_command(
    source: str,
    prompt: str,
    model: str | None,
    size: str | None,
    out: Path | None,
    join_path: Path | None,
    skip_invalid: bool,
    s3_endpoint: str | None,
) -> None:
    """One manifest row per image under SOURCE (a folder, searched recursively, or s3://bucket/prefix),
    in path order, each with an id from its file name that stays the same on every run."""
    try:
        fmt = detect_format(out) if out else "csv"
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if size is not None:
        m = re.fullmatch(r"\s*(\d{1,6})\s*[*xX]\s*(\d{1,6})\s*", size)
        if not m:
            raise click.BadParameter(f"{size!r} is not WxH (e.g. 2048x2048)", param_hint="--size")
        size = f"{m.group(1)}*{m.group(2)}"
    try:
        if source.startswith("s3://"):
            found = scan_s3(source, s3_endpoint)
        elif Path(source).is_dir():
            found = scan_folder(Path(source), out)
        else:
            raise click.BadParameter(f"{source!r} is neither a folder nor s3://bucket/prefix", param_hint="SOURCE")
        join = Join.read(join_path) if join_path else None
        built = build(found, prompt, join=join, model=model, size=size, fmt=fmt)
    except TemplateError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(INVALID)
    except SeedreamError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ERROR)
    for note in built.notes:
        click.echo(f"note: {note}", err=True)
    for rel, why in built.invalid:
        click.echo(f"{rel}: {why}", err=True)
    if built.invalid and not skip_invalid:
        click.echo(
            f"{source}: {len(built.invalid):,} files cannot be used; nothing was written "
            "(--skip-invalid leaves them out)",
            err=True,
        )
        sys.exit(INVALID)
    if not built.rows:
        click.echo(f"{source}: no usable images; nothing was written", err=True)
        sys.exit(INVALID)
    text = render(built.rows, fmt)
    if out is None:
        click.echo(text, nl=False)
    else:
        write_atomically(out, text)
    left = f", {len(built.invalid):,} files left out" if built.invalid else ""
    click.echo(f"{len(built.rows):,} rows{left}" + (f"; wrote {out}" if out else ""), err=True)
