"""report.csv, report.html and summary.json: one row (and card) per manifest row, in order, safe to open.

A cell that starts with = + - @ (or a tab or carriage return) would be run as a
formula by a spreadsheet; such cells, the header's included, are prefixed with a quote.
"""

from __future__ import annotations

import csv
import io
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jobs.budget import Budget
from jobs.gallery import job_view, render
from jobs.records import FINAL, JobRecord, RunRecord
from jobs.storage import Storage
from jobs.store import RunStore
from jobs.thumbs import Thumbs, relative
from manifests.models import micros_to_usd

ReadInput = Callable[[str, str, str | None], bytes | None]

PRESIGNED_PAGE = "report-presigned.html"
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # what S3's signature (SigV4) allows
COLUMNS = [
    "id",
    "status",
    "model",
    "prompt",
    "prediction_id",
    "outputs",
    "nsfw",
    "cost_usd",
    "attempts",
    "error",
    "history",
    "reused_from",
]
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def total_cost(d: dict[str, Any]) -> int:
    """Every paid attempt of a job: the current one and those run before it (`retry-failed
    --pay-again`, `resume --clear-halt`)."""
    return int(d.get("cost_micros") or 0) + int(d.get("prior_cost_micros") or 0)


def history_text(d: dict[str, Any]) -> str:
    """Earlier attempts, oldest first: 'attempt 1: failed (no_outputs) $0.027 pred-1; ...'."""
    parts = []
    for h in d.get("history") or []:
        if not isinstance(h, dict):
            continue
        pid = f" {h['prediction_id']}" if h.get("prediction_id") else ""
        cost = micros_to_usd(int(h.get("cost_micros") or 0))
        parts.append(f"attempt {h.get('attempt')}: {h.get('state')} ({h.get('reason') or '-'}) ${cost}{pid}")
    return "; ".join(parts)


def flagged(d: dict[str, Any]) -> str:
    """The outputs the service flagged as NSFW, by index ("0|2"): they may be blank images."""
    return "|".join(str(i) for i, flag in enumerate(d.get("nsfw") or []) if flag is True)


def row_of(rec: JobRecord | dict[str, Any], metadata_columns: list[str]) -> list[str]:
    d = rec.to_json() if isinstance(rec, JobRecord) else rec
    cost = total_cost(d)
    error = d.get("error") or ""
    if d.get("reason") and d["state"] in ("skipped", "uncertain", "failed", "overdue") and d["reason"] not in error:
        error = f"{d['reason']}: {error}" if error else d["reason"]
    values = [
        d["id"],
        d["state"],
        d["model"],
        d["prompt"],
        d.get("prediction_id") or "",
        "|".join(d.get("outputs") or []),
        flagged(d),
        micros_to_usd(int(cost)),
        d.get("attempts") or 0,
        error,
        history_text(d),
        d.get("reused_from") or "",
    ]
    meta = d.get("metadata") or {}
    values += [meta.get(c, "") for c in metadata_columns]
    return [cell(v) for v in values]


def write_report(
    storage: Storage,
    records: Iterator[JobRecord | dict[str, Any]],
    run: RunRecord,
    *,
    now: float | None = None,
    read_input: ReadInput | None = None,
    budget: dict[str, str | None] | None = None,
    presign_seconds: int | None = None,
) -> dict[str, Any]:
    """Write report.csv, the gallery (report.html with its thumbnails) and summary.json; return the
    summary. With `presign_seconds` (S3 only), also report-presigned.html, whose links work
    without credentials for that long; its own link is in the summary returned, never stored."""
    metadata_columns = [c for c in run.metadata_columns if c not in COLUMNS]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([cell(c) for c in COLUMNS + metadata_columns])  # metadata names are the user's text too
    counts: Counter[str] = Counter()
    cost_by_model: Counter[str] = Counter()
    total_micros = 0
    views: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    reused = saved = 0
    for rec in records:
        d = rec.to_json() if isinstance(rec, JobRecord) else rec
        row = row_of(d, metadata_columns)
        writer.writerow(row)
        view = job_view(d, row[COLUMNS.index("error")].removeprefix("'"))
        view["outputs"] = d.get("outputs") or []
        view["image_refs"] = _refs(rec, run)
        views.append(view)
        counts[d["state"]] += 1
        if d.get("reused_from"):
            reused += 1
            saved += int(d.get("saved_micros") or 0)
        if d["state"] != "succeeded":
            reasons[f"{d['state']}:{d.get('reason') or 'unknown'}"] += 1
        cost = total_cost(d)
        total_micros += cost
        cost_by_model[d["model"]] += cost
    storage.put_bytes("report.csv", buf.getvalue().encode("utf-8"), "text/csv; charset=utf-8")
    now = time.time() if now is None else now
    started = run.created_at or now
    finished = sum(counts[s] for s in FINAL)
    summary: dict[str, Any] = {
        "run_id": run.run_id or None,
        "jobs": sum(counts.values()),
        "counts": dict(counts),
        "outcome": outcome(counts, reasons),
        "reasons": dict(sorted(reasons.items())),
        "finished": finished,
        "total_cost_usd": micros_to_usd(total_micros),
        "total_cost_micros": total_micros,
        "cost_by_model_usd": {m: micros_to_usd(c) for m, c in sorted(cost_by_model.items())},
        "reused": reused,  # jobs that copied an edit already stored instead of paying for it
        "saved_usd": micros_to_usd(saved),  # what those edits cost when they were made
        "budget_scope": run.budget_scope or None,
        "wall_seconds": round(now - started, 3),
        "jobs_per_second": round(finished / (now - started), 3) if now > started else None,
        "report": storage.uri("report.csv"),
        "gallery": storage.uri("report.html"),
    }
    if budget:
        summary["budget"] = budget
    presigned = write_gallery(storage, summary, views, read_input, presign_seconds=presign_seconds)
    storage.put_json("summary.json", summary)
    if presigned:
        return {**summary, "gallery_presigned_url": presigned, "gallery_presigned_seconds": presign_seconds}
    return summary


