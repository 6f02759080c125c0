"""Telling someone a run ended: the summary, POSTed as JSON to the run's webhook.

The URL is the user's own (a chat hook, a CI trigger), so it is trusted as an address, but
it may carry a token: it is never logged, stored in run.json or shown unmasked. Failures
become NotifyError here; the task retries, and a webhook that never answers changes nothing
about the run.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import httpx

from manifests.errors import NotifyError

TIMEOUT = httpx.Timeout(10.0, connect=5.0)


def post(url: str, summary: dict[str, Any], *, timeout: httpx.Timeout = TIMEOUT) -> int:
    """POST the summary; the HTTP status on a 2xx, NotifyError otherwise."""
    body = json.dumps({"event": "run.finished", **summary}, default=str).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "seedream-batch",
        "X-Seedream-Run": str(summary.get("run_id") or ""),
        "X-Seedream-Outcome": str(summary.get("outcome") or ""),
    }
    where = urlsplit(url).netloc.rsplit("@", 1)[-1] or "the webhook"
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=timeout, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise NotifyError(f"{where}: {type(exc).__name__}") from None
    if not 200 <= response.status_code < 300:
        raise NotifyError(f"{where} answered HTTP {response.status_code}")
    return response.status_code
