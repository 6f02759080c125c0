"""The one way in to Redis: connections with timeouts, and redis errors turned into StateError."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import redis
import redis.exceptions

from manifests.errors import StateError

P = ParamSpec("P")
T = TypeVar("T")
DEFAULT_PREFIX = "seedream"


def connect(url: str, *, timeout: float = 5.0) -> redis.Redis:
    """A client that never waits forever and hands back text, not bytes."""
    try:
        return redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
            decode_responses=True,
            retry_on_timeout=False,
        )
    except (ValueError, redis.exceptions.RedisError) as exc:
        raise StateError(f"cannot use Redis at {_safe_url(url)}: {exc}") from None


def translated(fn: Callable[P, T]) -> Callable[P, T]:
    """Run `fn`, raising StateError for any redis failure (timeouts, refused, script errors)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except redis.exceptions.RedisError as exc:
            raise StateError(f"Redis failed in {fn.__qualname__}: {type(exc).__name__}: {exc}") from None

    return wrapper


def script(client: redis.Redis, source: str) -> Any:
    """A Lua script, sent by SHA after the first call (EVALSHA with a reload on NOSCRIPT)."""
    return client.register_script(source)


def where(client: redis.Redis) -> str:
    """Which Redis a client talks to, as host:port/db: enough to find it, never a password."""
    kwargs = client.connection_pool.connection_kwargs
    place = f"unix:{kwargs['path']}" if kwargs.get("path") else f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
    return f"{place}/{kwargs.get('db', 0)}"


def looked_in(client: redis.Redis, prefix: str) -> str:
    """Where runs were looked for, for a message that says so."""
    return f"Redis {where(client)} (key prefix {prefix!r})"


def _safe_url(url: str) -> str:
    """A Redis URL may carry a password: never print it."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
