"""Bounded retries with exponential backoff and full jitter, with an explicit predicate.

Only reads are retried here (polls, downloads, uploads); a submit never goes
through this module because a retried POST may create a second billable prediction.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from manifests.errors import RateLimited, is_transient

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """How many tries and how long to wait between them; `attempts=1` means no retry."""

    attempts: int = 4
    initial: float = 0.5
    maximum: float = 8.0
    multiplier: float = 2.0
    jitter: float = 1.0  # fraction of the delay drawn at random: 1.0 is "full jitter"

    def delay(self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed try number `attempt` (1-based); honours Retry-After."""
        base = min(self.maximum, self.initial * self.multiplier ** max(0, attempt - 1))
        r = (rng or random).random()
        wait = base * (1.0 - self.jitter) + base * self.jitter * r
        if retry_after is not None:
            wait = max(wait, retry_after)
        return wait


def backoff(attempt: int, base: float = 1.0, cap: float = 60.0) -> float:
    """The wait after the `attempt`-th failure (1-based) of anything the workers try again: a
    task's countdown, a webhook's retry, a short in-thread pause. Doubling from `base` up to
    `cap`, half of it drawn at random so the retries of many jobs spread out; one formula, so
    every retry's bounds are read here."""
    return Backoff(initial=base, maximum=cap, jitter=0.5).delay(attempt)


def call_with_retry(
    fn: Callable[[], T],
    policy: Backoff,
    *,
    retry_on: Callable[[BaseException], bool] = is_transient,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """Call `fn` until it succeeds, raises something `retry_on` rejects, or tries run out."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if attempt >= policy.attempts or not retry_on(exc):
                raise
            retry_after = exc.retry_after if isinstance(exc, RateLimited) else None
            wait = policy.delay(attempt, retry_after)
            if on_retry is not None:
                on_retry(attempt, exc, wait)
            sleep(wait)
