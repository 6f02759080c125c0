"""Small helpers shared by tests: images made on the fly, waiting on a condition."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
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
