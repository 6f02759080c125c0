"""A run's own ledger beside the service's: predictions and dollars per model per UTC day.

The run's side comes from its records (every paid attempt, earlier ones from `history`
too), dated by when the verdict was seen. The service's side comes from its daily
ledger (`/public/v1/model-costs` and `/model-usage`), whose row fields no published
client types: every amount and count is read tolerantly, and a field that is not there
is "unknown", never zero. A difference is explained where it can be: a day the service
has not closed (`partial`), other traffic on the key (the service counts more than the
run), or attempts whose billing the run cannot know (`uncertain`, `overdue`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from jobs.records import FINAL, OVERDUE, UNCERTAIN
from jobs.redisio import looked_in
from jobs.storage import open_storage, stored_records
from jobs.store import RunStore
from manifests.errors import ConfigError, ServiceError
from manifests.models import micros_to_usd

MAX_DAYS = 180  # the service answers at most this many daily buckets
MODEL_FIELDS = ("model", "model_id", "model_name")
KEY_FIELDS = ("api_key", "api_key_id", "api_key_name", "api_key_label", "key_id", "key")
AMOUNT_FIELDS = ("amount", "cost", "total_cost", "cost_usd", "spend", "total", "value", "usd")
COUNT_FIELDS = ("requests", "request_count", "num_requests", "total_requests", "count", "predictions",
                "images", "image_count")  # fmt: skip
UNSURE = (UNCERTAIN, OVERDUE)


def money_micros(value: object) -> int | None:
    """Micro-dollars from a number, a numeric string or a money object {"value", "currency"};
    None when absent, not a number, or in another currency."""
    if isinstance(value, Mapping):
        currency = value.get("currency")
        if isinstance(currency, str) and currency.strip().lower() not in ("usd", ""):
            return None
        value = value.get("value", value.get("amount"))
    if value is None or isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        usd = Decimal(str(value).strip().lstrip("$"))
    except (InvalidOperation, ValueError):
        return None
    return int((usd * 1_000_000).to_integral_value()) if usd.is_finite() else None


def available_micros(raw: object) -> int | None:
    """The balance's `available`, in both shapes seen: the money object of the public endpoint
    (`{"available": {"value": "125.500000", "currency": "usd"}}`) and a bare number."""
    return money_micros(raw.get("available")) if isinstance(raw, Mapping) else None


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        n = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        return None
    return int(n) if n.is_finite() and n >= 0 and n == n.to_integral_value() else None


def _first(row: Mapping[str, Any], names: Iterable[str], read: Callable[[object], Any]) -> Any:
    for name in names:
        if name in row:
            got = read(row[name])
            if got is not None:
                return got
    return None


def _text(value: object) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def utc_day(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).date().isoformat()


@dataclass
class Cell:
    """One model on one day: the run's side, the service's side, and what is not known."""

    run_count: int = 0
    run_micros: int = 0
    unsure_count: int = 0  # attempts counted at their reservation: billed or not, the run cannot tell
    unsure_micros: int = 0
    service_count: int | None = None
    service_micros: int | None = None

    def add_service(self, count: int | None, micros: int | None) -> None:
        if count is not None:
            self.service_count = (self.service_count or 0) + count
        if micros is not None:
            self.service_micros = (self.service_micros or 0) + micros


@dataclass
class Ledger:
    run_id: str
    source: str  # where the run's records were read: redis or storage
    start: str = ""
    end: str = ""  # exclusive
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    partial_days: set[str] = field(default_factory=set)
    undated: int = 0  # paid attempts with no time at all: not in any day
    notes: list[str] = field(default_factory=list)
    service_error: str | None = None

    def cell(self, day: str, model: str) -> Cell:
        return self.cells.setdefault((day, model), Cell())

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for (day, model), c in sorted(self.cells.items()):
            diff_n = None if c.service_count is None else c.service_count - c.run_count
            diff_m = None if c.service_micros is None else c.service_micros - c.run_micros
            flags = []
            if day in self.partial_days:
                flags.append("partial day: the service may still add to it")
            if (diff_n or 0) > 0 or (diff_n is None and (diff_m or 0) > 0):
                flags.append("the key served other traffic than this run")
            elif (diff_n or 0) < 0 or (diff_m or 0) < 0:
                flags.append("the service shows less than the run counted")
            if c.unsure_count:
                flags.append(f"{c.unsure_count} uncertain/overdue attempts counted at their reservation")
            if c.service_count is None and c.service_micros is None and self.service_error is None:
                flags.append("the service shows nothing for this model and day")
            out.append(
                {
                    "day": day,
                    "model": model,
                    "run_count": c.run_count,
                    "run_usd": micros_to_usd(c.run_micros),
                    "unsure_count": c.unsure_count,
                    "unsure_usd": micros_to_usd(c.unsure_micros),
                    "service_count": c.service_count,
                    "service_usd": None if c.service_micros is None else micros_to_usd(c.service_micros),
                    "diff_count": diff_n,
                    "diff_usd": None if diff_m is None else _signed(diff_m),
                    "partial": day in self.partial_days,
                    "agree": diff_n in (0, None) and diff_m in (0, None) and not (diff_n is None and diff_m is None),
                    "notes": flags,
                }
            )
        return out

    @property
    def agree(self) -> bool:
        return self.service_error is None and all(r["agree"] for r in self.rows())

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "records_from": self.source,
            "start_date": self.start,
            "end_date": self.end,
            "agree": self.agree,
            "service_error": self.service_error,
            "undated_paid_attempts": self.undated,
            "notes": self.notes,
            "rows": self.rows(),
        }


def _signed(micros: int) -> str:
    return ("+" if micros > 0 else "-" if micros < 0 else "") + micros_to_usd(abs(micros))


def run_side(ledger: Ledger, records: Iterable[Mapping[str, Any]]) -> None:
    """Every paid attempt of every record, under the UTC day its verdict was seen."""
    in_flight = 0
    for rec in records:
        model = str(rec.get("model") or "?")
        in_flight += rec.get("state") not in FINAL and bool(rec.get("prediction_id"))
        attempts = [h for h in rec.get("history") or [] if isinstance(h, Mapping)]
        if int(rec.get("prior_cost_micros") or 0) > sum(int(h.get("cost_micros") or 0) for h in attempts):
            ledger.undated += 1  # an earlier paid attempt whose ending the record no longer holds
        current = {**rec, "finished_at": rec.get("finished_at") or rec.get("submitted_at")}
        for attempt in [*attempts, current]:
            micros = int(attempt.get("cost_micros") or 0)
            if micros <= 0:
                continue
            when = attempt.get("finished_at")
            if not isinstance(when, int | float) or isinstance(when, bool):
                ledger.undated += 1
                continue
            c = ledger.cell(utc_day(float(when)), model)
            if attempt.get("state") in UNSURE:
                c.unsure_count += 1
                c.unsure_micros += micros
            else:
                c.run_count += 1
                c.run_micros += micros
    if in_flight:
        ledger.notes.append(
            f"{in_flight} jobs hold a prediction without a verdict yet: the service may have billed them already"
        )


def day_range(ledger: Ledger, created_at: float | None, now: float) -> tuple[str, str]:
    """The run's days, or from its start to today when nothing was paid yet; at most MAX_DAYS."""
    days = sorted({day for day, _ in ledger.cells})
    first = dt.date.fromisoformat(days[0]) if days else dt.datetime.fromtimestamp(created_at or now, dt.UTC).date()
    last = dt.date.fromisoformat(days[-1]) if days else dt.datetime.fromtimestamp(now, dt.UTC).date()
    end = last + dt.timedelta(days=1)
    if (end - first).days > MAX_DAYS:
        first = end - dt.timedelta(days=MAX_DAYS)
        ledger.notes.append(f"the service answers at most {MAX_DAYS} days: days before {first} are not compared")
    return first.isoformat(), end.isoformat()


