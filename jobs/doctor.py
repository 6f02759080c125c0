"""Everything a first real run needs, checked without spending a cent.

A run that starts and then breaks costs more than one that never starts: predictions
already paid for wait on a Redis that went away, outputs have nowhere to go, a key is
refused after the first hundred submits were billed to another. Each check here reads
or probes only (a balance read, the public catalogue, a probe object deleted again);
nothing is submitted. A FAIL names what would break and what to change.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.estimate import Estimate, scan
from jobs.ledger import available_micros, money_micros
from jobs.redisio import _safe_url, connect
from jobs.storage import open_output
from manifests.errors import AuthError, ConfigError, ManifestError, SeedreamError, ServiceError, StorageError
from manifests.models import ModelTable, micros_to_usd
from manifests.validate import Validator

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
CLOCK_WARN, CLOCK_FAIL = 2.0, 30.0  # seconds between this host's clock and Redis's TIME
MAX_SCHEMA_BYTES = 4 * 1024 * 1024
USER_AGENT_SETTING = "SEEDREAM_USER_AGENT"
_CLOUDFLARE_1010 = re.compile(r"error(?: code)?\s*:?\s*1010", re.IGNORECASE)


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str


@dataclass(frozen=True)
class Inputs:
    redis_url: str
    broker_url: str
    output: str | None = None
    s3_endpoint: str | None = None
    manifest: Path | None = None
    models_file: str | None = None
    has_key: bool = True
    allow_internal_urls: bool = False


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def verdict(self) -> str:
        warned = sum(c.status == WARN for c in self.checks)
        if self.failed:
            names = ", ".join(dict.fromkeys(c.name for c in self.failed))
            n = len(self.failed)
            return f"not ready: {n} check{'s' if n > 1 else ''} failed ({names}); a run would break"
        return "ready for a first real run" + (f", with {warned} warnings" if warned else "")

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "verdict": self.verdict, "checks": [c.__dict__ for c in self.checks]}

    def render_text(self) -> str:
        width = max((len(c.name) for c in self.checks), default=0)
        lines = [f"{c.status:4}  {c.name.ljust(width)}  {c.detail}" for c in self.checks]
        return "\n".join([*lines, self.verdict])


def diagnose(inputs: Inputs, client_factory: Callable[[], Any]) -> Report:
    """Every check, in the order a run meets them."""
    report = Report()
    redis_client = _check_redis(report, inputs.redis_url)
    _check_broker(report, inputs.broker_url)
    _check_clock(report, redis_client)
    _check_output(report, inputs)
    table, est = _check_manifest(report, inputs)
    with client_factory() as client:
        _check_service(report, client, inputs.has_key, table, est)
    return report


def _check_redis(report: Report, url: str) -> Any:
    try:
        client = connect(url, timeout=3.0)
        started = time.perf_counter()
        client.ping()
    except Exception as exc:  # redis raises its own tree; any failure here means "does not answer"
        report.add("redis", FAIL, f"Redis at {_safe_url(url)} does not answer ({_short(exc)}); set REDIS_URL")
        return None
    report.add(
        "redis", OK, f"Redis at {_safe_url(url)} answers (PING in {(time.perf_counter() - started) * 1000:.1f} ms)"
    )
    return client


def _check_broker(report: Report, url: str) -> None:
    """A connection to the broker, not a task: nothing lands on a queue."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
    except Exception as exc:  # kombu wraps each transport's errors differently
        report.add("broker", FAIL, f"the Celery broker at {_safe_url(url)} does not answer ({_short(exc)})")
        return
    report.add("broker", OK, f"the Celery broker at {_safe_url(url)} accepts a connection")


