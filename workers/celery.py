"""The Celery app: `celery -A workers worker` finds it here."""

from __future__ import annotations

from celery import Celery

app = Celery("seedream_batch", include=["workers.tasks"])
app.config_from_object("celeryconfig")
