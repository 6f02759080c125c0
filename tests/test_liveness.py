"""The crash-only cure for a worker that can no longer work: its watch ends it, its supervisor restarts it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.helpers import wait_for
from tests.pipeline import Pipeline, catalog, run_id_of
from workers.liveness import EXIT_CODE, Watch


def test_verdict_on_a_loop_that_stopped_turning_or_a_stop_that_hangs() -> None:
    w = Watch(10.0)
    now = w.last
    assert w.verdict(now + 9) is None
    assert "not turned" in (w.verdict(now + 11) or "")
    w.tick()
    w.stopping()
    assert w.verdict(w.stopping_since + 9) is None  # type: ignore[operator]
    assert "stopping" in (w.verdict(w.stopping_since + 11) or "")  # type: ignore[operator]


def test_the_watch_thread_ends_a_process_whose_loop_never_turns() -> None:
    code = "import time; from workers.liveness import Watch; Watch(0.5).start(); time.sleep(60)"
    proc = subprocess.run([sys.executable, "-c", code], timeout=30, capture_output=True, text=True)
    assert proc.returncode == EXIT_CODE
    assert "worker is stuck" in proc.stderr


def test_a_working_worker_keeps_its_loop_turning_and_is_not_restarted(pipe: Pipeline) -> None:
    """With a 1.5 s limit, an idle or busy worker must not trip its own watch: the event loop ticks."""
    pipe.extra_env["SEEDREAM_LIVENESS"] = "1.5"
    pipe.sandbox.configure(delay="fixed:1.0")
    pipe.extra_env["SEEDREAM_SUBMIT_RATE"] = "3"
    workers = pipe.start_workers(1, restart=True)
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 12)  # about 5 s of work: more than 3 limits
    run_id = run_id_of(pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out"), "--no-wait").stdout)
    done = pipe.wait_done(run_id, timeout=90)
    assert done.counts.get("succeeded") == 12
    assert workers.restarts == 0 and workers.procs[0].poll() is None


def test_the_supervisor_restarts_a_worker_that_died(pipe: Pipeline) -> None:
    workers = pipe.start_workers(2, restart=True)
    first = workers.procs[0]
    wait_for(lambda: (pipe.tmp / "workers.log").exists(), timeout=20, what="worker log")
    os.kill(first.pid, signal.SIGKILL)
    wait_for(lambda: workers.restarts == 1 and workers.procs[0] is not first, timeout=20, what="a restart")
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, 6)
    run_id = run_id_of(pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out"), "--no-wait").stdout)
    assert pipe.wait_done(run_id, timeout=60).counts.get("succeeded") == 6
    workers.stop(timeout=20)
    assert all(p.poll() is not None for p in workers.procs)
    assert workers.restarts == 1  # a requested stop is not restarted
