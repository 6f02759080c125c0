"""Run-wide stops that every worker obeys before its next submit: payment refused, cancel."""

from __future__ import annotations

import redis

from jobs.redisio import DEFAULT_PREFIX, translated

PAYMENT = "payment_required"
CANCELLED = "cancelled"


class RunControl:
    def __init__(self, client: redis.Redis, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix

    def _key(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:halt"

    @translated
    def halt(self, run_id: str, reason: str) -> str:
        """Stop new submits of the run; the first reason given is kept and returned."""
        self.client.set(self._key(run_id), reason, nx=True)
        return str(self.client.get(self._key(run_id)))

    @translated
    def halted(self, run_id: str) -> str | None:
        value = self.client.get(self._key(run_id))
        return None if value is None else str(value)

    @translated
    def resume(self, run_id: str) -> None:
        self.client.delete(self._key(run_id))
