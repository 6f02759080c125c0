"""Small helpers shared by tests: images made on the fly, waiting on a condition."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from PIL import Image

T = TypeVar("T")


def image_bytes(
    width: int = 64, height: int = 48, fmt: str = "PNG", color: tuple[int, int, int] = (20, 120, 200)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format=fmt)
    return buf.getvalue()


def wait_for(condition: Callable[[], T], timeout: float = 20.0, interval: float = 0.02, what: str = "condition") -> T:
    """Poll `condition` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def moto_server(host: str) -> Iterator[str]:
    """moto's S3 in server mode on `host`, a free port; yields the endpoint URL."""
    import httpx

    from sandbox.server import free_port

    port = free_port(host)
    cmd = [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://{host}:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/moto-api/", timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=30, what="moto server")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
