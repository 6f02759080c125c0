"""Overhead: end-to-end jobs/s and CPU per job against a sandbox with zero prediction time
and no limits, for 1, 2 and 4 worker processes, and the baseline in the same run.

Every run is the same manifest (N rows, a small PNG each) through upload, submit, poll,
download, image check and store to a local folder. CPU per job counts the worker
processes and Redis (the CLI's enqueue is shown apart); the sandbox shares the same two
cores, so its own CPU is shown too: it is what the machine spends playing the service.
Redis memory per finished job is the sum of MEMORY USAGE over the run's keys / N; Redis
commands per job count every command Redis processed during the run (state, limits and the
Celery broker, pipelined or not) / N.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import table, write_result
from bench.harness import Project, make_manifest, proc_cpu, run_baseline
from sandbox.server import SandboxProcess

JOBS = int(os.environ.get("BENCH_JOBS", "1000"))
WORKERS = [int(x) for x in os.environ.get("BENCH_WORKERS", "1,2,4").split(",")]


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, SandboxProcess() as sb:
        manifest = make_manifest(Path(tmp), JOBS)
        assert sb.proc
        for n in WORKERS:
            with Project(sb, workers=n, concurrency=8) as project:
                sb.reset()
                sandbox_cpu0 = proc_cpu(sb.proc.pid)
                got = project.run(manifest, Path(tmp) / f"out-{n}", key_bytes=True)
                ok = got["counts"].get("succeeded", 0)
                rows.append(
                    {
                        "approach": f"project, {n} worker{'s' if n > 1 else ''} x 8 threads",
                        "jobs": got["jobs"],
                        "succeeded": ok,
                        "wall_s": got["seconds"],
                        "jobs_per_s": got["jobs"] / got["seconds"],
                        "cpu_ms_per_job": 1000 * (got["cpu_workers_s"] + got["cpu_redis_s"]) / JOBS,
                        "of_which_redis_ms": 1000 * got["cpu_redis_s"] / JOBS,
                        "redis_commands_per_job": got["redis_commands"] / JOBS,
                        "cli_enqueue_ms_per_job": 1000 * got["cpu_cli_s"] / JOBS,
                        "sandbox_ms_per_job": 1000 * (proc_cpu(sb.proc.pid) - sandbox_cpu0) / JOBS,
                        "redis_bytes_per_job": got["redis_key_bytes"] / JOBS,
                    }
                )
        sb.reset()
        sandbox_cpu0 = proc_cpu(sb.proc.pid)
        base = run_baseline(sb, manifest, Path(tmp) / "out-base", rate=0, concurrency=64)
        rows.append(
            {
                "approach": "baseline, no throttle, 64 at once, polls every 3 s",
                "jobs": base["jobs"],
                "succeeded": base["done"],
                "wall_s": base["seconds"],
                "jobs_per_s": base["jobs"] / base["seconds"],
                "cpu_ms_per_job": 1000 * base["cpu_s"] / JOBS,
                "of_which_redis_ms": 0.0,
                "redis_commands_per_job": 0.0,
                "cli_enqueue_ms_per_job": 0.0,
                "sandbox_ms_per_job": 1000 * (proc_cpu(sb.proc.pid) - sandbox_cpu0) / JOBS,
                "redis_bytes_per_job": 0.0,
            }
        )
    print(f"{JOBS} jobs, zero prediction time, no limits, {os.cpu_count()} CPUs")
    print(table(rows))
    write_result("overhead", {"jobs": JOBS, "rows": rows})


if __name__ == "__main__":
    main()