def _check_clock(report: Report, client: Any) -> None:
    """Rate buckets run on Redis's clock, leases and due times on each host's: a host whose clock
    is off holds slots too long or takes jobs over too early."""
    if client is None:
        report.add("clock", SKIP, "not compared: Redis does not answer")
        return
    try:
        before = time.time()
        secs, micros = client.time()
        after = time.time()
    except Exception as exc:
        report.add("clock", FAIL, f"Redis did not answer TIME ({_short(exc)})")
        return
    skew = (secs + micros / 1e6) - (before + after) / 2
    status = OK if abs(skew) <= CLOCK_WARN else WARN if abs(skew) <= CLOCK_FAIL else FAIL
    text = f"this host's clock is {abs(skew):.2f} s {'behind' if skew > 0 else 'ahead of'} Redis's TIME"
    advice = "" if status == OK else f" (warn past {CLOCK_WARN:g} s, fail past {CLOCK_FAIL:g} s): sync it with NTP"
    report.add("clock", status, text + advice)


def _check_output(report: Report, inputs: Inputs) -> None:
    if not inputs.output:
        report.add("output", SKIP, "no --output given: where a run stores its results is not checked")
        return
    name = f".seedream-doctor-{secrets.token_hex(6)}"
    body = secrets.token_bytes(32)
    where = inputs.output
    try:
        store = open_output(inputs.output, endpoint_url=inputs.s3_endpoint)
        where = store.uri(name)
        store.put_bytes(name, body, "application/octet-stream")
        if store.get_bytes(name) != body:
            report.add("output", FAIL, f"{where}: a probe object read back different bytes")
            return
        store.delete(name)
        if store.get_bytes(name) is not None:
            report.add("output", FAIL, f"{where}: a probe object is still there after its delete")
            return
    except (StorageError, ConfigError) as exc:
        report.add("output", FAIL, f"{where}: {exc}; a run could not store its records or outputs")
        return
    report.add("output", OK, f"{inputs.output}: a probe object was written, read back and deleted")


def _check_manifest(report: Report, inputs: Inputs) -> tuple[ModelTable | None, Estimate | None]:
    try:
        table = ModelTable.load(inputs.models_file)
    except ConfigError as exc:
        report.add("models-file", FAIL, str(exc))
        return None, None
    if inputs.manifest is None:
        report.add("manifest", SKIP, "no manifest given: the table's models are checked, no estimate")
        return table, None
    try:
        validator = Validator(inputs.manifest, table, allow_internal_urls=inputs.allow_internal_urls)
        result, est, _ = scan(validator)
    except (ConfigError, ManifestError, ValueError, OSError) as exc:
        report.add("manifest", FAIL, f"{inputs.manifest}: {exc}")
        return table, None
    if not result.ok:
        count = len(result.problems) + result.more_problems
        report.add("manifest", FAIL, f"{inputs.manifest}: {count} problems (`validate` lists them); "
                                     f"{result.jobs:,} rows are valid")  # fmt: skip
    else:
        report.add("manifest", OK, f"{result.jobs:,} jobs, estimated ${micros_to_usd(est.total_micros)} at most")
    return table, est


def _cloudflare_refused(exc: ServiceError) -> bool:
    return exc.status == 403 and bool(_CLOUDFLARE_1010.search(exc.message or ""))


def _read(call: Callable[[], Any], refused: list[str], where: str) -> tuple[Any, ServiceError | None]:
    """The answer or the error; a Cloudflare refusal goes to `refused` instead, for one line."""
    try:
        return call(), None
    except ServiceError as exc:
        if _cloudflare_refused(exc):
            refused.append(where)
            return None, None
        return None, exc


