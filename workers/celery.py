"""The Celery app: `celery -A workers worker` finds it here."""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_ready, worker_shutting_down

from workers.liveness import WATCH, LivenessStep

app = Celery("seedream_batch", include=["workers.tasks"])
app.config_from_object("celeryconfig")
app.steps["consumer"].add(LivenessStep)


@worker_shutting_down.connect
def _stopping(**_: object) -> None:
    """A stop that hangs (seen after a lost broker connection) ends after the liveness limit."""
    WATCH.stopping()


@worker_ready.connect
def _start_reaper(**_: object) -> None:
    """Every worker runs the watchdog; a Redis lock lets one sweep at a time."""
    from workers.context import get_context
    from workers.reaper import start_thread

    start_thread(get_context())
