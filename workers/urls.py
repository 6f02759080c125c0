"""Which URLs the service may point us at: an output URL is untrusted input.

A compromised or buggy answer must not make a worker fetch from inside its own
network (cloud metadata, Redis, admin panels). Only http(s) is allowed, and
loopback, private, link-local and reserved addresses are refused unless they are
the configured service's own host (the local sandbox lives on 127.0.0.1).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from jobs.errors import BadOutput

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def _is_internal(host: str) -> bool:
    h = host.strip("[]").lower().rstrip(".")
    if h in _LOCAL_NAMES or h.endswith(".localhost") or h.endswith(".internal"):
        return True
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return False
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast or ip.is_unspecified


def check_fetchable(url: str, *, trusted_hosts: frozenset[str]) -> str:
    """Return `url` when a worker may fetch it, else raise BadOutput saying why."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError as exc:
        raise BadOutput(f"output URL is malformed: {exc}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise BadOutput(f"output URL scheme {parts.scheme!r} is not fetched")
    netloc = f"{host}:{port}" if port else host
    if netloc in trusted_hosts or host in trusted_hosts:
        return url
    if _is_internal(host):
        raise BadOutput(f"output URL points at an internal address ({host}); not fetched")
    return url
