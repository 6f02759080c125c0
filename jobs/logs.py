"""Log lines as text or as one JSON object each, with the run and job they are about.

A job's steps run inside `job_context`, so every line logged meanwhile, by this project or
by a library, carries its run id and job id. Lines about a job's life add `event` (a
transition, a retry, a rate limit, a cost) and its fields. Whatever the format, the API key
and the webhook URL are replaced by `***` in the final text, and a presigned link loses its
query: a secret that reaches a log line by some path nobody foresaw (a URL, an exception
from a library, a service's error echoing an input's link) still never leaves.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import json
import logging
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from jobs.secret import redact_links

_JOB: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("seedream_job", default=None)
# fields a line may carry through `extra=`; anything else a library adds stays out of the JSON
FIELDS = ("event", "from_state", "to_state", "reason", "attempt", "cost_usd", "prediction_id", "countdown", "status")
_WORKER: list[str] = []  # this process's worker name, once Celery names it (name_worker)


@contextlib.contextmanager
def job_context(run_id: str, job_id: str) -> Iterator[None]:
    token = _JOB.set((run_id, job_id))
    try:
        yield
    finally:
        _JOB.reset(token)


class JobFilter(logging.Filter):
    """Puts the current run and job (or those a line names with `extra=`) on every record;
    Celery's own lines about this project's tasks get them from the task's arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _JOB.get() or _from_task(getattr(record, "data", None))
        if not getattr(record, "run_id", None):
            record.run_id = current[0] if current else None
        if not getattr(record, "job_id", None):
            record.job_id = (current[1] or None) if current else None
        return True


def _from_task(data: Any) -> tuple[str, str] | None:
    """(run id, job id or "") from the context Celery logs a task line with: the task's name
    and its arguments' repr (seedream.job takes run, job, token; the others run first)."""
    if not isinstance(data, dict) or not str(data.get("name", "")).startswith("seedream."):
        return None
    args = data.get("args")
    try:
        values = ast.literal_eval(args) if isinstance(args, str) else args
    except (ValueError, SyntaxError):
        return None
    if not isinstance(values, list | tuple) or not values or not isinstance(values[0], str):
        return None
    job = values[1] if data["name"] == "seedream.job" and len(values) > 1 and isinstance(values[1], str) else ""
    return values[0], job


def name_worker(name: str) -> None:
    """JSON lines name this worker from now on, so lines from many hosts can be told apart."""
    _WORKER[:] = [name]


class _Redacting(logging.Formatter):
    def __init__(self, *args: Any, secrets: Iterable[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.secrets = [s for s in secrets if len(s) >= 6]  # a short value would blank out common text

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return redact_links(text)


class JsonFormatter(_Redacting):
    """One JSON object a line: ts, level, logger, message, run_id, job_id, worker, pid, and the
    line's own fields (event, from_state, to_state, reason, attempt, cost_usd, ...)."""

    host = socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "run_id": getattr(record, "run_id", None),
            "job_id": getattr(record, "job_id", None),
            "worker": _WORKER[0] if _WORKER else self.host,
            "pid": record.process,
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return self.redact(json.dumps(out, default=str, ensure_ascii=False))


class TextFormatter(_Redacting):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(job)s%(message)s", secrets=secrets)

    def format(self, record: logging.LogRecord) -> str:
        run_id, job_id = getattr(record, "run_id", None), getattr(record, "job_id", None)
        record.job = f"[{run_id}/{job_id}] " if run_id and job_id else (f"[{run_id}] " if run_id else "")
        return self.redact(super().format(record))


def configure(fmt: str = "text", level: str | int = "INFO", *, secrets: Iterable[str] = (), stream: Any = None) -> None:
    """The root logger writes to stderr in `fmt`, with `secrets` (the settings' API key and
    webhook) replaced by `***`; every other handler is removed."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(secrets=secrets) if fmt == "json" else TextFormatter(secrets))
    handler.addFilter(JobFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)  # a library's warning is a log line too, in the same format
