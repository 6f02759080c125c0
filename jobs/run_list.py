"""Runs you can find: the ones Redis knows and, given an output, the ones whose folders are there
(a run Redis forgot still has run.json and, once it ended, summary.json). A run id should never
have to be copied from an old terminal."""

from __future__ import annotations

import time
from typing import Any

from jobs.budget import Budget
from jobs.keys import run_head, run_ids
from jobs.records import RunRecord
from jobs.runs import Runs
from jobs.storage import S3Storage, open_output, open_storage
from manifests.errors import StorageError
from manifests.models import micros_to_usd

COLUMNS = ("run_id", "started", "state", "done", "cost_usd", "budget_usd", "output", "source")


def _started(created_at: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(created_at))) + "Z"
    except (TypeError, ValueError):
        return ""


def _metas(runs: Runs) -> dict[str, RunRecord]:
    """Each run's record Redis holds under this prefix (a run's other keys have a further ':')."""
    prefix = runs.settings.prefix
    ids = run_ids(prefix, runs.redis.scan_iter(f"{run_head(prefix)}*", count=1000))
    metas = {run_id: runs.store.run_meta(run_id) for run_id in ids}
    return {run_id: meta for run_id, meta in metas.items() if meta is not None and meta.total is not None}


def in_redis(runs: Runs) -> list[dict[str, Any]]:
    """Every run Redis knows, oldest first."""
    rows = []
    for run_id, meta in _metas(runs).items():
        p = runs.progress(run_id)
        state = "finished" if p.done else "halted" if p.halted else "running"
        if p.done and not meta.report_written:
            state = "finishing"  # the last job ended; the report is being written
        cap = Budget(runs.redis, meta.budget_scope, prefix=runs.settings.prefix).state().cap_micros
        rows.append(
            {
                "run_id": run_id,
                "created_at": meta.created_at or 0.0,
                "started": _started(meta.created_at),
                "state": state + (f" ({p.halted})" if p.halted and not p.done else ""),
                "finished": p.finished,
                "total": p.total,
                "done": f"{p.finished:,}/{p.total:,}",
                "cost_usd": micros_to_usd(p.cost_micros),
                "budget_usd": None if cap is None else micros_to_usd(cap),
                "output": meta.output,
                "source": "redis",
            }
        )
    return sorted(rows, key=lambda r: (r["created_at"], r["run_id"]))


def _run_ids(output: str, endpoint: str | None) -> list[str]:
    """The folders directly under `output` that hold a run.json."""
    store = open_output(output, endpoint_url=endpoint)
    if isinstance(store, S3Storage):
        head = f"{store.prefix}/" if store.prefix else ""
        ids, token = [], None
        while True:
            kwargs: dict[str, Any] = {"Bucket": store.bucket, "Prefix": head, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = store._call("list", store.client.list_objects_v2, **kwargs) or {}
            ids += [p["Prefix"][len(head) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
            if not page.get("IsTruncated"):
                return sorted(ids)
            token = page.get("NextContinuationToken")
    root = getattr(store, "root", None)
    if root is None or not root.is_dir():
        raise StorageError(f"{output} is not a folder")
    return sorted(p.name for p in root.iterdir() if (p / "run.json").is_file())


def in_storage(output: str, endpoint: str | None, known: set[str]) -> list[dict[str, Any]]:
    """The runs under `output` that Redis does not know (those it knows are listed from Redis)."""
    rows = []
    for run_id in _run_ids(output, endpoint):
        if run_id in known:
            continue
        try:
            storage = open_storage(output, run_id, endpoint_url=endpoint)
        except StorageError:
            continue
        saved = storage.get_json("run.json")
        if not isinstance(saved, dict):
            continue
        summary = storage.get_json("summary.json")
        summary = summary if isinstance(summary, dict) else {}
        total = int(saved.get("total") or 0)
        finished = int(summary.get("finished") or 0)
        cap = saved.get("budget_cap_micros")
        rows.append(
            {
                "run_id": run_id,
                "created_at": float(saved.get("created_at") or 0),
                "started": _started(saved.get("created_at")),
                "state": "ended" if summary else "unfinished (`resume RUN_ID --output` continues it)",
                "finished": finished,
                "total": total,
                "done": f"{finished:,}/{total:,}" if summary else f"?/{total:,}",
                "cost_usd": summary.get("total_cost_usd"),
                "budget_usd": None if cap is None else micros_to_usd(int(cap)),
                "output": output,
                "source": "storage",
            }
        )
    return rows


def listing(runs: Runs, output: str | None = None, endpoint: str | None = None) -> list[dict[str, Any]]:
    rows = in_redis(runs)
    if output:
        rows += in_storage(output, endpoint, {r["run_id"] for r in rows})
    return sorted(rows, key=lambda r: (r["created_at"], r["run_id"]))


def latest(runs: Runs) -> str | None:
    """The run Redis knows that started last: what `status` shows without a run id."""
    metas = _metas(runs)
    return max(metas, key=lambda run_id: (metas[run_id].created_at or 0.0, run_id), default=None)


def table(rows: list[dict[str, Any]]) -> str:
    header = {"run_id": "run", "started": "started", "state": "state", "done": "done", "cost_usd": "cost",
              "budget_usd": "budget", "output": "output"}  # fmt: skip
    cells = [
        {k: ("" if r[k] is None else f"${r[k]}" if k in ("cost_usd", "budget_usd") else str(r[k])) for k in header}
        for r in rows
    ]
    widths = {k: max(len(header[k]), *(len(c[k]) for c in cells)) for k in header}
    lines = ["  ".join(header[k].ljust(widths[k]) for k in header).rstrip()]
    lines += ["  ".join(c[k].ljust(widths[k]) for k in header).rstrip() for c in cells]
    return "\n".join(lines)
