"""The settings of one command line: resolved once by the group (cli/main.py), then read here.

A subcommand's option that has a setting behind it (`--s3-endpoint`, `--models-file`, ...)
takes that setting as its default (`FromSettings`), so the file counts for it as it does
everywhere else, and click validates and converts the value as if it were typed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import click

from jobs.config import WorkerSettings
from jobs.settings import Layers, Settings


def settings(ctx: click.Context | None = None) -> Settings:
    """The settings the group resolved for this command line. When a variable's value is bad,
    the group kept what was given (for `config`), and the ConfigError naming it is raised here."""
    root = (ctx or click.get_current_context()).find_root()
    if isinstance(root.obj, Layers):
        return root.obj.parse()
    if not isinstance(root.obj, Settings):
        raise RuntimeError("no settings: the command was not run through the seedream-batch group")
    return root.obj


def worker_settings(api_base: str | None = None) -> WorkerSettings:
    """The typed settings a command works with, pointed at `api_base` when one is given."""
    s = WorkerSettings.from_settings(settings())
    if api_base:
        s = replace(s, atlas=s.atlas.with_(api_base=api_base))
    return s


class FromSettings(click.Option):
    """An option whose default is the setting `setting` when it was given (file or environment)."""

    def __init__(self, *args: Any, setting: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.setting = setting

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        obj = ctx.find_root().obj
        if isinstance(obj, Settings) and obj.given(self.setting):
            value = getattr(obj, self.setting)  # the one setting this option names, as its type
            if value != "":
                return value
        return super().get_default(ctx, call)


s3_endpoint_option = click.option(
    "--s3-endpoint", default=None, cls=FromSettings, setting="s3_endpoint", help="S3-compatible endpoint URL."
)
