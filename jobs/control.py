"""Run-wide stops that every worker obeys before its next submit: payment refused, cancel."""

from __future__ import annotations

import redis

from jobs.keys import RunKeys
from jobs.redisio import DEFAULT_PREFIX, translated
from manifests.errors import AgentRefused, AuthError

PAYMENT = "payment_required"
CANCELLED = "cancelled"
AGENT = "user_agent_refused"  # the service's CDN refuses the User-Agent: set SEEDREAM_USER_AGENT
AUTH = "auth"


def refused_by(exc: AuthError) -> str:
    """The halt an authentication refusal calls for: the key, or the User-Agent in front of it."""
    return AGENT if isinstance(exc, AgentRefused) else AUTH


class RunControl:
    def __init__(self, client: redis.Redis, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix

    def key(self, run_id: str) -> str:
        """The run's halt flag: absent, or the reason every worker stops submitting."""
        return RunKeys(self.prefix, run_id).halt

    @translated
    def halt(self, run_id: str, reason: str) -> str:
        """Stop new submits of the run; the first reason given is kept and returned."""
        self.client.set(self.key(run_id), reason, nx=True)
        return str(self.client.get(self.key(run_id)))

    @translated
    def halted(self, run_id: str) -> str | None:
        value = self.client.get(self.key(run_id))
        return None if value is None else str(value)

    @translated
    def resume(self, run_id: str) -> None:
        self.client.delete(self.key(run_id))
