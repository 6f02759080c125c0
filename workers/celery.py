"""What `celery -A workers worker` finds: the app, with its tasks and the worker's lifecycle
hooks registered on it."""

from __future__ import annotations

from workers import lifecycle, tasks
from workers.celery_app import app

__all__ = ["app", "lifecycle", "tasks"]
