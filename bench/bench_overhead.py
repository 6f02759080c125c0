"""Overhead: end-to-end jobs/s and CPU per job against a sandbox with zero prediction time
and no limits, for 1, 2 and 4 worker processes, and the baseline in the same run.

Every run is the same manifest (N rows, a small PNG each) through upload, submit, poll,
download, image check and store to a local folder. CPU per job counts the worker
processes and Redis (the CLI's enqueue and the report are shown apart); the sandbox shares
the same two cores, so its own CPU is shown too: it is what the machine spends playing the
service. Each configuration runs BENCH_REPS times (3) and the median is shown: this shared
machine's speed drifts from minute to minute, so the baseline is run in between and the
ratio to it is the figure that travels. Redis memory per finished job is the sum of MEMORY
USAGE over the run's keys / N; Redis commands per job count every command Redis processed
during the run (state, limits and the Celery broker, inside scripts too) / N.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import table, write_result
from bench.harness import Project, make_manifest, proc_cpu, run_baseline
from sandbox.server import SandboxProcess

JOBS = int(os.environ.get("BENCH_JOBS", "1000"))
WORKERS = [int(x) for x in os.environ.get("BENCH_WORKERS", "1,2,4").split(",")]
REPS = int(os.environ.get("BENCH_REPS", "3"))


def baseline_run(sb: SandboxProcess, manifest: Path, out: Path) -> dict[str, float]:
    assert sb.proc
    sb.reset()
    sandbox_cpu0 = proc_cpu(sb.proc.pid)
    base = run_baseline(sb, manifest, out, rate=0, concurrency=64)
    return {
        "jobs": base["jobs"],
        "succeeded": base["done"],
        "jobs_per_s": base["jobs"] / base["seconds"],
        "cpu_ms_per_job": 1000 * base["cpu_s"] / JOBS,
        "sandbox_ms_per_job": 1000 * (proc_cpu(sb.proc.pid) - sandbox_cpu0) / JOBS,
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    rows: list[dict[str, Any]] = []
    baselines: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp, SandboxProcess() as sb:
        manifest = make_manifest(Path(tmp), JOBS)
        assert sb.proc
        for n in WORKERS:
            runs = []
            with Project(sb, workers=n, concurrency=8) as project:
                for rep in range(REPS):
                    sb.reset()
                    sandbox_cpu0 = proc_cpu(sb.proc.pid)
                    got = project.run(manifest, Path(tmp) / f"out-{n}-{rep}", key_bytes=True)
                    runs.append(
                        {
                            "jobs": got["jobs"],
                            "succeeded": got["counts"].get("succeeded", 0),
                            "jobs_per_s": got["jobs"] / got["seconds"],
                            "cpu_ms_per_job": 1000 * (got["cpu_workers_s"] + got["cpu_redis_s"]) / JOBS,
                            "of_which_redis_ms": 1000 * got["cpu_redis_s"] / JOBS,
                            "redis_commands_per_job": got["redis_commands"] / JOBS,
                            "task_messages_per_job": got["task_messages"] / JOBS,
                            "cli_enqueue_ms_per_job": 1000 * got["cpu_cli_s"] / JOBS,
                            "report_ms_per_job": 1000 * got["cpu_report_s"] / JOBS,
                            "sandbox_ms_per_job": 1000 * (proc_cpu(sb.proc.pid) - sandbox_cpu0) / JOBS,
                            "redis_bytes_per_job": got["redis_key_bytes"] / JOBS,
                        }
                    )
                    baselines.append(baseline_run(sb, manifest, Path(tmp) / f"out-base-{n}-{rep}"))
            row = {"approach": f"project, {n} worker{'s' if n > 1 else ''} x 8 threads", **median_of(runs)}
            row["cpu_ms_per_job_min_max"] = f"{min(r['cpu_ms_per_job'] for r in runs):.1f}-" + (
                f"{max(r['cpu_ms_per_job'] for r in runs):.1f}"
            )
            rows.append(row)
    base = median_of(baselines)
    rows.append({"approach": "baseline, no throttle, 64 at once, polls every 3 s", **base})
    for row in rows:
        row["cpu_vs_baseline"] = row["cpu_ms_per_job"] / base["cpu_ms_per_job"]
    print(f"{JOBS} jobs, zero prediction time, no limits, {os.cpu_count()} CPUs; median of {REPS} runs each")
    print(table(rows))
    write_result("overhead", {"jobs": JOBS, "reps": REPS, "rows": rows, "baseline_runs": baselines})


if __name__ == "__main__":
    main()
