"""Worker processes started for one run on this machine (`run --workers N`), and stopped after it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping


def worker_args(*, concurrency: int, queue: str, name: str, loglevel: str = "WARNING") -> list[str]:
    """Celery worker options this project runs with (threads: the stages wait on I/O; events for Flower)."""
    return [
        "worker",
        "--pool",
        "threads",
        "--concurrency",
        str(concurrency),
        "-Q",
        queue,
        "-n",
        name,
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
        "-E",
    ]


def worker_command(*, concurrency: int, queue: str, name: str, loglevel: str = "WARNING") -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers",
        *worker_args(concurrency=concurrency, queue=queue, name=name, loglevel=loglevel),
    ]


class LocalWorkers:
    def __init__(
        self,
        count: int,
        *,
        concurrency: int,
        queue: str,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
    ) -> None:
        self.count, self.concurrency, self.queue = count, concurrency, queue
        self.env = dict(os.environ if env is None else env)
        self.log_path = log_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> LocalWorkers:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        for i in range(self.count):
            cmd = worker_command(
                concurrency=self.concurrency,
                queue=self.queue,
                name=f"seedream-{os.getpid()}-{id(self) % 100000}-{i}@%h",
            )
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT))
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM lets running tasks finish), then SIGKILL what is left."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def __enter__(self) -> LocalWorkers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
