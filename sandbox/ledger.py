"""The account's daily ledger (`/public/v1/model-costs`, `/public/v1/model-usage`), built from
the sandbox's own billing, so that a run's records can be compared with what was charged.

Shaped as the service's published client reads it: unenveloped, one bucket per UTC day
(`start_date` inclusive, `end_date` exclusive, at most 180), today's bucket `partial`, rows
grouped by any of model, api_key and model_type, a cursor when there are more. A key shows
only as a masked label and a short digest, never whole.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

GROUPS = ("model", "api_key", "model_type")
MAX_DAYS = 180


@dataclass(frozen=True)
class Charge:
    """One billed prediction: what the account paid, for which model and key, and when."""

    model: str
    model_type: str
    key: str
    micros: int
    at: float


class LedgerQueryError(ValueError):
    """A query the service would answer with 400."""


def key_label(key: str) -> str:
    return f"{key[:3]}...{key[-4:]}" if len(key) >= 12 else "..."


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _day(text: str | None, name: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text or "")
    except ValueError:
        raise LedgerQueryError(f"{name} must be a UTC date YYYY-MM-DD") from None


def answer(
    kind: str,
    charges: Iterable[Charge],
    key: str,
    params: Mapping[str, Sequence[str]],
    now: float,
) -> dict[str, Any]:
    """The answer to one page of `model-costs` (kind "costs") or `model-usage` ("usage")."""
    start = _day(_one(params, "start_date"), "start_date")
    end = _day(_one(params, "end_date"), "end_date")
    days = (end - start).days
    if not 1 <= days <= MAX_DAYS:
        raise LedgerQueryError(f"end_date must be 1 to {MAX_DAYS} days after start_date")
    group_by = list(dict.fromkeys(params.get("group_by[]", [])))
    if set(group_by) - set(GROUPS):
        raise LedgerQueryError(f"group_by[] takes {', '.join(GROUPS)}")
    models = set(params.get("model_ids[]", []))
    try:
        limit = int(_one(params, "limit") or 100)
        first = int(_one(params, "page") or 0)
    except ValueError:
        raise LedgerQueryError("limit must be an integer and page a cursor from next_page") from None
    if not 1 <= limit <= 1000 or len(models) > 100:
        raise LedgerQueryError("limit is 1 to 1000, model_ids[] at most 100")
    sums: dict[dt.date, dict[tuple[str, ...], list[int]]] = collections.defaultdict(dict)
    for c in charges:
        day = dt.datetime.fromtimestamp(c.at, dt.UTC).date()
        if c.key != key or not start <= day < end or (models and c.model not in models):
            continue
        dims = {"model": c.model, "api_key": c.key, "model_type": c.model_type}
        cell = sums[day].setdefault(tuple(dims[g] for g in group_by), [0, 0])
        cell[0] += 1
        cell[1] += c.micros
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    buckets: list[dict[str, Any]] = []
    rows = 0
    index = first
    while index < days and (not buckets or rows + len(sums[start + dt.timedelta(days=index)]) <= limit):
        day = start + dt.timedelta(days=index)
        results = [_row(kind, group_by, dims, n, micros) for dims, (n, micros) in sorted(sums[day].items())]
        rows += len(results)
        buckets.append(
            {
                "object": "bucket",
                "date": day.isoformat(),
                "start_at": f"{day.isoformat()}T00:00:00Z",
                "end_at": f"{(day + dt.timedelta(days=1)).isoformat()}T00:00:00Z",
                "partial": day >= today,
                "results": results,
            }
        )
        index += 1
    more = index < days
    return {
        "object": "list",
        "scope": "self",
        "data": buckets,
        "has_more": more,
        "next_page": str(index) if more else None,
        "request_id": uuid.uuid4().hex,
    }


def _one(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = params.get(name) or []
    return values[-1] if values else None


def _row(kind: str, group_by: list[str], dims: tuple[str, ...], n: int, micros: int) -> dict[str, Any]:
    row: dict[str, Any] = {"object": "result"}
    for name, value in zip(group_by, dims, strict=True):
        if name == "api_key":
            row.update(api_key=key_label(value), api_key_id=key_digest(value))
        else:
            row[name] = value
    if kind == "costs":
        row["amount"] = {"value": f"{micros / 1_000_000:.6f}", "currency": "usd"}
    else:
        row.update(requests=n, images=n)
    return row
