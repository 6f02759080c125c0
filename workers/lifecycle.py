"""A worker process's life: its logging, its name, the watchdog thread and the metrics endpoint
at start, the liveness limit at stop (Celery signals)."""

from __future__ import annotations

import logging

from celery.apps import worker as celery_worker
from celery.signals import celeryd_init, setup_logging, worker_ready, worker_shutting_down

from jobs.environment import process_settings
from jobs.logs import configure, name_worker
from workers.context import get_context
from workers.liveness import WATCH
from workers.metrics import serve
from workers.reaper import start_thread

log = logging.getLogger("seedream.worker")


@setup_logging.connect
def _logging(loglevel: object = None, **_: object) -> None:
    """Our handler instead of Celery's: text or JSON (SEEDREAM_LOG_FORMAT), run and job ids on
    every line, secrets redacted. Celery's own lines go through it too."""
    settings = process_settings()
    level = settings.log_level or (loglevel if isinstance(loglevel, str | int) else "INFO")
    configure(settings.log_format, level, secrets=settings.secrets())


@celeryd_init.connect
def _name(sender: object = None, options: dict[str, object] | None = None, **_: object) -> None:
    """Log lines name the worker (its -n name), so lines from many hosts can be told apart. The
    format is set here too: Celery warns (e.g. about running as root) before `setup_logging`.
    The liveness limit is set here, before the consumer first starts its watch."""
    if sender:
        name_worker(str(sender))
    WATCH.limit = process_settings().liveness  # 0 turns the watch off
    _logging((options or {}).get("loglevel"))


@worker_shutting_down.connect
def _stopping(sender: object = None, how: object = None, **_: object) -> None:
    """A stop that hangs (seen after a lost broker connection) ends after the liveness limit."""
    log.warning("worker %s: %s shutdown", sender, how, extra={"event": "worker_stopping"})
    WATCH.stopping()


@worker_ready.connect
def _start(sender: object = None, **_: object) -> None:
    """Every worker runs the watchdog (a Redis lock lets one sweep at a time), and serves its
    metrics when SEEDREAM_METRICS_PORT is set. With JSON logs, Celery's SIGTERM handler is put
    back without its plain-text "Warm shutdown" banner (the stop is logged, as JSON, above)."""
    controller = getattr(sender, "controller", None)
    settings = process_settings()
    if controller is not None and settings.log_format == "json":
        celery_worker.install_worker_term_handler(controller, verbose=False)

    ctx = get_context()
    start_thread(ctx)
    port = settings.metrics_port
    if port:
        try:
            serve(ctx, port, settings.metrics_host or "127.0.0.1")
        except OSError as exc:  # a port in use must not stop the worker from working
            log.error("metrics endpoint not started on port %d: %s", port, exc)
