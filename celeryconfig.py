"""Celery settings, read from the environment (the Redis broker carries the task queue).

Why these values: tasks are acknowledged after they run (a killed worker's task is
redelivered, and the job state machine makes that harmless); one task prefetched at
a time so a slow job never hides others; the visibility timeout outlives any
countdown (60 s at most) plus a task's longest run, or Redis would redeliver tasks still
waiting (harmless, the job token stops a duplicate, but wasted work).
"""

from __future__ import annotations

import os

from jobs.settings import apply_file

apply_file(os.environ)  # seedream-batch.toml, under the environment, for `celery -A workers worker` too

broker_url = os.environ.get("SEEDREAM_BROKER_URL") or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
result_backend = None
task_ignore_result = True
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# A killed worker's unacked messages (running or held for a countdown) come back after the
# visibility timeout; the sweep that restores them runs every `unacked_restore_interval` s.
broker_transport_options = {
    "visibility_timeout": int(os.environ.get("SEEDREAM_VISIBILITY_TIMEOUT", "300")),
    "unacked_restore_interval": int(os.environ.get("SEEDREAM_RESTORE_INTERVAL", "5")),
    "unacked_restore_throttle": 1,
}
broker_connection_retry_on_startup = True
task_serializer = "json"
accept_content = ["json"]
# Task events cost about 7% of a worker's CPU per job (three publishes per message). Flower
# turns them on in every worker it finds (its `enable_events`, every 5 s), so they are sent
# while someone watches; SEEDREAM_TASK_EVENTS=1 sends them always (another event consumer).
worker_send_task_events = os.environ.get("SEEDREAM_TASK_EVENTS", "0") == "1"
task_send_sent_event = False  # one extra publish per task at enqueue: half its cost
worker_hijack_root_logger = False
task_default_queue = os.environ.get("SEEDREAM_QUEUE", "seedream")
broker_connection_timeout = 5
