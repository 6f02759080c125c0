"""Shared fixtures: one sandbox process per test session (reset per test), fast clients."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from jobs.config import AtlasConfig, Timeouts
from jobs.retry import Backoff
from sandbox.server import SandboxProcess
from workers.atlas import AtlasClient

if TYPE_CHECKING:
    from tests.pipeline import Pipeline

API_KEY = "sk-test-0123456789abcdef"
FAST_RETRY = Backoff(attempts=4, initial=0.01, maximum=0.05)


@pytest.fixture(scope="session")
def sandbox_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxProcess]:
    log = tmp_path_factory.mktemp("sandbox") / "sandbox.log"
    proc = SandboxProcess(log_path=str(log)).start()
    yield proc
    proc.stop()


@pytest.fixture
def sandbox(sandbox_process: SandboxProcess) -> SandboxProcess:
    """The session's sandbox, reset to defaults (no faults, no limits, zero delay)."""
    sandbox_process.reset()
    return sandbox_process


def make_client(sandbox: SandboxProcess, **changes: object) -> AtlasClient:
    config = AtlasConfig(
        api_key=API_KEY,
        api_base=sandbox.api_base,
        read_retry=FAST_RETRY,
        timeouts=Timeouts(connect=2, read=5, write=5, pool=5),
    )
    return AtlasClient(config.with_(**changes) if changes else config)


@pytest.fixture
def client(sandbox: SandboxProcess) -> Iterator[AtlasClient]:
    c = make_client(sandbox)
    yield c
    c.close()


REDIS_URL = os.environ.get("SEEDREAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Tests use a database of their own (15 by default); Redis must answer: no silent skip."""
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        pytest.fail(f"Redis does not answer at {REDIS_URL} ({exc}); run `make test`, which starts one")
    return REDIS_URL


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own, deleted afterwards."""
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{name}:*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def rconn(redis_url: str) -> Iterator[redis.Redis]:
    from jobs.redisio import connect

    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's server mode: a real S3 endpoint over HTTP, reached by boto3 with endpoint_url."""
    from tests.helpers import moto_server

    with moto_server("127.0.0.1") as url:
        yield url


@pytest.fixture(autouse=True, scope="session")
def _aws_test_credentials() -> Iterator[None]:
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def pipe(sandbox: SandboxProcess, redis_url: str, prefix: str, tmp_path: Path) -> Iterator[Pipeline]:
    """An end-to-end harness: CLI and Celery workers as subprocesses, a queue and key prefix of its own."""
    from tests.pipeline import Pipeline

    p = Pipeline(sandbox=sandbox, redis_url=redis_url, prefix=prefix, tmp=tmp_path)
    yield p
    p.stop()
    r = redis.Redis.from_url(redis_url)
    r.delete(prefix, "unacked", "unacked_index")
