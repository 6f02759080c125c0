"""A worker that stands still between claiming a submit and sending it (frozen, cut off) while
its redelivered message lets another worker end the job: the first must not POST, and must
not leave its stale `submitting` record over the job's final one.

The two workers are two Contexts on real Redis and the sandbox over HTTP; the only hook is
the moment of standing still (the wait before the POST, or the POST itself).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from jobs.records import UNCERTAIN
from jobs.runs import RunOptions, start_run
from sandbox.server import SandboxProcess
from tests.conftest import API_KEY
from tests.helpers import image_bytes
from tests.pipeline import write_manifest
from workers import steps
from workers.context import Context, WorkerSettings


def _setup(sandbox: SandboxProcess, redis_url: str, prefix: str, tmp: Path) -> tuple[WorkerSettings, str, Path]:
    (tmp / "a.png").write_bytes(image_bytes())
    manifest = write_manifest(tmp, [{"id": "sku-1", "prompt": "white marble", "images": ["a.png"]}])
    settings = WorkerSettings.from_env(
        {"REDIS_URL": redis_url, "SEEDREAM_PREFIX": prefix, "ATLASCLOUD_API_KEY": API_KEY,
         "ATLASCLOUD_API_BASE": sandbox.api_base, "SEEDREAM_SUBMIT_RATE": "50"}
    )  # fmt: skip
    out = tmp / "out"
    opts = RunOptions(manifest=manifest, output=str(out), api_base=sandbox.api_base, check_balance=False)
    started = start_run(opts, settings, lambda run_id: 0)
    return settings, started.run_id, out / started.run_id


def _record(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / "records" / "sku-1.json").read_text()))


@pytest.mark.parametrize("moment", ["waiting_for_the_send_time", "sending"])
def test_a_submit_taken_over_meanwhile_is_not_sent_or_recorded_over(
    sandbox: SandboxProcess, redis_url: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    settings, run_id, folder = _setup(sandbox, redis_url, prefix, tmp_path)
    a, b = Context(settings), Context(settings)
    took_over: list[float | None] = []

    def other_worker_ends_it() -> None:
        if not took_over:  # the broker redelivered A's message (same token) to B
            took_over.append(steps.advance(b, run_id, "sku-1", "0", due_at=0.0))

    if moment == "waiting_for_the_send_time":
        real_sleep = steps.time.sleep
        monkeypatch.setattr(steps.time, "sleep", lambda s: (other_worker_ends_it(), real_sleep(min(s, 0.01))))
    else:
        client = a.client(a.meta(run_id)["api_base"])
        real_submit = client.submit

        def submit(*args: Any, **kwargs: Any) -> Any:
            other_worker_ends_it()
            return real_submit(*args, **kwargs)

        monkeypatch.setattr(client, "submit", submit)

    assert steps.advance(a, run_id, "sku-1", "0", due_at=0.0) == steps.STALE  # A sees it lost the job
    assert took_over == [None]  # B ended it
    job = a.runs.get(run_id, "sku-1")
    assert job is not None and job.state == UNCERTAIN and job.reason == "worker_lost_during_submit"
    record = _record(folder)
    assert record["state"] == UNCERTAIN  # the final record stands, not A's `submitting` or `submitted`
    created = sandbox.accounting()["created"]
    assert created == (0 if moment == "waiting_for_the_send_time" else 1)
