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

from jobs.settings import Layers, Settings, layer

_lock = threading.Lock()
_settings: Settings | None = None


def variables() -> dict[str, str]:
    """A copy of this process's environment (a worker subprocess starts from it)."""
    return dict(os.environ)


def given(config: str | None = None, flags: Mapping[str, Any] | None = None) -> Layers:
    """This process's settings as given, not yet parsed (`seedream-batch config` shows them
    even when one is bad): default < file < environment < flags."""
    return layer(variables(), config=config, flags=flags)


def load(config: str | None = None, flags: Mapping[str, Any] | None = None) -> Settings:
    """This process's settings: default < file < environment < flags, each parsed to its type."""
    return given(config, flags).parse()


def install(settings: Settings) -> Settings:
    """Make `settings` the ones this process runs with (the command line, once it resolved them).

    The command line passes its settings down as arguments everywhere it calls; this is for the
    two readers it does not call. Celery builds its app config lazily, when the app is first
    used (celeryconfig.py, `workers/celery_app.py`), and the worker a command runs in-process
    builds its context on its first task (`workers.context.get_context`): both take the settings
    installed here, so they see the command's flags and file too, rather than resolving their own
    from the environment alone."""
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
