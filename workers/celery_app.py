"""The Celery app alone: tasks, the watchdog and the CLI send messages through it, and
`workers.celery` (what `celery -A workers worker` finds) adds the tasks and the worker's
lifecycle hooks on top."""

from __future__ import annotations

from celery import Celery

from workers.liveness import LivenessStep

app = Celery("seedream_batch", include=["workers.tasks"])
app.config_from_object("celeryconfig")
app.steps["consumer"].add(LivenessStep)
