"""Starting the sandbox: in the foreground (the CLI) or as a child process (tests, bench, demo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn

from sandbox.app import create_app
from sandbox.settings import SandboxSettings


def serve(host: str, port: int, settings: SandboxSettings) -> None:
    """Run until interrupted; one process, one event loop (uvloop and httptools when present)."""
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_keep_alive=30,
    )
    uvicorn.Server(config).run()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class SandboxProcess:
    """A sandbox in a child process, with helpers for its admin area."""

    host: str = "127.0.0.1"
    port: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.url}/api/v1"

    def start(self, timeout: float = 20.0) -> SandboxProcess:
        self.port = self.port or free_port(self.host)
        cmd = [
            sys.executable,
            "-m",
            "sandbox",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--settings-json",
            json.dumps(self.settings),
        ]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sandbox exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/_sandbox/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("sandbox did not answer in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        r = httpx.request(method, f"{self.url}/_sandbox/{path}", json=body, timeout=10.0)
        r.raise_for_status()
        return r.json()

    def configure(self, **settings: Any) -> Any:
        return self.admin("POST", "config", settings)

    def reset(self, **settings: Any) -> None:
        self.admin("POST", "reset", {"settings": settings} if settings else {})

    def accounting(self) -> dict[str, Any]:
        return dict(self.admin("GET", "accounting"))

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
