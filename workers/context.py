"""Everything a worker process needs, built once from its settings and shared by its threads."""

from __future__ import annotations

import threading
from typing import Any

import redis

from jobs.backlog import Backlog
from jobs.budget import Budget
from jobs.claims import Claims
from jobs.config import WorkerSettings
from jobs.control import RunControl
from jobs.environment import process_settings
from jobs.records import RunRecord
from jobs.redisio import connect
from jobs.results import ResultsIndex
from jobs.storage import Storage, open_output, open_storage
from jobs.store import RunStore
from manifests.errors import StateError
from manifests.s3 import s3_client
from workers.atlas import AtlasClient
from workers.polling import PollTimes
from workers.ratelimit import RateLimiter
from workers.slots import Slots
from workers.uploads import UploadCache


class Context:
    """Connections and per-run helpers, created lazily and cached (thread-safe)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.redis: redis.Redis = connect(settings.redis_url)
        self.runs = RunStore(self.redis, prefix=settings.prefix)
        self.control = RunControl(self.redis, prefix=settings.prefix)
        key_id = settings.atlas.api_key.fingerprint()
        self.polls = PollTimes(self.redis, settings.prefix)
        self.uploads = UploadCache(self.redis, settings.prefix)
        self.backlog = Backlog(self.redis, self.runs)
        self.claims = Claims(self.redis, prefix=settings.prefix)
        self.limiter = RateLimiter(self.redis, key_id, settings.limits, prefix=settings.prefix)
        self.slots = Slots(
            self.redis,
            key_id,
            settings.limits.in_flight_ceiling,
            settings.limits.slot_lease_seconds,
            prefix=settings.prefix,
        )
        self._lock = threading.Lock()
        self._clients: dict[str, AtlasClient] = {}
        self._storages: dict[str, Storage] = {}
        self._budgets: dict[str, Budget] = {}
        self._meta: dict[str, RunRecord] = {}
        self._s3: Any = None

    def meta(self, run_id: str) -> RunRecord:
        """The run's record, read once per process: what a run started with does not change."""
        with self._lock:
            if run_id in self._meta:
                return self._meta[run_id]
        meta = self.runs.run_meta(run_id)
        if meta is None:
            raise StateError(f"run {run_id} is not known to Redis (resume it from storage)")
        with self._lock:
            self._meta[run_id] = meta
        return meta

    def client(self, api_base: str) -> AtlasClient:
        with self._lock:
            if api_base not in self._clients:
                self._clients[api_base] = AtlasClient(self.settings.atlas.with_(api_base=api_base))
            return self._clients[api_base]

    def storage(self, run_id: str) -> Storage:
        """The run's own store. The run is read first (from Redis when this process has not seen
        it): a worker whose first message of a run is its finalize must write where the run
        writes, never to a folder made of an empty output under its working directory."""
        with self._lock:
            if run_id in self._storages:
                return self._storages[run_id]
        run = self.meta(run_id)
        # This host's own endpoint first: the name that reaches the bucket can differ per host
        # (a private endpoint, a local gateway); the submitting machine's is the fallback.
        endpoint = self.settings.s3_endpoint or run.s3_endpoint
        with self._lock:
            if run_id not in self._storages:
                self._storages[run_id] = open_storage(run.output, run_id, endpoint_url=endpoint)
            return self._storages[run_id]

    def root(self, root: str, run_id: str) -> Storage:
        """A store that is not a run's own: where local inputs are staged (`<output>/inputs/` or
        the inputs bucket), or an output whose results index the run reads."""
        key = f"root:{root}"
        with self._lock:
            if key in self._storages:
                return self._storages[key]
        endpoint = self.settings.s3_endpoint or self.meta(run_id).s3_endpoint
        with self._lock:
            if key not in self._storages:
                self._storages[key] = open_output(root, endpoint_url=endpoint)
            return self._storages[key]

    def indexes(self, run_id: str) -> list[ResultsIndex]:
        """The results indexes the run reads, its own output's first (jobs/results.py)."""
        return [ResultsIndex(self.root(uri, run_id)) for uri in self.meta(run_id).reuse_roots]

    def budget(self, scope: str) -> Budget:
        with self._lock:
            if scope not in self._budgets:
                self._budgets[scope] = Budget(self.redis, scope, prefix=self.settings.prefix)
            return self._budgets[scope]

    def s3(self) -> Any:
        with self._lock:
            if self._s3 is None:  # presigns the input links too, so SigV4 (manifests/s3.py)
                self._s3 = s3_client(self.settings.s3_endpoint)
            return self._s3


_context: Context | None = None
_context_lock = threading.Lock()


def get_context() -> Context:
    """The process's context, built on first use from the settings the process runs with
    (jobs/environment.py): those the command line installed, or resolved once here."""
    global _context
    with _context_lock:
        if _context is None:
            _context = Context(WorkerSettings.from_settings(process_settings()))
        return _context
