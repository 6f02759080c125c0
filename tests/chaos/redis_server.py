"""A Redis server of a test's own (append-only file on), which the test may stop and start."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import redis

from sandbox.server import free_port
from tests.helpers import wait_for


class RedisServer:
    def __init__(self, folder: Path, bind: str = "127.0.0.1") -> None:
        self.folder, self.port, self.bind = folder, free_port(bind), bind
        self.proc: subprocess.Popen[bytes] | None = None
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed; `make test` needs it for this scenario")

    @property
    def url(self) -> str:
        return f"redis://{self.bind}:{self.port}/0"

    def start(self) -> RedisServer:
        cmd = [
            "redis-server", "--port", str(self.port), "--bind", self.bind, "--protected-mode", "no",
            "--dir", str(self.folder),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.answers, timeout=20, what=f"redis on port {self.port}")
        return self

    def answers(self) -> bool:
        try:
            client = redis.Redis(host=self.bind, port=self.port, socket_timeout=1, socket_connect_timeout=1)
            return bool(client.ping())
        except redis.exceptions.RedisError:
            return False

    def stop(self) -> None:
        """SIGTERM: Redis writes out its append-only file and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.proc = None
