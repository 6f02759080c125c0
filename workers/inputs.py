"""A job's inputs as the service will fetch them (see jobs/inputs.py for why).

What is kept (in Redis, per job) is never a link that works on its own: URL inputs as they
are, `s3://` inputs and staged local files as `s3://` URIs, which `input_links` presigns just
before each POST, so a row that waited hours in the backlog still sends a fresh link, and no
record, report or log line holds one. Local files (and `s3://` ones in `upload` mode) that no
bucket can serve go through uploadMedia, once per content hash, within the shared upload rate.
A local file is staged or uploaded once per run (rows sharing it wait for the first), and a
staged one that is already in the bucket, from an earlier run, is not put again.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from jobs.control import AUTH, refused_by
from jobs.records import JobRecord
from jobs.retry import backoff
from manifests.errors import AuthError, RateLimited, ServiceError, StorageError, TransientError
from manifests.images import NotAnImage, inspect
from workers import events
from workers.context import Context
from workers.turn import Turn, Wait

log = logging.getLogger("seedream.jobs")


@dataclass(frozen=True)
class InputFailed:
    """An input that cannot be had: the job fails with this error and reason, nothing billed."""

    error: str
    reason: str


def prepare_inputs(t: Turn) -> list[str] | Wait | InputFailed:
    """Each input as a URL or an `s3://` URI to presign at submit time (staging or uploading
    local files first); a wait when the job must come back, or why it cannot run."""
    ctx, run, rec = t.ctx, t.run, t.job
    presign = run.inputs_mode != "upload"  # a run started before: as it began
    stage = run.inputs_stage if presign else ""
    urls: list[str] = []
    for ref in rec.spec.images:
        if ref.kind == "url" or (ref.kind == "s3" and presign):
            urls.append(ref.value)
            continue
        try:
            data = _read_input(ctx, ref.kind, ref.value, ref.path)
        except (OSError, StorageError) as exc:
            n = ctx.runs.incr(rec.run_id, rec.id, "attempts")
            if n >= ctx.settings.max_attempts or isinstance(exc, FileNotFoundError):
                return InputFailed(f"input {ref.value} cannot be read: {exc}", "input")
            events.retry(rec, "read_input", n, str(exc))
            return Wait(backoff(n))
        sha = hashlib.sha256(data).hexdigest()
        if stage:
            staged = _stage(ctx, rec, stage, ref.value, sha, data)
            if not isinstance(staged, str):
                return staged
            urls.append(staged)
            continue
        verdict, value = ctx.uploads.claim(rec.run_id, sha)
        if verdict == "url":
            urls.append(value)
            continue
        if verdict == "wait":
            return Wait(0.3)  # another job is uploading the same photo
        if verdict == "taken_over":
            log.warning("upload of %s claimed %ss ago, not done; uploading it here", ref.value, value[:6])
        try:
            later = ctx.limiter.take("upload")
            if later:
                ctx.uploads.release(rec.run_id, sha)
                return Wait(later)
            try:
                info = inspect(data, decode=False)
            except NotAnImage as exc:
                ctx.uploads.release(rec.run_id, sha)
                return InputFailed(f"input {ref.value} is not an image: {exc}", "input")
            url = ctx.client(run.api_base).upload(f"{sha[:24]}.{info.extension}", data, info.content_type)
        except RateLimited as exc:
            ctx.uploads.release(rec.run_id, sha)
            ctx.limiter.cool_down("upload", exc.retry_after)
            events.rate_limited(rec, "upload", exc.retry_after)
            return Wait(exc.retry_after or 1.0)
        except AuthError as exc:  # no upload of this key (or this User-Agent) can get through
            ctx.uploads.release(rec.run_id, sha)
            ctx.control.halt(rec.run_id, refused_by(exc))
            return InputFailed(f"upload of {ref.value} failed: {exc}", AUTH)
        except (TransientError, ServiceError) as exc:
            ctx.uploads.release(rec.run_id, sha)
            n = ctx.runs.incr(rec.run_id, rec.id, "attempts")
            if isinstance(exc, TransientError) and n < ctx.settings.max_attempts:
                events.retry(rec, "upload", n, exc.message)
                return Wait(backoff(n))
            return InputFailed(f"upload of {ref.value} failed: {exc}", "upload")
        ctx.uploads.store(rec.run_id, sha, url)
        ctx.runs.bump(rec.run_id, "uploads")
        events.uploaded()
        urls.append(url)
    return urls


def _stage(ctx: Context, rec: JobRecord, root: str, value: str, sha: str, data: bytes) -> str | Wait | InputFailed:
    """The file at `<root>/<sha256>.<ext>`, put there unless it already is; its s3:// URI."""
    verdict, cached = ctx.uploads.claim(rec.run_id, f"stage-{sha}")
    if verdict == "url":
        return cached
    if verdict == "wait":
        return Wait(0.3)  # another job is staging the same photo
    try:
        info = inspect(data, decode=False)
    except NotAnImage as exc:
        ctx.uploads.release(rec.run_id, f"stage-{sha}")
        return InputFailed(f"input {value} is not an image: {exc}", "input")
    key = f"{sha}.{info.extension}"
    storage = ctx.root(root, rec.run_id)
    try:
        if storage.exists(key):
            ctx.runs.bump(rec.run_id, "inputs_found")
        else:
            storage.put_bytes(key, data, info.content_type, metadata={"sha256": sha})
            ctx.runs.bump(rec.run_id, "inputs_staged")
    except StorageError as exc:
        ctx.uploads.release(rec.run_id, f"stage-{sha}")
        n = ctx.runs.incr(rec.run_id, rec.id, "attempts")
        if n >= ctx.settings.max_attempts:
            return InputFailed(f"input {value} could not be staged in {root}: {exc}", "input")
        events.retry(rec, "stage_input", n, str(exc))
        return Wait(backoff(n))
    uri = storage.uri(key)
    ctx.uploads.store(rec.run_id, f"stage-{sha}", uri)
    return uri


def input_links(ctx: Context, urls: list[str]) -> list[str]:
    """What the submit sends: each `s3://` URI as a GET link signed (SigV4) now, working for
    `input_link_ttl` seconds; anything else as it is. Signing is local (no request); a failure
    (no credentials) is a StorageError."""
    from botocore.exceptions import BotoCoreError, ClientError

    links: list[str] = []
    for url in urls:
        if not url.startswith("s3://"):
            links.append(url)
            continue
        bucket, _, key = url[5:].partition("/")
        try:
            link = ctx.s3().generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=ctx.settings.input_link_ttl
            )
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"{url} could not be presigned: {type(exc).__name__}") from None
        links.append(str(link))
    return links


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
