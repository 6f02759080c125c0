"""Which URLs the service may point us at: an output URL is untrusted input.

A compromised or buggy answer must not make a worker fetch from inside its own
network (cloud metadata, Redis, admin panels). Only http(s) is allowed, and
loopback, private, link-local and reserved addresses are refused, in every
spelling the resolver reads, unless they are the configured service's own host
(the local sandbox lives on 127.0.0.1). A name is looked up, and refused when any
of its addresses is internal: a public name may point at 127.0.0.1. httpx looks
it up again to connect, so a name whose answer changes in between (DNS
rebinding) is not caught here.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

from manifests.addresses import is_internal_address, is_internal_host, literal_address, normal_host
from manifests.errors import BadOutput

RESOLVE_SECONDS = 2.0

Resolve = Callable[[str, int], list[str]]


def resolve_host(host: str, port: int, *, timeout: float = RESOLVE_SECONDS) -> list[str]:
    """Every address of `host`, or none when the lookup fails or is slow: the connection then
    fails the same way, as a transient fault that is retried, so a resolver's hiccup never
    costs a paid output. getaddrinfo has no timeout of its own, hence the thread."""
    found: list[str] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return
        found.extend(str(info[4][0]) for info in infos)

    worker = threading.Thread(target=lookup, name="resolve-output-host", daemon=True)
    worker.start()
    worker.join(timeout)
    return [] if worker.is_alive() else found


def check_fetchable(url: str, *, trusted_hosts: frozenset[str], resolve: Resolve = resolve_host) -> str:
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
    if is_internal_host(host):
        raise BadOutput(f"output URL points at an internal address ({host}); not fetched")
    if literal_address(host) is None:
        for address in resolve(normal_host(host), port or (443 if parts.scheme == "https" else 80)):
            try:
                internal = is_internal_address(ipaddress.ip_address(address))
            except ValueError:
                continue
            if internal:
                raise BadOutput(f"output URL host {host} resolves to an internal address ({address}); not fetched")
    return url
