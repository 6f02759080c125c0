"""The process's environment is read here and nowhere else.

A setting's value then cannot depend on when a module was imported or on which module looked:
each process resolves its settings once (`load`), from these variables, the TOML file and its
flags, and passes the result down. The command line installs the object it built
(`install`), so that Celery's config and the worker it may run in-process use that very
object; a process started without the command line (`celery -A workers worker`) builds its own
on first use (`process_settings`). `tests/test_environment.py` keeps every other module off
`os.environ`; only the launcher of worker subprocesses hands an environment on.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

from jobs.settings import Settings, resolve

_lock = threading.Lock()
_settings: Settings | None = None


def variables() -> dict[str, str]:
    """A copy of this process's environment (a worker subprocess starts from it)."""
    return dict(os.environ)


def load(config: str | None = None, flags: Mapping[str, Any] | None = None) -> Settings:
    """This process's settings: default < file < environment < flags."""
    return resolve(variables(), config=config, flags=flags)


def install(settings: Settings) -> Settings:
    """Make `settings` the ones this process runs with (the command line, once it resolved them)."""
    global _settings
    with _lock:
        _settings = settings
    return settings


def process_settings() -> Settings:
    """The settings this process runs with: those installed, else resolved now, once."""
    global _settings
    with _lock:
        if _settings is None:
            _settings = load()
        return _settings
