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
        manifest, _ = catalog(pipe.tmp, pipe.sandbox, 4)
        workers = pipe.start_workers(1, name=f"flowerw-{pipe.prefix}")
        done = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out"), "--wait")
        assert done.returncode == 0, done.stderr
        run_id = run_id_of(done.stdout)

        def jobs_seen() -> list[dict[str, object]]:
            tasks = httpx.get(f"{api}/tasks", params={"taskname": "seedream.job"}, timeout=5).json()
            return [t for t in tasks.values() if t.get("state") == "SUCCESS" and run_id in str(t.get("args"))]

        seen = wait_for(lambda: len(jobs_seen()) >= 4 and jobs_seen(), timeout=60, what="Flower to see the jobs")
        assert len(seen) >= 4 and {str(t["worker"]).split("@")[0] for t in seen} == {workers.name + "-0"}
    finally:
        flower.send_signal(signal.SIGTERM)
        flower.wait(timeout=30)
