"""Typed settings, built from the one resolved `Settings` object (jobs/settings.py) and passed down.

Every value has a safe default; the API key is a `Secret` that never prints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit

from jobs.redisio import DEFAULT_PREFIX
from jobs.retry import Backoff
from jobs.secret import Secret
from jobs.settings import Settings, resolve
from manifests.errors import ConfigError

DEFAULT_API_BASE = "https://api.atlascloud.ai/api/v1"


def _version() -> str:
    try:
        return metadata.version("seedream-batch")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0"


# The service sits behind Cloudflare, which refuses a library's default User-Agent (error 1010):
# the client names itself honestly instead.
DEFAULT_USER_AGENT = f"seedream-batch/{_version()}"
READY_MIN, READY_MAX = 32, 256  # submits ready to go beyond the in-flight slots (`admission_window`)
# Predictions in flight are learned from the service (workers/slots.py); this only stops a service
# that never pushes back from letting a run's window grow without end.
IN_FLIGHT_CEILING = 1000


@dataclass(frozen=True)
class Timeouts:
    """Seconds for each phase of every HTTP call: nothing waits forever."""

    connect: float = 5.0
    read: float = 30.0  # a status GET can take ~25 s on the service
    write: float = 30.0
    pool: float = 10.0


@dataclass(frozen=True)
class AtlasConfig:
    """Where the service is, how to authenticate, and how patient to be with it."""

    api_key: Secret = field(default_factory=lambda: Secret(""))
    api_base: str = DEFAULT_API_BASE
    balance_url: str = ""
    user_agent: str = DEFAULT_USER_AGENT
    timeouts: Timeouts = field(default_factory=Timeouts)
    read_retry: Backoff = field(default_factory=Backoff)
    max_output_bytes: int = 64 * 1024 * 1024
    max_redirects: int = 5

    def __post_init__(self) -> None:
        if isinstance(self.api_key, str):
            object.__setattr__(self, "api_key", Secret(self.api_key))
        parts = urlsplit(self.api_base)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"ATLASCLOUD_API_BASE must be an http(s) URL, got {self.api_base!r}")
        object.__setattr__(self, "api_base", self.api_base.rstrip("/"))
        if not self.user_agent.strip() or any(c in self.user_agent for c in "\r\n"):
            raise ConfigError(f"SEEDREAM_USER_AGENT must be one line of text, got {self.user_agent!r}")
        if not self.balance_url:
            object.__setattr__(self, "balance_url", f"{parts.scheme}://{parts.netloc}/public/v1/balance")

    @property
    def api_host(self) -> str:
        return urlsplit(self.api_base).netloc

    def with_(self, **changes: Any) -> AtlasConfig:
        return replace(self, **changes)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> AtlasConfig:
        values: dict[str, Any] = {
            "api_key": settings.api_key,
            "api_base": settings.api_base,
            "balance_url": settings.balance_url,
            "user_agent": settings.user_agent or DEFAULT_USER_AGENT,
            "max_output_bytes": int(settings.max_output_mb * 1024 * 1024),
        }
        if settings.given("http_timeout"):  # unset, each phase keeps its own default
            t = settings.http_timeout
            values["timeouts"] = Timeouts(connect=min(t, 10.0), read=t, write=t, pool=t)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> AtlasConfig:
        """From these variables alone (no file): tests and tools that build one by hand."""
        return cls.from_settings(resolve(env, read_config=False), **overrides)


@dataclass(frozen=True)
class Limits:
    """The service's limits for one API key, shared by every worker (safe defaults)."""

    submit_rate: float = 2.0  # submits per second
    submit_burst: int = 1
    poll_rate: float = 20.0
    upload_rate: float = 5.0
    max_in_flight: int = 0  # a ceiling on predictions in flight; 0: as many as the service takes
    slot_lease_seconds: float = 120.0
    # Plan this share under each rate: requests reach the service with some jitter, and with a
    # small burst allowance a request that arrives early is a 429, which pauses every worker
    # for its Retry-After (a second: R lost submits). A few percent under R absorbs the jitter.
    headroom: float = 0.03
    window: int = 0  # jobs of a run with a task message out at once (jobs/backlog.py); 0: automatic

    def planned_rate(self, rate: float) -> float:
        return rate * (1.0 - self.headroom)

    @property
    def in_flight_ceiling(self) -> int:
        return self.max_in_flight or IN_FLIGHT_CEILING

    def admission_window(self, slots: int) -> int:
        """Enough jobs let in to fill every in-flight slot there is now (`slots`, learned from the
        service), plus about two seconds of submits ready to go, plus an eighth for the jobs
        fetching their outputs (out of the slots, still in the window). The window must never bind
        before the slots: the slots grow only while they are all taken. More only deepens the
        queue: a job's next poll waits behind every message ahead of it, predictions look longer
        than they are and hold their slots, and the jobs let in beyond the slots spin on "no slot
        yet" (5,000 zero-delay jobs with 1,000 slots took 86 s with a window of 64, and 116 s with
        one of 2,032, with 10-second stretches at 14 jobs/s). The submits ready to go stop at
        READY_MAX: a rate set far above what the workers can send (10,000/s: "no limit") let a
        whole 20,000-job run in, and once its slots filled, 19,000 jobs spinning on them buried
        the polls that free slots (6.6 jobs/s instead of ~47)."""
        return self.window or slots + self.admission_ready + max(8, slots // 8)

    def threads(self, workers: int = 1) -> int:
        """Threads per worker process, when the user names none. A prediction in flight holds no
        thread (it waits as a countdown message), so threads follow the rate, not the slots: a
        submit holds one until its booked send time (at most a second) and through its POST, a
        finished job through its download and storage write (a second or two from the service's
        CDN): about 2 thread-seconds a job, 2 x the submit rate in all, 8 to 64 per process."""
        return max(8, min(64, math.ceil(2 * self.submit_rate / max(1, workers))))

    @property
    def admission_ready(self) -> int:
        """Of the window, the jobs let in and not yet submitted. Sized by the slots alone, the
        window lets in the slots' worth of jobs that wait for their turn to submit whenever the
        predictions do not fill the slots (at 20/s with 2 s predictions and 256 slots, by
        arithmetic some 230 jobs queued up to 11 s ahead of their turn), and each of them comes
        back with a message of its own before its turn: 3.5 messages per job where 2.3 do the work."""
        return min(READY_MAX, max(READY_MIN, math.ceil(2 * self.submit_rate)))

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> Limits:
        """From these variables alone (no file): tests and tools that build one by hand."""
        return cls.from_settings(resolve(env, read_config=False), **overrides)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> Limits:
        values: dict[str, Any] = {
            "submit_rate": settings.submit_rate,
            "submit_burst": settings.submit_burst,
            "poll_rate": settings.poll_rate,
            "upload_rate": settings.upload_rate,
            "max_in_flight": settings.max_in_flight,
            "slot_lease_seconds": settings.slot_lease,
            "headroom": settings.rate_headroom,
            "window": settings.window,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        limits = cls(**values)
        for attr in ("submit_rate", "poll_rate", "upload_rate", "slot_lease_seconds"):
            if getattr(limits, attr) <= 0:
                raise ConfigError(f"{attr} must be positive")
        if not 0.0 <= limits.headroom <= 0.5:
            raise ConfigError("headroom must be between 0 and 0.5")
        if limits.window < 0:
            raise ConfigError("window must be 0 (automatic) or more")
        if limits.submit_burst < 1:
            raise ConfigError("submit_burst must be at least 1")
        if limits.max_in_flight < 0:
            raise ConfigError("max_in_flight must be 0 (as many as the service takes) or more")
        return limits


@dataclass(frozen=True)
class WorkerSettings:
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # may hold a password
    prefix: str = DEFAULT_PREFIX
    atlas: AtlasConfig = field(default_factory=AtlasConfig)
    limits: Limits = field(default_factory=Limits)
    s3_endpoint: str | None = None
    poll_deadline: float = 900.0  # the service's own client gives up after about 10 minutes
    max_attempts: int = 8  # transient failures before submit or a step gives up
    max_fetch_attempts: int = 40  # a paid output is fetched patiently
    max_store_attempts: int = 400  # storage down for a while must not lose a paid result
    warmup_grace: float = 30.0  # a 400/404 this soon after a submit is the service warming up
    visibility_timeout: float = 300.0  # the broker redelivers a message held longer than this
    id_hold: float = 20.0  # how long a worker retries Redis to record a prediction id only it holds
    input_link_ttl: int = 3600  # a presigned input link outlives a prediction and its retries
    restore_interval: float = 5.0  # seconds between the broker's sweeps that bring such messages back
    step_lease: float = 180.0  # a step ends well within this; past it, the watchdog may take the job over
    notify_url: str = field(default="", repr=False)  # the webhook of runs that name none (a secret)
    notify_attempts: int = 5
    broker_url: str = field(default="", repr=False)  # the Celery broker, if not redis_url (a secret)
    models_file: str = ""  # a JSON file overriding the model table (a run may name its own)
    allow_internal_urls: bool = False  # input URLs at internal addresses pass validation

    @property
    def longest_countdown(self) -> float:
        """No message waits longer than this: past the visibility timeout the broker would deliver
        a second copy of it while the first still waits. Longer waits are taken in hops."""
        return max(1.0, self.visibility_timeout / 2)

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerSettings:
        return cls(
            redis_url=settings.redis_url,
            prefix=settings.prefix,
            atlas=AtlasConfig.from_settings(settings, read_retry=Backoff(attempts=2, initial=0.2, maximum=1.0)),
            limits=Limits.from_settings(settings),
            s3_endpoint=settings.s3_endpoint or None,
            poll_deadline=settings.poll_deadline,
            warmup_grace=settings.warmup_grace,
            visibility_timeout=settings.visibility_timeout,
            restore_interval=settings.restore_interval,
            step_lease=settings.step_lease,
            input_link_ttl=_link_ttl(settings.input_link_ttl),
            notify_url=settings.notify_url,
            notify_attempts=max(1, settings.notify_attempts),
            broker_url=settings.broker_url,
            models_file=settings.models_file,
            allow_internal_urls=settings.allow_internal_urls,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerSettings:
        """From these variables alone (no file): tests and tools that build one by hand."""
        return cls.from_settings(resolve(env, read_config=False))


def _link_ttl(seconds: int) -> int:
    if not 60 <= seconds <= 7 * 86400:  # SigV4 links work at most 7 days
        raise ConfigError("SEEDREAM_INPUT_LINK_TTL must be 60 seconds to 7 days")
    return seconds
