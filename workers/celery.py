"""The Celery app: `celery -A workers worker` finds it here."""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_ready

app = Celery("seedream_batch", include=["workers.tasks"])
app.config_from_object("celeryconfig")


@worker_ready.connect
def _start_reaper(**_: object) -> None:
    """Every worker runs the watchdog; a Redis lock lets one sweep at a time."""
    from workers.context import get_context
    from workers.reaper import start_thread

    start_thread(get_context())
