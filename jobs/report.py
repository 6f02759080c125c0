"""report.csv and summary.json: one row per manifest row, in manifest order, safe to open.

A cell that starts with = + - @ (or a tab or carriage return) would be run as a
formula by a spreadsheet; such cells are prefixed with a quote.
"""

from __future__ import annotations

import csv
import io
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from jobs.models import micros_to_usd
from jobs.records import FINAL, JobRecord, RunStore
from jobs.storage import Storage

COLUMNS = ["id", "status", "model", "prompt", "prediction_id", "outputs", "cost_usd", "attempts", "error"]
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def row_of(rec: JobRecord | dict[str, Any], metadata_columns: list[str]) -> list[str]:
    d = rec.to_json() if isinstance(rec, JobRecord) else rec
    cost = d.get("cost_micros") or 0
    error = d.get("error") or ""
    if d.get("reason") and d["state"] in ("skipped", "uncertain", "failed") and d["reason"] not in error:
        error = f"{d['reason']}: {error}" if error else d["reason"]
    values = [
        d["id"],
        d["state"],
        d["model"],
        d["prompt"],
        d.get("prediction_id") or "",
        "|".join(d.get("outputs") or []),
        micros_to_usd(int(cost)),
        d.get("attempts") or 0,
        error,
    ]
    meta = d.get("metadata") or {}
    values += [meta.get(c, "") for c in metadata_columns]
    return [cell(v) for v in values]


def write_report(
    storage: Storage, records: Iterator[JobRecord | dict[str, Any]], meta: dict[str, Any], *, now: float | None = None
) -> dict[str, Any]:
    """Write report.csv and summary.json; return the summary."""
    metadata_columns = [c for c in meta.get("metadata_columns", []) if c not in COLUMNS]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS + metadata_columns)
    counts: Counter[str] = Counter()
    cost_by_model: Counter[str] = Counter()
    total_cost = 0
    for rec in records:
        d = rec.to_json() if isinstance(rec, JobRecord) else rec
        writer.writerow(row_of(d, metadata_columns))
        counts[d["state"]] += 1
        cost = int(d.get("cost_micros") or 0)
        total_cost += cost
        cost_by_model[d["model"]] += cost
    storage.put_bytes("report.csv", buf.getvalue().encode("utf-8"), "text/csv; charset=utf-8")
    now = time.time() if now is None else now
    started = float(meta.get("created_at") or now)
    finished = sum(counts[s] for s in FINAL)
    summary = {
        "run_id": meta.get("run_id"),
        "jobs": sum(counts.values()),
        "counts": dict(counts),
        "finished": finished,
        "total_cost_usd": micros_to_usd(total_cost),
        "total_cost_micros": total_cost,
        "cost_by_model_usd": {m: micros_to_usd(c) for m, c in sorted(cost_by_model.items())},
        "budget_scope": meta.get("budget_scope"),
        "wall_seconds": round(now - started, 3),
        "jobs_per_second": round(finished / (now - started), 3) if now > started else None,
        "report": storage.uri("report.csv"),
    }
    storage.put_json("summary.json", summary)
    return summary


def write_run_report(store: RunStore, storage: Storage, run_id: str) -> dict[str, Any]:
    meta = store.run_meta(run_id) or {}
    meta["run_id"] = run_id
    return write_report(storage, store.iter_records(run_id), meta)
