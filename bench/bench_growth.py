"""Worker memory over a long run: the worker processes' RSS after 1,000 finished jobs and at
the end (BENCH_GROWTH_JOBS, 5,000 by default; zero prediction time, no limits, 2 workers x
8 threads, 500 distinct photos).

The ratio late/early is the figure: 1.0 means no growth. A leak of even 1 KB per job
would show as about 4 MB over 5,000 jobs.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import table, write_result
from bench.harness import Project, make_manifest
from sandbox.server import SandboxProcess

JOBS = int(os.environ.get("BENCH_GROWTH_JOBS", "5000"))  # 20,000 asked; see docs/BENCHMARKS.md
EARLY = min(1000, JOBS // 2)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, SandboxProcess() as sb:
        manifest = make_manifest(Path(tmp), JOBS, distinct_images=500)
        with Project(sb, workers=2, concurrency=8) as project:
            sb.reset()
            got = project.run(manifest, Path(tmp) / "out", sample_rss_at=(EARLY, JOBS))
    early, late = got["rss_mb_at"][EARLY], got["rss_mb_at"][JOBS]
    rows = [
        {
            "jobs": got["jobs"],
            "succeeded": got["counts"].get("succeeded", 0),
            "wall_s": got["seconds"],
            f"rss_mb_after_{EARLY}": early,
            f"rss_mb_after_{JOBS}": late,
            "late_over_early": late / early,
            "kb_per_job_growth": (late - early) * 1024 / (JOBS - EARLY),
        }
    ]
    print(f"RSS of 2 worker processes (sum), {JOBS} jobs")
    print(table(rows))
    write_result("growth", {"jobs": JOBS, "rows": rows})


if __name__ == "__main__":
    main()