def outcome(counts: Counter[str], reasons: Counter[str]) -> str:
    """How the run ended, in one word for a webhook or a script: cancelled, payment_refused,
    budget_exhausted (any job skipped for that), succeeded (every job), failed (none), or
    partly_failed."""
    halts = (("cancelled", "cancelled"), ("payment_required", "payment_refused"), ("budget", "budget_exhausted"))
    for reason, word in halts:
        if reasons.get(f"skipped:{reason}"):
            return word
    total = sum(counts.values())
    if counts.get("succeeded", 0) == total:
        return "succeeded"
    return "failed" if not counts.get("succeeded") else "partly_failed"


def write_gallery(
    storage: Storage,
    summary: dict[str, Any],
    views: list[dict[str, Any]],
    read_input: ReadInput | None,
    *,
    presign_seconds: int | None = None,
) -> str | None:
    """report.html beside report.csv, with relative links: it works from the folder, wherever it
    is copied. With `presign_seconds`, report-presigned.html too, for opening straight from S3
    (a private bucket answers relative links with 403); returns that page's own presigned link."""
    base = storage.uri("report.csv")[: -len("report.csv")]
    Thumbs(storage, read_input).make_all(views, base)
    for v in views:
        v["full_out"] = [relative(u, base) for u in v["outputs"]]
    html = "text/html; charset=utf-8"
    storage.put_bytes("report.html", render(summary, views).encode("utf-8"), html)
    if not presign_seconds:
        return None
    seconds = presign_seconds
    page_link = storage.presign(PRESIGNED_PAGE, seconds)  # an S3 output, or ConfigError before any work
    parts = urlsplit(page_link)
    page = render(
        summary,
        views,
        link=lambda key: storage.presign(key, seconds),
        img_sources=f"'self' data: {parts.scheme}://{parts.netloc}",
    )
    storage.put_bytes(PRESIGNED_PAGE, page.encode("utf-8"), html)
    return page_link


def _refs(rec: JobRecord | dict[str, Any], run: RunRecord) -> list[tuple[str, str, str | None]]:
    """(kind, value, local path) of each input; a durable record keeps only the values."""
    if isinstance(rec, JobRecord):
        return [(i.kind, i.value, i.path) for i in rec.spec.images]
    refs: list[tuple[str, str, str | None]] = []
    folder = Path(run.manifest or ".").parent
    for value in rec.get("images") or []:
        v = str(value)
        if v.startswith("s3://"):
            refs.append(("s3", v, None))
        elif "://" in v:
            refs.append(("url", v, None))
        else:
            refs.append(("local", v, str(folder / v)))
    return refs


def write_run_report(
    store: RunStore,
    storage: Storage,
    run_id: str,
    *,
    read_input: ReadInput | None = None,
    presign_seconds: int | None = None,
) -> dict[str, Any]:
    run = replace(store.run_meta(run_id) or RunRecord(), run_id=run_id)
    state = Budget(store.client, run.budget_scope or run_id, prefix=store.prefix).state()
    budget = None
    if state.cap_micros is not None or state.stopped:
        budget = {
            "cap_usd": None if state.cap_micros is None else micros_to_usd(state.cap_micros),
            "spent_usd": micros_to_usd(state.spent_micros),
        }
        if state.stopped:
            budget["stopped"] = state.stopped
    return write_report(
        storage, store.iter_records(run_id), run, read_input=read_input, budget=budget, presign_seconds=presign_seconds
    )
