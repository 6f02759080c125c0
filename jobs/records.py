"""Job and run records: the state machine's memory, in one shape for Redis, the durable
records and the reports.

A job moves `pending → submitting → submitted → fetching → succeeded`, or ends
`failed`, `skipped`, `uncertain` or `overdue`. Its state changes only by the atomic
transitions of jobs/transitions.py, made through the store (jobs/store.py).

`uncertain` means exactly: the POST left (`posted_at` was set by the message that held
the job's token) and no answer proves what happened. `overdue` is a job that holds a
prediction id but has no verdict yet (a poll deadline, or the service lost it): the run
ends with it counted at its reservation, and `resume`/`reconcile` poll it again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from manifests.spec import ImageRef, JobSpec


class JobState(StrEnum):
    """A job's state. A `StrEnum`, so what Redis, the Lua scripts, the durable records and the
    reports hold stays the plain lowercase word, and a state read back compares equal to it."""

    PENDING = "pending"
    SUBMITTING = "submitting"
    SUBMITTED = "submitted"
    FETCHING = "fetching"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    UNCERTAIN = "uncertain"
    OVERDUE = "overdue"

    @property
    def final(self) -> bool:
        return self in FINAL


# The short names stay importable: most modules speak of one or two states, not of the type.
PENDING, SUBMITTING, SUBMITTED, FETCHING = JobState.PENDING, JobState.SUBMITTING, JobState.SUBMITTED, JobState.FETCHING
SUCCEEDED, FAILED, SKIPPED, UNCERTAIN = JobState.SUCCEEDED, JobState.FAILED, JobState.SKIPPED, JobState.UNCERTAIN
OVERDUE = JobState.OVERDUE
STATES = tuple(JobState)
FINAL = STATES[STATES.index(SUCCEEDED) :]  # every state from `succeeded` on ends the job


@dataclass
class JobRecord:
    run_id: str
    id: str
    state: JobState
    spec: JobSpec
    token: str = ""
    prediction_id: str = ""
    input_urls: list[str] = field(default_factory=list)
    service_outputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    nsfw: list[bool] = field(default_factory=list)  # per service output: flagged by the service (may be blank)
    price_micros: int | None = None
    cost_micros: int = 0
    attempts: int = 0
    polls: int = 0
    error: str = ""
    reason: str = ""
    submitted_at: float | None = None
    finished_at: float | None = None
    created_at: float | None = None
    record_written: bool = False  # the final durable record is in storage
    charge: int = 1  # the ledger attempt: a retry that may be billed again is a new one
    prior_cost_micros: int = 0  # what earlier paid attempts cost (in the run's total already)
    history: list[dict[str, Any]] = field(default_factory=list)  # earlier attempts' endings, oldest first
    posted_at: float | None = None  # the POST of this attempt left (or was about to) at this time
    wake_at: float | None = None  # a wait longer than the broker holds: the job sleeps until then
    reuse_look: bool = False  # its edit may be in the results index already: read it before paying
    reused_from: str = ""  # "<run>/<job>" whose stored outputs this job copied instead of paying
    saved_micros: int = 0  # what the reused edit cost when it was made: not spent again

    @property
    def final(self) -> bool:
        return self.state in FINAL

    @property
    def total_cost_micros(self) -> int:
        """Every paid attempt of this job, summed: what the report shows."""
        return self.cost_micros + self.prior_cost_micros

    def ending(self) -> dict[str, Any]:
        """How this attempt ended, kept in `history` when the job runs again."""
        return {
            "attempt": self.charge,
            "state": self.state,
            "reason": self.reason,
            "error": self.error[:300],
            "prediction_id": self.prediction_id,
            "cost_micros": self.cost_micros,
            "finished_at": self.finished_at,
        }

    @property
    def settled(self) -> bool:
        """Final, and its durable record written: nothing more to do for this job."""
        return self.final and self.record_written

    def to_json(self) -> dict[str, Any]:
        """The durable record (records/<id>.json): everything to report and resume, no secrets."""
        return {
            "run_id": self.run_id,
            "id": self.id,
            "line": self.spec.line,
            "state": self.state,
            "model": self.spec.model,
            "prompt": self.spec.prompt,
            "size": self.spec.size,
            "images": [i.value for i in self.spec.images],
            "params": self.spec.params,
            "metadata": self.spec.metadata,
            "prediction_id": self.prediction_id,
            "service_outputs": self.service_outputs,
            "outputs": self.outputs,
            "nsfw": self.nsfw,
            "price_micros": self.price_micros,
            "cost_micros": self.cost_micros,
            "prior_cost_micros": self.prior_cost_micros,
            "charge": self.charge,
            "history": self.history,
            "attempts": self.attempts,
            "polls": self.polls,
            "error": self.error,
            "reason": self.reason,
            "created_at": self.created_at,
            "submitted_at": self.submitted_at,
            "posted_at": self.posted_at,
            "finished_at": self.finished_at,
            "fingerprint": self.spec.fingerprint,
            "reused_from": self.reused_from,
            "saved_micros": self.saved_micros,
        }

    @classmethod
    def from_redis(cls, run_id: str, job_id: str, raw: Mapping[str, str]) -> JobRecord:
        """From the job's hash as HGETALL returns it."""

        def js(name: str, default: Any) -> Any:
            value = raw.get(name)
            if value in (None, ""):
                return default
            try:
                return json.loads(value)
            except ValueError:
                return value

        def num(name: str) -> float | None:
            value = raw.get(name)
            return float(value) if value is not None and value not in ("", "null") else None

        def flags(name: str) -> list[bool]:
            value = js(name, [])
            return [v is True for v in value] if isinstance(value, list) else []

        price = raw.get("price_micros")
        return cls(
            run_id=run_id,
            id=job_id,
            state=JobState(raw.get("state") or PENDING),
            spec=spec_from_json(raw["spec"]),
            token=raw.get("token", ""),
            prediction_id=raw.get("prediction_id", ""),
            input_urls=js("input_urls", []),
            service_outputs=js("service_outputs", []),
            outputs=js("outputs", []),
            nsfw=flags("nsfw"),
            price_micros=int(price) if price not in (None, "", "null") else None,
            cost_micros=int(raw.get("cost_micros") or 0),
            attempts=int(raw.get("attempts") or 0),
            polls=int(raw.get("polls") or 0),
            error=raw.get("error", ""),
            reason=raw.get("reason", ""),
            record_written=raw.get("record_written") == "1",
            charge=int(raw.get("charge") or 1),
            prior_cost_micros=int(raw.get("prior_cost_micros") or 0),
            history=js("history", []),
            posted_at=num("posted_at"),
            wake_at=num("wake_at"),
            submitted_at=num("submitted_at"),
            finished_at=num("finished_at"),
            created_at=num("created_at"),
            reuse_look=raw.get("reuse_look") == "1",
            reused_from=raw.get("reused_from", ""),
            saved_micros=int(raw.get("saved_micros") or 0),
        )


