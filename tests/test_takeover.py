"""A worker that stands still before its submit or during it while its redelivered message
runs on another worker: the job is submitted once, and never ended uncertain by the copy.

The two workers are two Contexts on real Redis and the sandbox over HTTP; the only hook is
the moment of standing still (the wait before the POST, or the POST itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from jobs.records import PENDING, UNCERTAIN
from sandbox.server import SandboxProcess
from tests.pipeline import one_job, stored_record
from workers import steps
from workers.context import Context
from workers.turn import StepResult, Wait


@pytest.mark.parametrize("moment", ["waiting_for_the_send_time", "sending"])
def test_a_copy_of_the_message_meanwhile_neither_sends_twice_nor_ends_it_uncertain(
    sandbox: SandboxProcess, redis_url: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    """A's message is redelivered to B (the same token) while A waits for its send time (before
    its claim) or while A's POST is on its way. Waiting: B submits, and A, finding the job
    submitted, only polls it. Sending: B finds the POST marked sent and waits for A's answer
    instead of ending the job uncertain. Either way: one prediction, nothing uncertain."""
    settings, run_id, folder = one_job(sandbox, redis_url, prefix, tmp_path)
    a, b = Context(settings), Context(settings)
    took_over: list[StepResult | None] = []

    def other_worker_runs_it() -> None:
        if not took_over:
            took_over.append(None)
            took_over[0] = steps.advance(b, run_id, "sku-1", "0", due_at=0.0)

    if moment == "waiting_for_the_send_time":
        real_sleep = steps.time.sleep
        monkeypatch.setattr(steps.time, "sleep", lambda s: (other_worker_runs_it(), real_sleep(min(s, 0.01))))
    else:
        client = a.client(a.meta(run_id).api_base)
        real_submit = client.submit

        def submit(*args: Any, **kwargs: Any) -> Any:
            other_worker_runs_it()
            return real_submit(*args, **kwargs)

        monkeypatch.setattr(client, "submit", submit)

    steps.advance(a, run_id, "sku-1", "0", due_at=0.0)  # A goes on with the job as it finds it
    came_back = took_over[0] if took_over else None  # B came back later; it ended nothing
    assert isinstance(came_back, Wait) and came_back.seconds > 0
    job = a.runs.get(run_id, "sku-1")
    assert job is not None and job.state not in (UNCERTAIN, PENDING) and job.prediction_id
    assert stored_record(folder)["prediction_id"] == job.prediction_id
    assert sandbox.accounting()["created"] == 1
