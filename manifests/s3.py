"""The one way this project makes a boto3 S3 client.

Every client gets the same patience (5 s to connect, 30 s to read, three tries in botocore's
standard retry mode) and signs with SigV4, presigned links included: botocore still signs those
with V2 unless told, and AWS wants V4. It lives in the lowest layer because `manifest` lists
buckets before anything else exists. Errors from botocore are not translated here: each caller
knows what the failed call meant (a listing, a probe, a stored result) and says so.
"""

from __future__ import annotations

from typing import Any

POOL = 10  # botocore's own default; callers that fan out in threads ask for more


def s3_client(endpoint_url: str | None = None, *, pool: int = POOL) -> Any:
    """A client for AWS or an S3-compatible endpoint; `pool` connections for that many threads."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=5,
        read_timeout=30,
        retries={"max_attempts": 3, "mode": "standard"},
        signature_version="s3v4",
        max_pool_connections=pool,
    )
    return boto3.client("s3", endpoint_url=endpoint_url or None, config=config)
