"""Worker processes started for one run on this machine (`run --workers N`), and stopped after it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping

from jobs.environment import process_settings, variables
from jobs.settings import Settings, resolve

log = logging.getLogger("seedream.workers")


def worker_args(
    *, concurrency: int, queue: str, name: str, loglevel: str = "WARNING", quiet: bool = False
) -> list[str]:
    """Celery worker options this project runs with (threads: the stages wait on I/O; task events
    are off unless SEEDREAM_TASK_EVENTS=1 or Flower turns them on; `quiet`: no banner, when every
    line must be JSON; it is Celery's global option, so it comes before the subcommand)."""
    return [
        *(["--quiet"] if quiet else []),
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
    ]


# Where Debian and its derivatives put jemalloc (libjemalloc2; a dependency of redis-server).
JEMALLOC = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)


def with_allocator(env: Mapping[str, str], allocator: str = "jemalloc") -> dict[str, str]:
    """The environment for a worker process, with jemalloc preloaded when the system has it and
    the `allocator` setting is not `glibc`. Under glibc's malloc two workers' RSS together creeps
    up by about 0.4 KB per job they run and is not given back (their threads fragment glibc's
    arenas); under jemalloc it stays flat (docs/BENCHMARKS.md)."""
    out = dict(env)
    if allocator == "glibc":
        return out
    lib = next((p for p in JEMALLOC if os.path.exists(p)), None)
    if lib and lib not in out.get("LD_PRELOAD", ""):
        out["LD_PRELOAD"] = " ".join(x for x in (lib, out.get("LD_PRELOAD", "")) if x)
    return out


def worker_command(
    *, concurrency: int, queue: str, name: str, loglevel: str = "WARNING", quiet: bool = False
) -> list[str]:
    """`celery -A workers worker` with this project's options."""
    args = worker_args(concurrency=concurrency, queue=queue, name=name, loglevel=loglevel, quiet=quiet)
    return [sys.executable, "-m", "celery", "-A", "workers", *args]


class LocalWorkers:
    """N worker processes; with `restart`, one that exits unasked is started again (crash-only:
    see workers/liveness.py), after a pause that grows while it keeps dying at once.

    Each is given this process's settings in its environment (`settings`, else those of `env`,
    else the process's own), so it resolves the very values the command resolved, its flags and
    file included; `env` is the rest of the environment it starts from (PATH, credentials)."""

    def __init__(
        self,
        count: int,
        *,
        concurrency: int,
        queue: str,
        settings: Settings | None = None,
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
        loglevel: str = "WARNING",
        restart: bool = False,
        name: str = "",
    ) -> None:
        self.count, self.concurrency, self.queue, self.loglevel = count, concurrency, queue, loglevel
        if settings is None:
            settings = process_settings() if env is None else resolve(env, read_config=False)
        self.settings = settings
        self.env = {**(variables() if env is None else env), **settings.environment()}
        self.log_path = log_path
        self.restart = restart
        self.name = name
        self.procs: list[subprocess.Popen[bytes]] = []
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        cmd = worker_command(
            concurrency=self.concurrency,
            queue=self.queue,
            name=f"{self.name}-{i}@%h" if self.name else f"seedream-{os.getpid()}-{id(self) % 100000}-{i}@%h",
            loglevel=self.loglevel,
            quiet=self.settings.log_format == "json",
        )
        env = with_allocator(self.env, self.settings.allocator)
        base = self.settings.metrics_port
        if base:  # one port each: SEEDREAM_METRICS_PORT, +1, +2, ...
            env["SEEDREAM_METRICS_PORT"] = str(base + i)
        if not self.log_path:
            return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        with open(self.log_path, "ab") as out:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

    def start(self) -> LocalWorkers:
        with self._lock:
            self.procs = [self._spawn(i) for i in range(self.count)]
        if self.restart:
            self._supervisor = threading.Thread(target=self._supervise, name="seedream-supervisor", daemon=True)
            self._supervisor.start()
        return self

    def _supervise(self) -> None:
        pause = [1.0] * self.count
        started = [time.monotonic()] * self.count
        while not self._stopping.wait(0.5):
            for i in range(self.count):
                with self._lock:
                    if self._stopping.is_set() or self.procs[i].poll() is None:
                        continue
                    code = self.procs[i].returncode
                    # a worker that ran a while earns a quick restart; one that dies at once waits longer
                    pause[i] = 1.0 if time.monotonic() - started[i] > 60 else min(30.0, pause[i] * 2)
                log.warning("worker %d exited (code %s); starting a new one in %.0fs", i, code, pause[i])
                if self._stopping.wait(pause[i]):
                    return
                with self._lock:
                    if self._stopping.is_set():
                        return
                    self.procs[i] = self._spawn(i)
                    started[i] = time.monotonic()
                    self.restarts += 1

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM lets running tasks finish), then SIGKILL what is left."""
        self._stopping.set()
        with self._lock:
            procs = list(self.procs)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)

    def __enter__(self) -> LocalWorkers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
