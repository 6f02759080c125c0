"""A worker whose first message of a run is the run's finalize: it has never read the run.

A restarted worker, or an idle one on a fleet whose watchdog has not swept since the run began,
takes the finalize of a short run. It must write the report where the run writes, and must not
keep a wrong store for the run: a job it drives later (`retry-failed`, `resume`) would store a
paid output and its record there, outside the run's --output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.storage import open_output
from manifests.errors import ConfigError
from sandbox.server import SandboxProcess
from tests.helpers import image_bytes, wait_for
from tests.pipeline import Pipeline, one_job, run_id_of, write_manifest
from workers.context import Context
from workers.local import LocalWorkers


def test_a_context_that_never_read_the_run_opens_the_runs_own_store(
    sandbox: SandboxProcess, redis_url: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, run_id, folder = one_job(sandbox, redis_url, prefix, tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    fresh = Context(settings)
    where = Path(fresh.storage(run_id).uri("report.csv")).resolve()  # what finalize_run does first
    assert where == (folder / "report.csv").resolve()
    assert list(cwd.iterdir()) == []


def test_an_empty_output_is_refused_rather_than_read_as_the_working_directory() -> None:
    with pytest.raises(ConfigError, match="no output"):
        open_output("")


def test_a_finalize_taken_by_a_worker_started_moments_ago_keeps_the_report_and_a_retried_paid_job_in_the_output(
    pipe: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker A (one thread) is in its job's last poll (the service takes 8 s to answer it) when
    worker B starts with default settings (its first watchdog sweep 30 s away). The poll says
    `failed`; A ends the job and sends the finalize; B, idle, takes it. Then A stops and
    `retry-failed` runs the job on B, where it succeeds and is paid."""
    wcwd = tmp_path / "worker-cwd"
    wcwd.mkdir()
    monkeypatch.chdir(wcwd)  # the workers start here
    pipe.sandbox.configure(faults={"failed": 1.0}, poll_latency=8.0, warmup_seconds=0.0)
    (pipe.tmp / "a.png").write_bytes(image_bytes())
    manifest = write_manifest(pipe.tmp, [{"id": "j0", "prompt": "p0", "images": ["a.png"]}])
    a = pipe.start_workers(1, concurrency=1)
    out = pipe.tmp / "out"
    started = pipe.cli("run", str(manifest), "--output", str(out), "--no-wait")
    assert started.returncode == 0, started.stdout + started.stderr
    run_id = run_id_of(started.stdout)
    runs = pipe.runs()
    wait_for(lambda: (r := runs.store.get(run_id, "j0")) is not None and r.state == "submitted", timeout=60,
             what="the submit")  # fmt: skip
    env_b = dict(pipe.env, SEEDREAM_VISIBILITY_TIMEOUT="300")  # the default: its watchdog sweeps every 30 s
    b = LocalWorkers(1, concurrency=2, queue=pipe.prefix, env=env_b, log_path=str(pipe.tmp / "b.log"), name="B")
    pipe.workers.append(b.start())
    wait_for(lambda: runs.meta(run_id).report_written, timeout=60, interval=0.3, what="the report")
    assert (out / run_id / "report.csv").is_file()
    a.stop(timeout=20)
    pipe.sandbox.configure(faults={"failed": 0.0}, poll_latency=0.0)
    again = pipe.cli("retry-failed", run_id)
    assert "1 failed jobs" in again.stdout, again.stdout + again.stderr
    wait_for(lambda: runs.progress(run_id).counts.get("succeeded") == 1, timeout=60, what="the retried job")
    runs.wait_wrapped_up(run_id, notify=False, timeout=60)
    stray = sorted(str(p.relative_to(wcwd)) for p in wcwd.rglob("*") if p.is_file())
    record = json.loads((out / run_id / "records" / "j0.json").read_text())
    assert pipe.sandbox.accounting()["created"] == 2
    assert record["state"] == "succeeded", f"--output's record says {record['state']}; written elsewhere: {stray}"
    assert list((out / run_id / "outputs").rglob("*.*")), f"the paid output is not in --output: {stray}"
    assert stray == []
