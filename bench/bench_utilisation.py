"""Rate-limit utilisation, in-flight and poll lag of whole batches, as a user runs them: the
project's command line with its default settings against the service's real prediction times.

The sandbox enforces R = 10 submits/s (its default burst) and draws prediction times from a
log-normal, unscaled: median 8 s sigma 0.4 (the service's usual times) and median 20 s (large
sizes). The same manifest of N rows (one small PNG each) goes through:

- the project: `seedream-batch run MANIFEST --output DIR --workers 2 --wait --submit-rate 10`,
  nothing else set (the submit rate is the one number a user must tell it: the service does not
  publish it). Each repetition starts with a fresh Redis prefix, as a first run would: nothing
  learned from an earlier one;
- the baseline (bench/baseline.py): a plain asyncio script throttled to R, with a semaphore of
  400 that never binds, polling every 3 s as the service's own clients do.

A third case is a service that caps predictions in flight at K = 24 (a 429 past it): the project
must find K by itself; the baseline is told K (a semaphore of 24).

Figures (medians of the repetitions): submit rate over the steady part (middle 80% of submits) / R;
wall time over the lower bound (N/R + median prediction time) and over the ideal (the last end
if every submit went out exactly 1/R apart with this run's own prediction times: no client can
beat it); 429s; mean predictions in flight at the service over the steady part; polls per job;
and the lag from a prediction's end to the poll that saw it (median, p90).

    python bench/bench_utilisation.py [--reps 3] [--rows 1000] [--cases 8s,20s,cap24]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import table, write_result
from bench.harness import EXE, REDIS_URL, as_remote, make_manifest, run_baseline
from sandbox.server import SandboxProcess

RATE = 10.0
CASES = {
    "8s": {"median": 8.0, "sigma": 0.4, "cap": 0},
    "20s": {"median": 20.0, "sigma": 0.4, "cap": 0},
    "cap24": {"median": 8.0, "sigma": 0.4, "cap": 24},
}


def user_env(sandbox: SandboxProcess, prefix: str) -> dict[str, str]:
    """What a user sets: the key, where the service is, where Redis is. The prefix and queue keep
    repetitions apart (a fresh start each), and are not tuning."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDREAM_")}
    env.update(
        {
            "ATLASCLOUD_API_KEY": "bench-key",
            "ATLASCLOUD_API_BASE": sandbox.api_base,
            "REDIS_URL": REDIS_URL,
            "SEEDREAM_PREFIX": prefix,
            "SEEDREAM_QUEUE": prefix,
        }
    )
    return env


def run_project(sandbox: SandboxProcess, manifest: Path, out: Path) -> float:
    prefix = f"benchu{uuid.uuid4().hex[:8]}"
    cmd = [EXE, "run", str(manifest), "--output", str(out), "--workers", "2", "--wait", "--submit-rate", str(RATE)]
    t0 = time.monotonic()
    done = subprocess.run(cmd, env=user_env(sandbox, prefix), capture_output=True, text=True)
    seconds = time.monotonic() - t0
    r = redis.Redis.from_url(REDIS_URL)
    for key in r.scan_iter(f"{prefix}*", count=5000):
        r.delete(key)
    if done.returncode != 0:
        raise RuntimeError(f"run failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def figures(sandbox: SandboxProcess, seconds: float, jobs: int, median: float) -> dict[str, Any]:
    data = sandbox.admin("GET", "timeline")
    rows = sorted((dict(zip(data["columns"], row, strict=True)) for row in data["rows"]), key=lambda r: r["created"])
    acc = sandbox.accounting()
    created = [r["created"] for r in rows]
    n = len(rows)
    lo, hi = int(n * 0.1), int(n * 0.9) - 1
    steady = (hi - lo) / (created[hi] - created[lo])
    # predictions in flight at the service, sampled every 0.1 s over the steady part
    ends = sorted(r["completed"] for r in rows if r["completed"] is not None)
    samples, t = [], created[lo]
    i_start = i_end = 0
    while t < created[hi]:
        while i_start < n and created[i_start] <= t:
            i_start += 1
        while i_end < len(ends) and ends[i_end] <= t:
            i_end += 1
        samples.append(i_start - i_end)
        t += 0.1
    lags = sorted(r["seen_final_at"] - r["completed"] for r in rows if r["completed"] and r["seen_final_at"])
    ideal = max(i / RATE + r["delay"] for i, r in enumerate(rows))
    return {
        "jobs": n,
        "rate_share": steady / RATE,
        "wall_s": seconds,
        "wall_over_bound": seconds / (jobs / RATE + median),
        "wall_over_ideal": seconds / ideal,
        "http_429": acc["http_429"],
        "in_flight_mean": statistics.fmean(samples) if samples else float("nan"),
        "polls_per_job": sum(r["polls"] for r in rows) / n,
        "lag_median_s": statistics.median(lags) if lags else float("nan"),
        "lag_p90_s": lags[int(len(lags) * 0.9)] if lags else float("nan"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--cap-rows", type=int, default=300, help="rows in the capped case (it runs at ~K/8.7 jobs/s)")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--no-baseline", action="store_true")
    args = p.parse_args()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, SandboxProcess() as sb:
        priority = as_remote(sb)
        for case in args.cases.split(","):
            c = CASES[case]
            jobs = args.cap_rows if c["cap"] else args.rows
            folder = Path(tmp) / case
            folder.mkdir()
            manifest = make_manifest(folder, jobs, distinct_images=10)
            settings = {"delay": f"lognormal:{c['median']}:{c['sigma']}", "submit_rate": RATE,
                        "max_in_flight": c["cap"], "seed": 7}  # fmt: skip
            for rep in range(args.reps):  # the project and the baseline take turns: the machine drifts
                sb.reset(**settings)
                seconds = run_project(sb, manifest, folder / f"out-project-{rep}")
                runs.append({"case": case, "approach": "project, defaults", **figures(sb, seconds, jobs, c["median"])})
                print(runs[-1], flush=True)
                if args.no_baseline:
                    continue
                sb.reset(**settings)
                concurrency = c["cap"] or 400
                base = run_baseline(sb, manifest, folder / f"out-base-{rep}", rate=RATE, concurrency=concurrency)
                name = f"baseline, {concurrency} at once"
                runs.append({"case": case, "approach": name, **figures(sb, base["seconds"], jobs, c["median"])})
                print(runs[-1], flush=True)
    rows = []
    for key in dict.fromkeys((r["case"], r["approach"]) for r in runs):
        mine = [r for r in runs if (r["case"], r["approach"]) == key]
        row: dict[str, Any] = {"case": key[0], "approach": key[1]}
        row.update({k: statistics.median(r[k] for r in mine) for k in mine[0] if k not in ("case", "approach")})
        rows.append(row)
    print(table(rows))
    print(priority)
    write_result("utilisation", {"rate": RATE, "reps": args.reps, "rows": args.rows, "medians": rows, "runs": runs,
                                 "sandbox": priority})  # fmt: skip


if __name__ == "__main__":
    main()