def _check_service(report: Report, client: Any, has_key: bool, table: ModelTable | None, est: Estimate | None) -> None:
    refused: list[str] = []
    catalogue, error = _read(client.models, refused, "/models")
    if error is not None:
        report.add("models", FAIL, f"the catalogue (/models) did not answer: {error.message}")
    balance: Any = None
    if not has_key:
        report.add("api-key", FAIL, "ATLASCLOUD_API_KEY is not set (or --api-key-file)")
    else:
        balance, error = _read(client.balance, refused, "the balance")
        if isinstance(error, AuthError):
            report.add("api-key", FAIL, f"the API key was refused: {error.message} (HTTP {error.status})")
        elif error is not None:
            status = WARN if error.status else FAIL  # no status: the service did not answer at all
            report.add("api-key", status, f"an authenticated read (the balance) did not answer: {error.message}")
        elif balance is not None:
            report.add("api-key", OK, "accepted (the balance endpoint answered)")
    if refused:
        report.add(
            "user-agent",
            FAIL,
            f"Cloudflare refused this client's User-Agent (HTTP 403, error code 1010) on {' and '.join(refused)}; "
            f"set {USER_AGENT_SETTING} to a User-Agent it lets through",
        )
        if "the balance" in refused:
            report.add("api-key", SKIP, "not read: Cloudflare refused the request before the service saw the key")
    else:
        report.add("user-agent", OK, "not refused by Cloudflare (no error 1010)")
    if "/models" in refused:
        report.add("models", SKIP, "not read: Cloudflare refused the catalogue too")
    if catalogue is not None and table is not None:
        needed = sorted(est.by_model) if est is not None and est.by_model else sorted(table.models)
        for model_id in needed:
            _check_model(report, client, model_id, catalogue, table)
    _check_balance(report, balance, est)


def _check_model(
    report: Report, client: Any, model_id: str, catalogue: list[dict[str, Any]], table: ModelTable
) -> None:
    entry = next((m for m in catalogue if (m.get("model") or m.get("id")) == model_id), None)
    name = f"model {model_id}"
    if entry is None:
        report.add(name, FAIL, "not listed by the service's /models: its submits would be refused")
        return
    price = entry.get("price")
    actual = price.get("actual") if isinstance(price, dict) else None
    live = money_micros(actual.get("base_price")) if isinstance(actual, dict) else None
    spec = table.get(model_id)
    ours = spec.price_micros if spec is not None else 0
    status, parts = OK, ["listed"]
    if live is None:
        status = WARN
        parts.append(f"no live price (price.actual.base_price); the table's ${micros_to_usd(ours)} is used")
    elif live > ours:
        status = FAIL
        parts.append(
            f"live price ${micros_to_usd(live)} is above the table's ${micros_to_usd(ours)}: costs and the budget "
            "would be counted low; set price_usd in a models file (--models-file)"
        )
    else:
        below = f" (the table's ${micros_to_usd(ours)} is above it: reservations err high)" if live < ours else ""
        parts.append(f"live price ${micros_to_usd(live)}{below}")
    url = entry.get("schema")
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        try:
            json.loads(client.download(url, max_bytes=MAX_SCHEMA_BYTES).content)
            parts.append("its schema answers")
        except (SeedreamError, ValueError) as exc:
            status = FAIL if status == FAIL else WARN
            parts.append(f"its schema at {url} does not answer as JSON ({_short(exc)})")
    else:
        status = FAIL if status == FAIL else WARN
        parts.append("no schema URL")
    report.add(name, status, "; ".join(parts))


def _check_balance(report: Report, balance: Any, est: Estimate | None) -> None:
    if balance is None:
        report.add("balance", SKIP, "not read (see the API key's line)")
        return
    micros = available_micros(getattr(balance, "raw", None))
    if micros is None and getattr(balance, "available", None) is not None:
        micros = round(float(balance.available) * 1_000_000)
    if micros is None:
        report.add("balance", WARN, "the balance answer has no available amount in USD this client can read")
    elif est is None:
        report.add("balance", OK, f"${micros_to_usd(micros)} available (no manifest to compare)")
    elif micros < est.total_micros:
        report.add(
            "balance",
            FAIL,
            f"${micros_to_usd(micros)} available, less than the manifest's ${micros_to_usd(est.total_micros)}: "
            "top up, or the service refuses submits part-way (`run --allow-partial` runs until then)",
        )
    else:
        report.add("balance", OK, f"${micros_to_usd(micros)} available covers the ${micros_to_usd(est.total_micros)}")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
