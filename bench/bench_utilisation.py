"""Rate-limit utilisation and poll efficiency of whole batches: the project against the baseline.

The sandbox enforces R submits/s (burst 2) and draws prediction times from a log-normal
(median 2 s, sigma 0.5: the service's ~8 s scaled down 4x for a 2-core machine). The same
manifest of N rows (one small PNG each) goes through:

- the project: 2 worker processes x 16 threads, submit rate R shared in Redis;
- the baseline (bench/baseline.py) throttled to R, with 32 and with 128 jobs at once.

Figures: submit rate over the steady part (middle 80% of submits) / R, 429s, wall time /
lower bound (N/R + median prediction time), polls per job (minimum 1: one poll after the
prediction ended) over all jobs and over the same steady part, and the lag from a
prediction's end to the poll that saw it.
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
from bench.harness import Project, as_remote, make_manifest, run_baseline, timeline
from sandbox.server import SandboxProcess

RATE = float(os.environ.get("BENCH_RATE", "20"))
JOBS = int(os.environ.get("BENCH_JOBS", "600"))
REPS = int(os.environ.get("BENCH_REPS", "3"))
MEDIAN, SIGMA = 2.0, 0.5
BURST = 2


def figures(name: str, sandbox: SandboxProcess, seconds: float, extra: dict[str, Any]) -> dict[str, Any]:
    t = timeline(sandbox, rate=RATE, burst=BURST)
    acc = sandbox.accounting()
    return {
        "approach": name,
        "jobs": t["predictions"],
        "rate_share": t["steady_submit_rate"] / RATE,
        "http_429": acc["http_429"],
        "wall_s": seconds,
        "wall_over_bound": seconds / (JOBS / RATE + MEDIAN),
        "polls_per_job": t["polls_per_job"],
        "polls_per_job_steady": t["polls_per_job_steady"],
        "lag_mean_s": t["lag_mean_s"],
        "lag_p90_s": t["lag_p90_s"],
        "margin_min_ms": t["margin_min_ms"],
        "margins_under_10ms": t["margins_under_10ms"],
        **extra,
    }


def main() -> None:
    settings = {"delay": f"lognormal:{MEDIAN}:{SIGMA}", "submit_rate": RATE, "submit_burst": BURST, "seed": 7}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, SandboxProcess() as sb:
        priority = as_remote(sb)
        manifest = make_manifest(Path(tmp), JOBS)
        env = {"SEEDREAM_SUBMIT_RATE": str(RATE), "SEEDREAM_SUBMIT_BURST": "1", "SEEDREAM_MAX_IN_FLIGHT": "256"}
        with Project(sb, workers=2, concurrency=16, env_extra=env) as project:
            for rep in range(REPS):  # the project and the baseline take turns: the machine drifts
                sb.reset(**settings)
                got = project.run(manifest, Path(tmp) / f"out-project-{rep}")
                cpu = got["cpu_workers_s"] + got["cpu_redis_s"]
                extra = {"cpu_ms_per_job": 1000 * cpu / JOBS, "task_messages_per_job": got["task_messages"] / JOBS}
                runs.append(figures("project (2 workers)", sb, got["seconds"], extra))
                for concurrency in (32, 128):
                    sb.reset(**settings)
                    out = Path(tmp) / f"out-base-{concurrency}-{rep}"
                    base = run_baseline(sb, manifest, out, rate=RATE, concurrency=concurrency)
                    name = f"baseline, throttle R, {concurrency} at once"
                    runs.append(figures(name, sb, base["seconds"], {"cpu_ms_per_job": 1000 * base["cpu_s"] / JOBS}))
    rows = []
    for name in dict.fromkeys(r["approach"] for r in runs):
        mine = [r for r in runs if r["approach"] == name]
        row = {k: statistics.median(r[k] for r in mine) for k in mine[0] if k != "approach"}
        row["rate_share_min"] = min(r["rate_share"] for r in mine)
        row["http_429_each_run"] = "/".join(str(r["http_429"]) for r in mine)
        rows.append({"approach": name, **row})
    print(f"R = {RATE:g} submits/s, {JOBS} jobs, prediction time log-normal median {MEDIAN} s sigma {SIGMA}; "
          f"median of {REPS} runs each; {priority}")  # fmt: skip
    print(table(rows))
    about = {"rate": RATE, "jobs": JOBS, "median_s": MEDIAN, "sigma": SIGMA, "sandbox": priority}
    write_result("utilisation", {**about, "rows": rows, "runs": runs})


if __name__ == "__main__":
    main()
