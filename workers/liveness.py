"""A worker that cannot work any more exits, so that its supervisor starts a fresh one.

Celery's Redis transport can fail to reconnect after the broker restarts (the consumer's
cleanup of the lost connection raises, the worker stops, or its event loop never turns
again: kombu #582, celery #9250). A worker in that state holds no jobs a fresh worker
could not redo, because every task is acknowledged late and the job state machine never
submits twice. So the cure is crash-only: a thread watches the consumer's event loop and
ends the process when the loop has not turned for SEEDREAM_LIVENESS seconds (or when a
stop has taken longer than that); `run --workers`, systemd or a Procfile runner restarts it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from celery import bootsteps

log = logging.getLogger("seedream.liveness")

EXIT_CODE = 70  # EX_SOFTWARE: the supervisor restarts on any exit it did not ask for


class Watch:
    """Last sign of life of the event loop, and the thread that acts when it is too old."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.last = time.monotonic()
        self.stopping_since: float | None = None
        self._thread: threading.Thread | None = None

    def tick(self) -> None:
        self.last = time.monotonic()

    def stopping(self) -> None:
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()

    def verdict(self, now: float) -> str | None:
        """Why this process should end now, or None."""
        if self.stopping_since is not None:
            if now - self.stopping_since > self.limit:
                return f"stopping for more than {self.limit:.0f}s"
            return None
        if now - self.last > self.limit:
            return f"event loop has not turned for {now - self.last:.0f}s"
        return None

    def start(self) -> None:
        if self._thread is not None or self.limit <= 0:
            return

        def loop() -> None:
            while True:
                time.sleep(min(1.0, self.limit / 4))
                reason = self.verdict(time.monotonic())
                if reason:
                    log.critical("worker is stuck (%s); exiting so that a fresh one takes over", reason)
                    logging.shutdown()
                    os._exit(EXIT_CODE)

        self._thread = threading.Thread(target=loop, name="seedream-liveness", daemon=True)
        self._thread.start()


# The limit is the worker's `liveness` setting, set as the worker starts (workers/lifecycle.py),
# before the consumer's first start: nothing here is read at import.
WATCH = Watch(60.0)


class LivenessStep(bootsteps.StartStopStep):
    """Consumer bootstep: every (re)start of the consumer hooks the watch into its event loop."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        if c.hub is not None:
            WATCH.tick()
            c.hub.on_tick.add(WATCH.tick)
            WATCH.start()

    def shutdown(self, c: Any) -> None:
        WATCH.stopping()