def service_side(
    ledger: Ledger,
    costs: Iterable[Mapping[str, Any]],
    usage: Iterable[Mapping[str, Any]],
    is_this_key: Callable[[str], bool],
) -> None:
    """The service's daily buckets into the cells. Rows of this key are kept when any row names
    it; when none does (the labels are not ones this reader knows), every key is compared and
    the note says so."""
    costs, usage = list(costs), list(usage)
    ours = any(_names(r, is_this_key) for b in costs + usage for r in _results(b))
    if not ours:
        ledger.notes.append("no row of the service's ledger names this API key: compared with every key of the account")
    for buckets, kind in ((costs, "costs"), (usage, "usage")):
        for bucket in buckets:
            day = _text(bucket.get("date"))
            if day is None or not ledger.start <= day < ledger.end:
                continue
            if bucket.get("partial") is True:
                ledger.partial_days.add(day)
            for row in _results(bucket):
                if ours and not _names(row, is_this_key):
                    continue
                model = _first(row, MODEL_FIELDS, _text) or "?"
                if kind == "costs":
                    ledger.cell(day, model).add_service(None, _first(row, AMOUNT_FIELDS, money_micros))
                else:
                    ledger.cell(day, model).add_service(_first(row, COUNT_FIELDS, _count), None)


def _names(row: Mapping[str, Any], is_this_key: Callable[[str], bool]) -> bool:
    return any(isinstance(row.get(k), str) and is_this_key(row[k]) for k in KEY_FIELDS)


