"""A harness for end-to-end runs: the CLI and Celery workers as real subprocesses."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.config import WorkerSettings
from jobs.runs import Runs
from jobs.start import RunOptions, start_run
from sandbox.server import SandboxProcess
from tests.conftest import API_KEY, make_client
from tests.helpers import image_bytes, wait_for
from workers.local import LocalWorkers

EXE = str(Path(sys.executable).with_name("seedream-batch"))


@dataclass
class Pipeline:
    sandbox: SandboxProcess
    redis_url: str
    prefix: str
    tmp: Path
    s3_endpoint: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    workers: list[LocalWorkers] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "ATLASCLOUD_API_KEY": API_KEY,
                "ATLASCLOUD_API_BASE": self.sandbox.api_base,
                "REDIS_URL": self.redis_url,
                "SEEDREAM_PREFIX": self.prefix,
                "SEEDREAM_QUEUE": self.prefix,
                "SEEDREAM_SUBMIT_RATE": "50",
                "SEEDREAM_SUBMIT_BURST": "5",
                "SEEDREAM_POLL_RATE": "200",
                "SEEDREAM_UPLOAD_RATE": "50",
                "SEEDREAM_MAX_IN_FLIGHT": "32",
                "SEEDREAM_VISIBILITY_TIMEOUT": "12",
                "SEEDREAM_STEP_LEASE": "30",
                "SEEDREAM_RESTORE_INTERVAL": "1",
                "SEEDREAM_ALLOW_INTERNAL_URLS": "1",  # URL inputs live on the sandbox, at 127.0.0.1
            }
        )
        if self.s3_endpoint:
            env["AWS_ENDPOINT_URL"] = self.s3_endpoint
        env.update(self.extra_env)
        return env

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([EXE, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def start_workers(
        self, count: int = 2, concurrency: int = 4, *, loglevel: str = "WARNING", restart: bool = False, name: str = ""
    ) -> LocalWorkers:
        log = str(self.tmp / "workers.log")
        w = LocalWorkers(
            count,
            concurrency=concurrency,
            queue=self.prefix,
            env=self.env,
            log_path=log,
            loglevel=loglevel,
            restart=restart,
            name=name,
        )
        w.start()
        self.workers.append(w)
        return w

    def stop(self) -> None:
        for w in self.workers:
            w.stop(timeout=20)

    def runs(self) -> Runs:
        return Runs(WorkerSettings.from_env(self.env))

    def wait_done(self, run_id: str, timeout: float = 120) -> Any:
        runs = self.runs()
        return wait_for(
            lambda: (p := runs.progress(run_id)).done and p,
            timeout=timeout,
            interval=0.2,
            what=f"run {run_id} to finish",
        )


def run_id_of(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("run "):
            return line.split()[1].rstrip(":")
    raise AssertionError(f"no run id in {output!r}")


def read_report(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))


V4, V45 = "bytedance/seedream-v4/edit", "bytedance/seedream-v4.5/edit"


def write_manifest(tmp: Path, rows: list[dict[str, object]]) -> Path:
    path = tmp / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def catalog(tmp: Path, sandbox: SandboxProcess, n: int) -> tuple[Path, int]:
    """n rows: both models, a photo shared by several rows, unique local photos and URL inputs."""
    (tmp / "shared.png").write_bytes(image_bytes(48, 48, color=(200, 10, 10)))
    with make_client(sandbox) as c:
        url = c.upload("remote.png", image_bytes(40, 40, color=(0, 0, 250)), "image/png")
    rows: list[dict[str, object]] = []
    distinct_local = 1
    for i in range(n):
        if i % 3 == 0:
            images: list[str] = ["shared.png"]
        elif i % 3 == 1:
            (tmp / f"p{i}.jpg").write_bytes(image_bytes(32 + i, 32, "JPEG", color=(i * 7 % 255, 90, 20)))
            images = [f"p{i}.jpg", url]
            distinct_local += 1
        else:
            images = [url]
        rows.append(
            {
                "id": f"sku-{i:03d}",
                "prompt": f"same product on white marble #{i}",
                "images": images,
                "model": V45 if i % 4 == 0 else V4,
                "sku": f"S{i}",
                "note": '=HYPERLINK("x")' if i == 2 else "ok",
            }
        )
    return write_manifest(tmp, rows), distinct_local


def one_job(
    sandbox: SandboxProcess, redis_url: str, prefix: str, tmp: Path, *, image: str = "a.png", **env: str
) -> tuple[WorkerSettings, str, Path]:
    """A run of one row, started without workers: tests drive its job step by step."""
    return one_job_at(sandbox.api_base, redis_url, prefix, tmp, image=image, **env)


def one_job_at(
    api_base: str, redis_url: str, prefix: str, tmp: Path, *, image: str = "a.png", **env: str
) -> tuple[WorkerSettings, str, Path]:
    """`one_job` against any service address: a stand-in client needs no sandbox running."""
    (tmp / "a.png").write_bytes(image_bytes())
    manifest = write_manifest(tmp, [{"id": "sku-1", "prompt": "white marble", "images": [image]}])
    settings = WorkerSettings.from_env(
        {"REDIS_URL": redis_url, "SEEDREAM_PREFIX": prefix, "ATLASCLOUD_API_KEY": API_KEY,
         "ATLASCLOUD_API_BASE": api_base, "SEEDREAM_SUBMIT_RATE": "50", **env}
    )  # fmt: skip
    out = tmp / "out"
    opts = RunOptions(manifest=manifest, output=str(out), api_base=api_base, check_balance=False)
    started = start_run(opts, settings, lambda run_id: 0)
    return settings, started.run_id, out / started.run_id


def stored_record(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / "records" / "sku-1.json").read_text()))