@dataclass(frozen=True)
class RunRecord:
    """A run as its Redis hash holds it: the settings it started with (the same in run.json) and
    what is set as it ends. The hash keeps one JSON value per field, as `create_run` and `set_run`
    write them; every field has a default because runs started by earlier versions, or made by
    hand in tests, lack some, and such a run must still be read."""

    run_id: str = ""
    output: str = ""
    api_base: str = ""
    budget_scope: str = ""
    total: int | None = None  # None: only the hash's creation mark is there, not the run
    manifest: str = ""
    manifest_sha256: str = ""
    format: str | None = None
    model: str | None = None
    models_file: str | None = None
    allow_internal_urls: bool = False
    prices: Mapping[str, int] = field(default_factory=dict)  # list prices, for a prediction without one
    price_sources: Mapping[str, str] = field(default_factory=dict)
    prices_read_at: str | None = None
    metadata_columns: tuple[str, ...] = ()
    queue: str | None = None
    fetch_queue: str | None = None  # set only when it differs from `queue`
    notify_url: str = ""
    window: int = 0  # 0: the window follows the in-flight slots
    ready: int = 0  # 0: the worker's own setting
    s3_endpoint: str | None = None
    inputs_mode: str = "upload"  # a run from before the modes uploads, as it began
    inputs_stage: str = ""
    reuse: bool = False
    reuse_roots: tuple[str, ...] = ()  # the run's own output first
    reuse_claims: str = ""
    created_at: float | None = None
    skipped_invalid_rows: int = 0
    enqueued: int = 0
    report_written: bool = False
    notified: str = ""

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> RunRecord:
        """From decoded values (the hash's JSON, or run.json); keys this version does not know are
        left out, a missing or null one takes its default."""

        def get(name: str) -> Any:
            return values.get(name)

        def text(name: str, default: str = "") -> str:
            value = get(name)
            return default if value is None else str(value)

        def maybe(name: str) -> str | None:
            value = get(name)
            return None if value is None else str(value)

        def whole(name: str) -> int:
            return int(get(name) or 0)

        created = get("created_at")
        return cls(
            run_id=text("run_id"),
            output=text("output"),
            api_base=text("api_base"),
            budget_scope=text("budget_scope"),
            total=int(get("total") or 0) if "total" in values else None,
            manifest=text("manifest"),
            manifest_sha256=text("manifest_sha256"),
            format=maybe("format"),
            model=maybe("model"),
            models_file=maybe("models_file"),
            allow_internal_urls=bool(get("allow_internal_urls")),
            prices={str(k): int(v) for k, v in (get("prices") or {}).items()},
            price_sources={str(k): str(v) for k, v in (get("price_sources") or {}).items()},
            prices_read_at=maybe("prices_read_at"),
            metadata_columns=tuple(str(c) for c in get("metadata_columns") or ()),
            queue=maybe("queue"),
            fetch_queue=maybe("fetch_queue"),
            notify_url=text("notify_url"),
            window=whole("window"),
            ready=whole("ready"),
            s3_endpoint=maybe("s3_endpoint"),
            inputs_mode=text("inputs_mode", "upload"),
            inputs_stage=text("inputs_stage"),
            reuse=bool(get("reuse")),
            reuse_roots=tuple(str(r) for r in get("reuse_roots") or ()),
            reuse_claims=text("reuse_claims"),
            created_at=float(created) if created not in (None, "") else None,
            skipped_invalid_rows=whole("skipped_invalid_rows"),
            enqueued=whole("enqueued"),
            report_written=bool(get("report_written")),
            notified=text("notified"),
        )

    @classmethod
    def from_redis(cls, raw: Mapping[str, str]) -> RunRecord:
        """From the hash as HGETALL returns it: each value JSON, or (`created_at`, first set by
        HSETNX) a bare number."""
        values: dict[str, Any] = {}
        for k, v in raw.items():
            try:
                values[k] = json.loads(v)
            except ValueError:
                values[k] = v
        return cls.from_values(values)

    def list_price(self, model: str) -> int:
        return int(self.prices[model])


def spec_to_json(spec: JobSpec) -> str:
    return json.dumps(
        {
            "line": spec.line,
            "id": spec.id,
            "prompt": spec.prompt,
            "model": spec.model,
            "size": spec.size,
            "params": spec.params,
            "metadata": spec.metadata,
            "images": [[i.kind, i.value, i.path] for i in spec.images],
            "fp": spec.fingerprint,
        },
        separators=(",", ":"),
    )


def spec_from_json(text: str) -> JobSpec:
    d = json.loads(text)
    return JobSpec(
        line=d["line"],
        id=d["id"],
        prompt=d["prompt"],
        model=d["model"],
        size=d.get("size"),
        params=d.get("params") or {},
        metadata=d.get("metadata") or {},
        images=tuple(ImageRef(k, v, p) for k, v, p in d["images"]),
        fingerprint=d.get("fp") or "",
    )
