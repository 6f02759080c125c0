"""Every Redis key the project writes, spelled once.

The strings are a contract: workers of an older version running beside newer ones, and Lua
scripts that build a job's key from a head (jobs/backlog.py), read them as they are. Changing a
spelling strands whatever Redis holds under the old one, so keys are added, never renamed
(tests/test_keys.py pins each one).

A run's keys all start with `<prefix>:run:<run id>`, except its jobs' records, which start with
`<prefix>:job:<run id>:`; the run's own record is the one key under `<prefix>:run:` with no
further `:`, which is how `run_ids` tells runs from their other keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class RunKeys:
    """The keys of one run under one prefix."""

    prefix: str
    run_id: str

    @property
    def run(self) -> str:
        """Hash: the run's record (its settings, prices, budget scope...), JSON per field."""
        return f"{self.prefix}:run:{self.run_id}"

    def job(self, job_id: str) -> str:
        """Hash: one job's record. With an empty `job_id`, the head Lua scripts append ids to."""
        return f"{self.prefix}:job:{self.run_id}:{job_id}"

    @property
    def counts(self) -> str:
        """Hash: the run's counters (jobs per final state, cost, polls, retries...)."""
        return f"{self.run}:counts"

    @property
    def jobs(self) -> str:
        """List: the run's job ids in manifest order."""
        return f"{self.run}:jobs"

    @property
    def backlog(self) -> str:
        """List: jobs waiting to be let into the task queue (jobs/backlog.py)."""
        return f"{self.run}:backlog"

    @property
    def due(self) -> str:
        """Sorted set: job -> when its next task message should have run (host clock)."""
        return f"{self.run}:due"

    @property
    def ready(self) -> str:
        """Set: jobs let in and not yet submitted (the window's ready part, jobs/backlog.py)."""
        return f"{self.run}:ready"

    @property
    def finalized(self) -> str:
        """Set once the run's end was handed to the report writer (see maybe_finalize in workers/dispatch.py)."""
        return f"{self.run}:finalized"

    @property
    def halt(self) -> str:
        """String: absent, or the reason every worker stops submitting for the run."""
        return f"{self.run}:halt"

    @property
    def resuming(self) -> str:
        """String: held by the one `resume` of the run under way."""
        return f"{self.run}:resuming"

    def upload(self, sha: str) -> str:
        """An input's upload (or staging) claim and URL, per content hash (workers/uploads.py)."""
        return f"{self.run}:upload:{sha}"

    def poll_times(self, model: str) -> str:
        """What the run learnt of a model's prediction times (workers/polling.py)."""
        return f"{self.run}:ptimes:{model}"


def run_head(prefix: str) -> str:
    """What every run's keys start with; `run_ids` reads the runs back from a scan of it."""
    return f"{prefix}:run:"


def run_ids(prefix: str, keys: Iterable[str]) -> set[str]:
    """The runs whose own records are among `keys` (a scan of `run_head`): a run's other keys
    have a further ':' after its id."""
    head = run_head(prefix)
    return {k[len(head) :] for k in keys if k.startswith(head) and ":" not in k[len(head) :]}


def active_runs(prefix: str) -> str:
    """Set: the runs the watchdog watches."""
    return f"{prefix}:runs:active"


def edit_claim(prefix: str, root: str, fingerprint: str) -> str:
    """The claim on making one edit for an output root (jobs/claims.py)."""
    return f"{prefix}:edit:{root}:{fingerprint}"


def budget(prefix: str, scope: str) -> list[str]:
    """A budget scope's hash, its reservations and its settlements (jobs/budget.py), in the
    order its Lua scripts take them."""
    base = f"{prefix}:budget:{scope}"
    return [base, f"{base}:reserved", f"{base}:settled"]


def slots(prefix: str, key_id: str) -> str:
    """The in-flight slots of one API key (workers/slots.py); its other keys add a suffix."""
    return f"{prefix}:slots:{key_id}"


def rate(prefix: str, key_id: str) -> str:
    """The rate limiter's keys of one API key start so (workers/ratelimit.py)."""
    return f"{prefix}:rate:{key_id}"


def reaper_lock(prefix: str) -> str:
    """String: held by the one watchdog sweep under way."""
    return f"{prefix}:reaper:lock"
