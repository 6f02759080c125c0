"""Shared fixtures: one sandbox process per test session (reset per test), fast clients."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from jobs.config import AtlasConfig, Timeouts
from sandbox.server import SandboxProcess
from workers.atlas import AtlasClient
from workers.retry import Backoff

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
