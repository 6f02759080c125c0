"""Celery's settings, derived from the project's one settings object (the Redis broker carries
the task queue). The Celery app applies them lazily (`app.add_defaults`), when it first needs
its config: by then the command line has installed the settings it resolved, and a worker
started as `celery -A workers worker` resolves its own (seedream-batch.toml under the
environment), so both see the same values as the rest of their process.

Why these values: tasks are acknowledged after they run (a killed worker's task is
redelivered, and the job state machine makes that harmless); one task prefetched at
a time so a slow job never hides others; the visibility timeout outlives any
countdown (60 s at most) plus a task's longest run, or Redis would redeliver tasks still
waiting (harmless, the job token stops a duplicate, but wasted work).
"""

from __future__ import annotations

from typing import Any

from jobs.settings import Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery's config for a process running with `settings`."""
    return {
        "broker_url": settings.broker_url or settings.redis_url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # A killed worker's unacked messages (running or held for a countdown) come back after the
        # visibility timeout; the sweep that restores them runs every `unacked_restore_interval` s.
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": settings.restore_interval,
            "unacked_restore_throttle": 1,
        },
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        # Task events cost about 7% of a worker's CPU per job (three publishes per message). Flower
        # turns them on in every worker it finds (its `enable_events`, every 5 s), so they are sent
        # while someone watches; SEEDREAM_TASK_EVENTS=1 sends them always (another event consumer).
        "worker_send_task_events": settings.task_events == 1,
        "task_send_sent_event": False,  # one extra publish per task at enqueue: half its cost
        "worker_hijack_root_logger": False,
        "task_default_queue": settings.queue,
        "broker_connection_timeout": 5,
    }