def _results(bucket: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    rows = bucket.get("results")
    return [r for r in rows if isinstance(r, Mapping)] if isinstance(rows, list) else []


def run_records(
    store: RunStore, run_id: str, output: str | None, s3_endpoint: str | None
) -> tuple[str, list[dict[str, Any]], float | None]:
    """The run's records, their source and when it started: from Redis while it knows the run,
    else the durable records under `output`."""
    meta = store.run_meta(run_id)
    if meta is not None:
        return "redis", [r.to_json() for r in store.iter_records(run_id)], meta.created_at
    looked = looked_in(store.client, store.prefix)
    if not output:
        raise ConfigError(f"run {run_id!r} is not known to {looked}; pass --output to read its records from storage")
    storage = open_storage(output, run_id, endpoint_url=s3_endpoint)
    saved = storage.get_json("run.json")
    if not isinstance(saved, dict):
        raise ConfigError(f"run {run_id!r} is not known to {looked}, and there is no run.json for it under {output}")
    return "storage", stored_records(storage), _float(saved.get("created_at"))


def _float(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def build(
    run_id: str,
    source: str,
    records: Iterable[Mapping[str, Any]],
    client: Any,
    is_this_key: Callable[[str], bool],
    *,
    created_at: float | None,
    now: float,
) -> Ledger:
    """Both sides for the run's days. `client` has `model_costs` and `model_usage`; an error
    reading them is kept on the ledger (the run's side still shows)."""
    ledger = Ledger(run_id=run_id, source=source)
    run_side(ledger, records)
    ledger.start, ledger.end = day_range(ledger, created_at, now)
    try:
        costs = client.model_costs(ledger.start, ledger.end)
        usage = client.model_usage(ledger.start, ledger.end)
    except ServiceError as exc:
        ledger.service_error = exc.message
        return ledger
    service_side(ledger, costs, usage, is_this_key)
    return ledger


def render_text(ledger: Ledger) -> str:
    head = (
        f"ledger of run {ledger.run_id} (records from {ledger.source}) beside the service's, "
        f"UTC days {ledger.start} to {ledger.end} (exclusive)"
    )
    lines = [head, f"{'day':10}  {'model':30} {'run n':>6} {'run $':>10} {'svc n':>6} {'svc $':>10} "
             f"{'diff n':>6} {'diff $':>10}  notes"]  # fmt: skip
    for r in ledger.rows():
        svc_n = "?" if r["service_count"] is None else str(r["service_count"])
        diff_n = "?" if r["diff_count"] is None else f"{r['diff_count']:+d}" if r["diff_count"] else "0"
        lines.append(
            f"{r['day']:10}  {r['model']:30} {r['run_count']:>6} {r['run_usd']:>10} {svc_n:>6} "
            f"{r['service_usd'] or '?':>10} {diff_n:>6} {r['diff_usd'] or '?':>10}  {'; '.join(r['notes'])}"
        )
    if not ledger.cells:
        lines.append("(no paid attempts, and nothing on the service's ledger for these days)")
    if ledger.undated:
        lines.append(f"{ledger.undated} paid attempts have no time in their records: they are in no day")
    lines += [f"note: {n}" for n in ledger.notes]
    if ledger.service_error:
        lines.append(f"the service's ledger could not be read: {ledger.service_error}")
    else:
        lines.append(
            "the ledgers agree"
            if ledger.agree
            else "the ledgers differ: see the rows with a difference and their notes"
        )
    return "\n".join(lines)
