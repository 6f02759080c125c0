"""The Celery app alone: tasks, the watchdog and the CLI send messages through it, and
`workers.celery` (what `celery -A workers worker` finds) adds the tasks and the worker's
lifecycle hooks on top. Its config is derived from the process's settings when it is first
needed, not at import (celeryconfig.py)."""

from __future__ import annotations

from typing import Any

from celery import Celery

from celeryconfig import celery_config
from jobs.environment import process_settings
from workers.liveness import LivenessStep


def _config() -> dict[str, Any]:
    return celery_config(process_settings())


app = Celery("seedream_batch", include=["workers.tasks"])
app.add_defaults(_config)
app.steps["consumer"].add(LivenessStep)
