"""A job's inputs as URLs the service can fetch: URL inputs as they are, local and s3:// files
uploaded once per content hash (shared by the run's jobs, so a photo used by five rows goes up
once), each upload within the shared upload rate."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from jobs.control import AUTH, refused_by
from jobs.errors import AuthError, RateLimited, ServiceError, StorageError, TransientError
from jobs.images import NotAnImage, inspect
from jobs.records import JobRecord
from workers import events
from workers.context import Context
from workers.retry import backoff

log = logging.getLogger("seedream.jobs")


@dataclass(frozen=True)
class InputFailed:
    """An input that cannot be had: the job fails with this error and reason, nothing billed."""

    error: str
    reason: str


def prepare_inputs(ctx: Context, meta: dict[str, Any], rec: JobRecord) -> list[str] | float | InputFailed:
    """Upload local and s3:// inputs once per content hash (shared by the run); URLs pass as they are."""
    urls: list[str] = []
    for ref in rec.spec.images:
        if ref.kind == "url":
            urls.append(ref.value)
            continue
        try:
            data = _read_input(ctx, ref.kind, ref.value, ref.path)
        except (OSError, StorageError) as exc:
            n = ctx.runs.incr(rec.run_id, rec.id, "attempts")
            if n >= ctx.settings.max_attempts or isinstance(exc, FileNotFoundError):
                return InputFailed(f"input {ref.value} cannot be read: {exc}", "input")
            events.retry(rec, "read_input", n, str(exc))
            return backoff(n)
        sha = hashlib.sha256(data).hexdigest()
        verdict, value = ctx.uploads.claim(rec.run_id, sha)
        if verdict == "url":
            urls.append(value)
            continue
        if verdict == "wait":
            return 0.3  # another job is uploading the same photo
        if verdict == "taken_over":
            log.warning("upload of %s claimed %ss ago, not done; uploading it here", ref.value, value[:6])
        try:
            later = ctx.limiter.take("upload")
            if later:
                ctx.uploads.release(rec.run_id, sha)
                return later
            try:
                info = inspect(data, decode=False)
            except NotAnImage as exc:
                ctx.uploads.release(rec.run_id, sha)
                return InputFailed(f"input {ref.value} is not an image: {exc}", "input")
            url = ctx.client(meta["api_base"]).upload(f"{sha[:24]}.{info.extension}", data, info.content_type)
        except RateLimited as exc:
            ctx.uploads.release(rec.run_id, sha)
            ctx.limiter.cool_down("upload", exc.retry_after)
            events.rate_limited(rec, "upload", exc.retry_after)
            return exc.retry_after or 1.0
        except AuthError as exc:  # no upload of this key (or this User-Agent) can get through
            ctx.uploads.release(rec.run_id, sha)
            ctx.control.halt(rec.run_id, refused_by(exc))
            return InputFailed(f"upload of {ref.value} failed: {exc}", AUTH)
        except (TransientError, ServiceError) as exc:
            ctx.uploads.release(rec.run_id, sha)
            n = ctx.runs.incr(rec.run_id, rec.id, "attempts")
            if isinstance(exc, TransientError) and n < ctx.settings.max_attempts:
                events.retry(rec, "upload", n, exc.message)
                return backoff(n)
            return InputFailed(f"upload of {ref.value} failed: {exc}", "upload")
        ctx.uploads.store(rec.run_id, sha, url)
        ctx.runs.bump(rec.run_id, "uploads")
        events.uploaded()
        urls.append(url)
    return urls


def _read_input(ctx: Context, kind: str, value: str, path: str | None) -> bytes:
    if kind == "local":
        assert path is not None
        with open(path, "rb") as fh:
            return fh.read(10 * 1024 * 1024 + 1)
    bucket, _, key = value[5:].partition("/")
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return bytes(ctx.s3().get_object(Bucket=bucket, Key=key)["Body"].read())
    except (BotoCoreError, ClientError) as exc:
        raise StorageError(f"{value}: {type(exc).__name__}") from None
