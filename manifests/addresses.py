"""Whether a host is this machine or its private network, in every spelling a resolver reads.

An input URL is fetched by the service and an output URL by a worker: neither may be made
to reach loopback, a private network or a cloud's metadata endpoint. `ipaddress` reads only
the canonical forms, but the C resolver (and so every connect) also reads the ones inet_aton
does: 127.1, 2130706433, 0x7f.1, 0177.0.0.1. No name is looked up here (validation has no
network, and a name is not an address): callers that connect look names up themselves.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
LOCAL_SUFFIXES = (".localhost", ".internal")  # RFC 6761; metadata.google.internal and the like


def normal_host(host: str) -> str:
    """The host as a resolver sees it: no brackets, no final dot, lower case, and IDNA's
    reading of other scripts' dots and digits (httpx sends 127。0。0。1 as 127.0.0.1)."""
    h = host.strip().strip("[]").rstrip(".").lower()
    if not h.isascii():
        with contextlib.suppress(UnicodeError):
            h = h.encode("idna").decode("ascii")
    return h


def literal_address(host: str) -> Address | None:
    """The address the host spells, if it spells one."""
    h = normal_host(host)
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        pass
    if ":" in h or not h.isascii():
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(h))
    except (OSError, ValueError):
        return None


def is_internal_address(ip: Address) -> bool:
    """Anything but a public unicast address: Alibaba's metadata service lives in 100.64/10
    (shared, not private), and an IPv4-mapped IPv6 address connects to its IPv4 one."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.is_site_local:
            return True
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
    )


@functools.lru_cache(maxsize=4096)
def is_internal_host(host: str) -> bool:
    """Local names count without a lookup: every resolver answers them with loopback. Cached:
    a manifest of a million rows names a few hosts."""
    h = normal_host(host)
    if h in LOCAL_NAMES or h.endswith(LOCAL_SUFFIXES):
        return True
    ip = literal_address(h)
    return ip is not None and is_internal_address(ip)
