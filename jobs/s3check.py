"""`s3://` inputs checked with a HEAD each before anything is spent: the object exists and the
service will take its size.

The service fetches the object itself, through a presigned link, only once the prediction was
created; an object missing by then fails the job (unbilled, but the run comes out short). A
20,000-row catalogue is 20,000 HEADs, each a round trip: they go in bounded parallel, with no
more checks waiting than a few per thread, so memory does not grow with the manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from jobs.estimate import Estimate, scan
from manifests.errors import StorageError
from manifests.s3 import s3_client
from manifests.validate import MAX_IMAGE_BYTES, Result, Validator

THREADS = 32
Checked = tuple[str | None, str]  # (the problem or None, the ETag or "")
Head = Callable[[str], Checked]


def header(client: Any) -> Head:
    """One object's problem, or None when it will do. A fault of the endpoint or the credentials
    (no answer, no keys) is no object's problem: it stops the whole check as a StorageError."""
    from botocore.exceptions import BotoCoreError, ClientError

    def head(uri: str) -> Checked:
        bucket, _, key = uri[5:].partition("/")
        try:
            got = client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
                return "does not exist", ""
            if code in ("403", "AccessDenied", "Forbidden"):
                return "cannot be read with these credentials (access denied)", ""
            return f"cannot be checked ({code or exc})", ""
        except BotoCoreError as exc:
            raise StorageError(f"s3:// inputs cannot be checked: {type(exc).__name__}: {exc}") from None
        size = int(got.get("ContentLength") or 0)
        if size > MAX_IMAGE_BYTES:
            return f"is {size / 1048576:.1f} MB; the service takes at most 10 MB", ""
        if size == 0:
            return "is empty", ""
        return None, str(got.get("ETag") or "")

    return head


def s3_header(endpoint_url: str | None = None) -> Head:
    return header(s3_client(endpoint_url, pool=THREADS))


def head_all(uris: Iterable[str], head: Head, threads: int = THREADS) -> Iterator[tuple[str, Checked]]:
    """(uri, (problem or None, ETag)) for each, as they finish; at most 4 checks a thread pending."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="s3-head") as pool:
        pending: dict[Future[Checked], str] = {}
        try:
            for uri in uris:
                pending[pool.submit(head, uri)] = uri
                if len(pending) >= threads * 4:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        yield pending.pop(f), f.result()
            for f in list(pending):
                yield pending.pop(f), f.result()
        finally:  # an endpoint that stopped answering: the checks not started are not waited for
            for f in pending:
                f.cancel()


def check_s3_inputs(validator: Validator, head: Head, threads: int = THREADS) -> int:
    """HEAD every s3:// input the validator met and has not checked; the number found wanting."""
    bad = 0
    for uri, (problem, etag) in head_all(validator.unchecked_s3(), head, threads):
        validator.s3_checked(uri, problem, etag)
        bad += problem is not None
    return bad


def checked_scan(
    validator: Validator,
    make_head: Callable[[], Head] | None,
    *,
    budget_micros: int | None = None,
    rate: float | None = None,
    known: set[str] | None = None,
) -> tuple[Result, Estimate, list[str]]:
    """`scan`, with the s3:// inputs checked. Only when an object is found wanting, or rows may
    be reused (their fingerprints need the objects' ETags), is the manifest read again, so that
    each row using it is counted and named at its own line. `make_head` is called only when
    there is something to check: a manifest without s3:// inputs needs no S3."""
    result, est, columns = scan(validator, budget_micros=budget_micros, rate=rate, known=known)
    checks = make_head is not None and validator.has_unchecked_s3()
    if checks and make_head is not None and (check_s3_inputs(validator, make_head()) or known is not None):
        result, est, columns = scan(validator, budget_micros=budget_micros, rate=rate, known=known)
    return result, est, columns
