"""Flower, the Celery monitor, sees the workers and their tasks unchanged (docs/DEPLOY.md)."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx

from sandbox.server import free_port
from tests.helpers import wait_for
from tests.pipeline import Pipeline, catalog, run_id_of


def test_flower_shows_the_workers_and_the_jobs(pipe: Pipeline) -> None:
    port = free_port()
    env = {**pipe.env, "FLOWER_UNAUTHENTICATED_API": "true"}
    cmd = [sys.executable, "-m", "celery", "-A", "workers", "flower", f"--port={port}", "--address=127.0.0.1"]
    flower = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        api = f"http://127.0.0.1:{port}/api"

        def up() -> bool:
            try:
                return httpx.get(f"{api}/tasks", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=60, what="Flower")
        workers = pipe.start_workers(1, name=f"flowerw-{pipe.prefix}")

        def jobs_seen(run_id: str) -> list[dict[str, object]]:
            tasks = httpx.get(f"{api}/tasks", params={"taskname": "seedream.job"}, timeout=5).json()
            return [t for t in tasks.values() if t.get("state") == "SUCCESS" and run_id in str(t.get("args"))]

        def run(n: int, name: str) -> str:
            (pipe.tmp / name).mkdir()
            manifest, _ = catalog(pipe.tmp / name, pipe.sandbox, n)
            done = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / name / "out"), "--wait")
            assert done.returncode == 0, done.stderr
            return run_id_of(done.stdout)

        # Workers send no task events until Flower turns them on (it asks every 5 s): one-job
        # runs until Flower has seen a job, then every job of a run is seen.
        probes: list[str] = []

        def events_on() -> bool:
            probes.append(run(1, f"probe{len(probes)}"))
            return any(jobs_seen(r) for r in probes)

        wait_for(events_on, timeout=90, what="Flower to turn task events on")
        run_id = run(4, "batch")

        def jobs_of_run() -> set[str]:
            return {str(t["args"]).split(",")[1].strip(" '\"") for t in jobs_seen(run_id)}

        assert len(wait_for(lambda: len(jobs_of_run()) >= 4 and jobs_of_run(), timeout=60, what="the jobs")) == 4
        assert {str(t["worker"]).split("@")[0] for t in jobs_seen(run_id)} == {workers.name + "-0"}
    finally:
        flower.send_signal(signal.SIGTERM)
        flower.wait(timeout=30)
